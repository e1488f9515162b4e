"""What a conversion will produce, computed from configs alone (`hybridize convert --dry-run`).

Parameter counts are analytic (no model is built); they match transformers' Qwen3 / Llama classes and the hybrid's
layout (see design.md): a gated attention layer's q_proj has 2·H·d rows, a Gated DeltaNet layer has in_proj_qkv,
in_proj_z, in_proj_b, in_proj_a, a depthwise conv1d, A_log, dt_bias, a gated RMSNorm and out_proj.
"""

from __future__ import annotations

import torch

from ..model.config import FULL, LINEAR, layer_stats

CONTEXTS = {"4k": 4096, "32k": 32768, "128k": 131072}


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _kv_heads(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _common_params(cfg) -> tuple[int, int]:
    """(embeddings + final norm + lm_head, per-layer norms + MLP) parameters shared by source and hybrid."""
    h, v = cfg.hidden_size, cfg.vocab_size
    outer = v * h + h + (0 if cfg.tie_word_embeddings else v * h)
    per_layer = 2 * h + 3 * h * cfg.intermediate_size
    return outer, per_layer


def attention_params(cfg, gated: bool, qk_norm: bool) -> int:
    """Parameters of one softmax attention block (no biases): q (2·H·d rows when gated), k, v, o, q/k norms."""
    h, heads, kv, d = cfg.hidden_size, cfg.num_attention_heads, _kv_heads(cfg), _head_dim(cfg)
    q_rows = (2 if gated else 1) * heads * d
    return q_rows * h + 2 * kv * d * h + h * heads * d + (2 * d if qk_norm else 0)


def deltanet_params(cfg) -> int:
    """Parameters of one Gated DeltaNet block (Qwen3.5 layout)."""
    h = cfg.hidden_size
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    conv_dim = 2 * hk * dk + hv * dv
    return (
        conv_dim * h  # in_proj_qkv
        + hv * dv * h  # in_proj_z
        + 2 * hv * h  # in_proj_b, in_proj_a
        + conv_dim * cfg.linear_conv_kernel_dim  # conv1d (depthwise, no bias)
        + 2 * hv  # A_log, dt_bias
        + dv  # gated RMSNorm
        + h * hv * dv  # out_proj
    )


def source_params(cfg, family: str) -> int:
    """Parameters of a Qwen3 / Llama-family source (tied embeddings counted once)."""
    outer, per_layer = _common_params(cfg)
    attn = attention_params(cfg, gated=False, qk_norm=family == "qwen3")
    return outer + cfg.num_hidden_layers * (per_layer + attn)


def hybrid_params(cfg) -> int:
    """Parameters of a hybrid described by a HybridConfig (or a qwen3_5_text config)."""
    outer, per_layer = _common_params(cfg)
    qk_norm = getattr(cfg, "attention_qk_norm", True)
    total = outer + cfg.num_hidden_layers * per_layer
    for t in cfg.layer_types:
        total += deltanet_params(cfg) if t == LINEAR else attention_params(cfg, gated=True, qk_norm=qk_norm)
    return total


def kv_cache_bytes(cfg, layers: int, tokens: int, itemsize: int) -> int:
    return layers * 2 * _kv_heads(cfg) * _head_dim(cfg) * tokens * itemsize


def deltanet_state_bytes(cfg, itemsize: int) -> int:
    """One DeltaNet layer's decode state: recurrent state (float32) + conv state (kernel-1 columns, at dtype)."""
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    conv_dim = 2 * hk * dk + hv * dv
    return hv * dk * dv * 4 + (cfg.linear_conv_kernel_dim - 1) * conv_dim * itemsize


def hybrid_cache_bytes(cfg, tokens: int, itemsize: int) -> int:
    stats = layer_stats(cfg.layer_types)
    return kv_cache_bytes(cfg, stats["gated_attention_layers"], tokens, itemsize) + stats[
        "deltanet_layers"
    ] * deltanet_state_bytes(cfg, itemsize)


def conversion_plan(source_config, family: str, hybrid_config, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A JSON-serialisable summary of a conversion: layer schedule, parameters, weight and cache bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if family == "qwen3_5_text":  # already a hybrid: imported as-is
        src_params = hybrid_params(source_config)
        src_cache = {k: hybrid_cache_bytes(source_config, t, itemsize) for k, t in CONTEXTS.items()}
    else:
        src_params = source_params(source_config, family)
        src_cache = {
            k: kv_cache_bytes(source_config, source_config.num_hidden_layers, t, itemsize) for k, t in CONTEXTS.items()
        }
    hyb_params = hybrid_params(hybrid_config)
    hyb_cache = {k: hybrid_cache_bytes(hybrid_config, t, itemsize) for k, t in CONTEXTS.items()}
    types = list(hybrid_config.layer_types)
    return {
        "family": family,
        "source_model_type": source_config.model_type,
        "dtype": str(dtype).removeprefix("torch."),
        "layer_stats": layer_stats(types),
        "attention_layers": [i for i, t in enumerate(types) if t == FULL],
        "layer_types": types,
        "parameters": {
            "source": src_params,
            "hybrid": hyb_params,
            "ratio": round(hyb_params / src_params, 4),
        },
        "weight_bytes": {
            "source": src_params * itemsize,
            "hybrid": hyb_params * itemsize,
        },
        "cache_bytes_batch1": {
            k: {
                "tokens": CONTEXTS[k],
                "source": src_cache[k],
                "hybrid": hyb_cache[k],
                "ratio": round(hyb_cache[k] / src_cache[k], 4),
            }
            for k in CONTEXTS
        },
    }


__all__ = [
    "conversion_plan",
    "layer_stats",
    "source_params",
    "hybrid_params",
    "attention_params",
    "deltanet_params",
    "deltanet_state_bytes",
]
