"""Stream the hybrid's tensors from a source checkpoint, layer by layer (the table in transfer/init.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..model.config import LINEAR, HybridConfig
from . import init as I


def _layer_tensors(source, cfg: HybridConfig, i: int, strategy: str, seed: int) -> dict[str, torch.Tensor]:
    src, dst = f"model.layers.{i}.", f"model.layers.{i}."
    H, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    gen = I.layer_generator(seed, i)
    out = {dst + n: I.zero_centered(source.tensor(src + n))
           for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        out[dst + f"mlp.{proj}.weight"] = source.tensor(src + f"mlp.{proj}.weight")
    q, k, v, o = (source.tensor(src + f"self_attn.{p}_proj.weight") for p in "qkvo")
    q_norm = source.tensor(src + "self_attn.q_norm.weight") if cfg.attention_qk_norm else None
    k_norm = source.tensor(src + "self_attn.k_norm.weight") if cfg.attention_qk_norm else None
    if cfg.layer_types[i] == LINEAR:
        a = dst + "linear_attn."
        Hv, D = cfg.linear_num_value_heads, cfg.hidden_size
        qkv = I.deltanet_in_proj_qkv(q, k, v, H, Hkv, d, q_norm, k_norm)
        A_log, dt_bias = I.deltanet_decay_params(Hv, gen)
        out.update({
            a + "in_proj_qkv.weight": qkv,
            a + "in_proj_z.weight": torch.zeros(Hv * cfg.linear_value_head_dim, D),
            a + "in_proj_b.weight": I.small_normal((Hv, D), cfg.initializer_range, gen),
            a + "in_proj_a.weight": I.small_normal((Hv, D), cfg.initializer_range, gen),
            a + "conv1d.weight": I.identity_conv(qkv.shape[0], cfg.linear_conv_kernel_dim),
            a + "A_log": A_log,
            a + "dt_bias": dt_bias,
            a + "norm.weight": torch.ones(cfg.linear_value_head_dim),
            a + "out_proj.weight": o,
        })
    else:
        a = dst + "self_attn."
        out.update({
            a + "q_proj.weight": I.attention_q_proj(q, H, d, strategy, gen),
            a + "k_proj.weight": k,
            a + "v_proj.weight": v,
            a + "o_proj.weight": I.attention_o_proj(o, strategy),
        })
        if cfg.attention_qk_norm:
            out[a + "q_norm.weight"] = I.zero_centered(q_norm)
            out[a + "k_norm.weight"] = I.zero_centered(k_norm)
    return out


def source_tensor_shapes(cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every source tensor the transfer reads (HF Qwen3 / Llama layout), from the hybrid's config.

    Checked against the checkpoint before anything is written: a config that disagrees with its tensors (another
    intermediate_size, vocabulary or head count, a transposed matrix) must be refused, not reshaped into nonsense.
    """
    V, D, I = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size  # noqa: N806 - the usual letters
    q, kv, d = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    per_layer = {"input_layernorm": (D,), "post_attention_layernorm": (D,), "mlp.gate_proj": (I, D),
                 "mlp.up_proj": (I, D), "mlp.down_proj": (D, I), "self_attn.q_proj": (q, D),
                 "self_attn.k_proj": (kv, D), "self_attn.v_proj": (kv, D), "self_attn.o_proj": (D, q)}
    if cfg.attention_qk_norm:
        per_layer.update({"self_attn.q_norm": (d,), "self_attn.k_norm": (d,)})
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{n}.weight": shape for n, shape in per_layer.items()})
    return shapes


def required_source_tensors(cfg: HybridConfig) -> list[str]:
    """Every source tensor the transfer reads, to check a checkpoint is complete before anything is written."""
    return list(source_tensor_shapes(cfg))


LayerHook = Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def iter_hybrid_tensors(source, cfg: HybridConfig, gate_init_strategy: str = "ones", seed: int = 0,
                        dtype: torch.dtype = torch.float32, layer_hook: LayerHook | None = None
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hybrid name, tensor in `dtype`) for every tensor of the hybrid, reading the source lazily.

    `source` offers `.tensor(name)` for HF Qwen3 / Llama names. Arithmetic happens in float32, then one cast.
    `layer_hook(i, tensors)`, called for layers 0, 1, ... in order with layer i's float32 tensors, may return
    replacements (the calibration in `calibrate.py` does).
    """
    yield "model.embed_tokens.weight", source.tensor("model.embed_tokens.weight").to(dtype)
    for i in range(cfg.num_hidden_layers):
        tensors = _layer_tensors(source, cfg, i, gate_init_strategy, seed)
        if layer_hook is not None:
            tensors = layer_hook(i, tensors)
        for name, t in tensors.items():
            yield name, t.to(dtype)
    yield "model.norm.weight", I.zero_centered(source.tensor("model.norm.weight")).to(dtype)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", source.tensor("lm_head.weight").to(dtype)
