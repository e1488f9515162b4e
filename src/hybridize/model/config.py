"""HybridConfig: a superset of transformers' `qwen3_5_text` config.

Field names and meanings equal Qwen3_5TextConfig's, so export is a rename of `model_type` plus a check of the few
fields that format cannot express (`attention_qk_norm=False`, for sources without q/k-norm such as Llama).
"""

from __future__ import annotations

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


class HybridConfig(PreTrainedConfig):
    r"""Configuration of a Gated DeltaNet + gated softmax-attention hybrid (see docs and `../shared/design.md`).

    `layer_types[i]` is `"linear_attention"` (Gated DeltaNet) or `"full_attention"` (gated softmax attention).
    DeltaNet layers use `linear_num_{key,value}_heads` heads of `linear_{key,value}_head_dim`; attention layers use
    `num_attention_heads` / `num_key_value_heads` heads of `head_dim`. `attention_qk_norm` says whether attention
    layers RMS-normalise q and k per head (Qwen3: yes; Llama: no).
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
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - {LINEAR, FULL})
        if unknown:
            raise ValueError(f"unknown layer types {unknown}; use {LINEAR!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError("linear_num_value_heads must be a multiple of linear_num_key_heads")


__all__ = ["HybridConfig", "layer_stats", "layer_types_from_pattern", "LINEAR", "FULL"]
