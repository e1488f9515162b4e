"""HybridConfig: a superset of transformers' `qwen3_5_text` config.

Field names and meanings equal Qwen3_5TextConfig's, so export is a rename of `model_type` plus a check of the few
fields that format cannot express (`attention_qk_norm=False`, for sources without q/k-norm such as Llama).
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

LINEAR = "linear_attention"
FULL = "full_attention"


def layer_types_from_pattern(num_layers: int, deltanet_layer_pattern: list[int], pattern_period: int) -> list[str]:
    """Layer i is DeltaNet when `i % pattern_period` is in the pattern, else gated attention ([0,1,2], 4 -> 3:1)."""
    return [LINEAR if i % pattern_period in deltanet_layer_pattern else FULL for i in range(num_layers)]


def layer_stats(layer_types: list[str]) -> dict[str, int]:
    """Count a layer schedule: {"deltanet_layers", "gated_attention_layers", "total_layers"}."""
    return {
        "deltanet_layers": layer_types.count(LINEAR),
        "gated_attention_layers": layer_types.count(FULL),
        "total_layers": len(layer_types),
    }


def _number(value, low: float, high: float) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and low < value <= high


def check_rope_parameters(rope) -> None:
    """Raise ValueError unless `rope` is a RoPE dict transformers can compute: a known rope_type, a positive
    rope_theta, a partial_rotary_factor in (0, 1] and positive scaling numbers."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if not isinstance(rope, dict):
        raise ValueError(f"rope_parameters must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", "default")
    if not isinstance(rope_type, str) or (rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS):
        raise ValueError(f"unknown rope_type {rope_type!r}")
    if not _number(rope.get("rope_theta"), 0, math.inf):
        raise ValueError(f"rope_theta is {rope.get('rope_theta')!r}; it must be a positive number")
    factor = rope.get("partial_rotary_factor", 1.0)
    if not _number(factor, 0, 1):
        raise ValueError(f"partial_rotary_factor is {factor!r}; it must lie in (0, 1]")
    for key in ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "beta_fast",
                "beta_slow", "attention_factor"):
        if key in rope and rope[key] is not None and not _number(rope[key], 0, math.inf):
            raise ValueError(f"rope_parameters {key} is {rope[key]!r}; it must be a positive number")


# Upper bound on depth: far above any real model, low enough that a typo (1e9 layers) fails at once.
MAX_LAYERS = 10_000
HYBRID_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "num_key_value_heads", "head_dim", "linear_conv_kernel_dim",
                "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _token_id(value, vocab: int) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab)


def check_config_fields(config, sizes: tuple[str, ...]) -> None:
    """Raise ValueError (naming the field) for values a model cannot be built from: `sizes` that are not integers
    >= 1, kv heads that do not divide the query heads, an unknown activation, a norm epsilon outside (0, 1), token
    ids outside the vocabulary, RoPE parameters transformers cannot compute. Works on our config and on
    transformers' Qwen3 / Llama / Qwen3.5 configs (same field names)."""
    for name in sizes:
        if not _count(getattr(config, name, None)):
            raise ValueError(f"{name} is {getattr(config, name, None)!r}; it must be an integer >= 1")
    if config.num_hidden_layers > MAX_LAYERS:
        raise ValueError(f"num_hidden_layers is {config.num_hidden_layers}; it must be at most {MAX_LAYERS}")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if kv is not None and (not _count(kv) or heads % kv):
        raise ValueError(f"num_key_value_heads is {kv!r}; it must be an integer >= 1 that divides "
                         f"num_attention_heads ({heads})")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and config.hidden_size % heads:
        raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads ({heads}) and "
                         "no head_dim is given")
    if head_dim is not None and not _count(head_dim):
        raise ValueError(f"head_dim is {head_dim!r}; it must be an integer >= 1")
    linear_k, linear_v = getattr(config, "linear_num_key_heads", None), getattr(config, "linear_num_value_heads", None)
    if _count(linear_k) and _count(linear_v) and linear_v % linear_k:
        raise ValueError(f"linear_num_value_heads ({linear_v}) must be a multiple of linear_num_key_heads "
                         f"({linear_k})")
    if not _number(getattr(config, "rms_norm_eps", None), 0, 1):
        raise ValueError(f"rms_norm_eps is {getattr(config, 'rms_norm_eps', None)!r}; it must lie in (0, 1)")
    from transformers.activations import ACT2FN

    act = getattr(config, "hidden_act", None)
    if not isinstance(act, str) or act not in ACT2FN:
        raise ValueError(f"hidden_act is {act!r}; it must name an activation transformers knows (e.g. 'silu')")
    for name in ("tie_word_embeddings", "attention_bias", "attention_qk_norm"):
        if not isinstance(getattr(config, name, False), bool):
            raise ValueError(f"{name} is {getattr(config, name)!r}; it must be true or false")
    vocab = config.vocab_size
    eos = getattr(config, "eos_token_id", None)
    for name, value in (("pad_token_id", getattr(config, "pad_token_id", None)),
                        ("bos_token_id", getattr(config, "bos_token_id", None)),
                        *(("eos_token_id", e) for e in (eos if isinstance(eos, list) else [eos]))):
        if not _token_id(value, vocab):
            raise ValueError(f"{name} is {value!r}; it must be null or a token id in [0, {vocab})")
    rope = getattr(config, "rope_parameters", None)
    if rope is not None or isinstance(config, HybridConfig):
        check_rope_parameters(rope)


class HybridConfig(PreTrainedConfig):
    r"""Configuration of a Gated DeltaNet + gated softmax-attention hybrid (see docs and `../shared/design.md`).

    `layer_types[i]` is `"linear_attention"` (Gated DeltaNet) or `"full_attention"` (gated softmax attention).
    DeltaNet layers use `linear_num_{key,value}_heads` heads of `linear_{key,value}_head_dim`; attention layers use
    `num_attention_heads` / `num_key_value_heads` heads of `head_dim`. `attention_qk_norm` says whether attention
    layers RMS-normalise q and k per head (Qwen3: yes; Llama: no).

    Multi-token prediction (`hybridize.model.mtp`): `mtp_num_hidden_layers` 1 adds Qwen3.5's `mtp.*` module (0: no
    heads), applied recursively `num_predict_tokens` times for tokens t+2..t+1+num_predict_tokens. With labels the
    loss adds `mtp_loss_weight`·Σ_k `mtp_loss_decay`^(k−1)·L_k (a geometric decay: farther tokens are harder and
    noisier, so they weigh less).
    """

    model_type = "hybridize"
    keys_to_ignore_at_inference = ["past_key_values"]
    ignore_keys_at_rope_validation = {"mrope_section", "mrope_interleaved"}  # kept from imported Qwen3.5 configs

    vocab_size: int = 151936
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 40960
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    attention_qk_norm: bool = True
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 16
    layer_types: list[str] | None = None
    mtp_num_hidden_layers: int = 0
    num_predict_tokens: int = 4
    mtp_loss_weight: float = 0.3
    mtp_loss_decay: float = 0.8
    source_model_type: str | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.layer_types is None:
            self.layer_types = layer_types_from_pattern(self.num_hidden_layers, [0, 1, 2], 4)
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": kwargs.pop("rope_theta", 1_000_000.0)}
        super().__post_init__(**kwargs)

    @staticmethod
    def _import_dict(config_dict: dict) -> dict:
        """A stock `qwen3_5_text` config dict (Qwen3.5 models, our own exports) as ours; others unchanged."""
        if config_dict.get("model_type") != "qwen3_5_text":
            return config_dict
        from ..export.qwen3_5 import qwen3_5_to_hybrid_config

        return qwen3_5_to_hybrid_config(config_dict).to_dict()

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        """`from_pretrained` (and so `HybridForCausalLM.from_pretrained`) also reads a `qwen3_5_text` folder."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls._import_dict(config_dict), kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        return super().from_dict(cls._import_dict(config_dict), **kwargs)

    def validate_architecture(self):
        """Raise ValueError when the layer schedule or head layout cannot be built."""
        check_config_fields(self, HYBRID_SIZES)
        if not isinstance(self.layer_types, list):
            raise ValueError(f"layer_types must be a list, got {self.layer_types!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = sorted({repr(t) for t in self.layer_types if t not in (LINEAR, FULL)})
        if unknown:
            raise ValueError(f"unknown layer types {', '.join(unknown)}; use {LINEAR!r} or {FULL!r}")
        self.validate_mtp()

    def validate_mtp(self):
        """Raise ValueError for MTP settings that cannot be built or trained."""
        if self.mtp_num_hidden_layers not in (0, 1) or isinstance(self.mtp_num_hidden_layers, bool):
            raise ValueError(f"mtp_num_hidden_layers is {self.mtp_num_hidden_layers!r}; use 0 (no MTP heads) or 1 "
                             "(the Qwen3.5 layout, applied recursively)")
        if not _count(self.num_predict_tokens) or self.num_predict_tokens > 64:
            raise ValueError(f"num_predict_tokens is {self.num_predict_tokens!r}; it must be an integer in [1, 64]")
        weight = self.mtp_loss_weight
        if not (_number(weight, -math.inf, math.inf) and weight >= 0) or not _number(self.mtp_loss_decay, 0, 1):
            raise ValueError(f"mtp_loss_weight ({self.mtp_loss_weight!r}) must be >= 0 and mtp_loss_decay "
                             f"({self.mtp_loss_decay!r}) must lie in (0, 1]")


__all__ = ["HybridConfig", "check_config_fields", "check_rope_parameters", "layer_stats", "layer_types_from_pattern",
           "LINEAR", "FULL"]
