"""Model shapes to benchmark without downloading weights: the real configs, random weights.

`qwen3-8b` is Qwen/Qwen3-8B's config, `smollm2` SmolLM2-135M-Instruct's (a Llama), `tiny` a few-layer Qwen3 that
runs on a CPU in seconds (for tests). The hybrid is derived with the same `hybrid_config_from_source` that
`hybridize convert` uses, so its shapes are exactly those of a conversion.
"""

from __future__ import annotations

from transformers import LlamaConfig, PretrainedConfig, Qwen3Config

from ..model.config import HybridConfig
from ..transfer.config import HybridAttentionConfig, hybrid_config_from_source

SHAPES = ("qwen3-8b", "smollm2", "tiny")


def source_config(shape: str) -> tuple[PretrainedConfig, str]:
    """(transformers config, family) of a named shape."""
    if shape == "qwen3-8b":
        return Qwen3Config(
            vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
            rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643,
            eos_token_id=151645), "qwen3"
    if shape == "smollm2":
        return LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
            rope_theta=100_000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
            eos_token_id=2), "llama"
    if shape == "tiny":
        return Qwen3Config(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=1_000_000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2), "qwen3"
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


def hybrid_config(shape: str, attention: HybridAttentionConfig | None = None) -> HybridConfig:
    """The hybrid a default (3:1) conversion of `shape` gives."""
    source, family = source_config(shape)
    return hybrid_config_from_source(source, family, attention or HybridAttentionConfig())
