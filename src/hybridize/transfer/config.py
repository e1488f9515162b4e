"""Public transfer configuration (names fixed by the project specification) and the source -> hybrid config map."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import HybridizeError
from ..model.config import FULL, LINEAR, HybridConfig, layer_types_from_pattern

GATE_INIT_STRATEGIES = ("ones", "zero", "small")


@dataclass
class HybridAttentionConfig:
    """Which layers become Gated DeltaNet.

    Layer i is DeltaNet when `i % pattern_period in deltanet_layer_pattern`; the default 3:1 pattern keeps every
    fourth layer as gated softmax attention. `attention_layers`, when given, lists the attention layers explicitly
    and overrides the pattern (e.g. layers chosen by a KL-guided search).
    """

    deltanet_layer_pattern: list[int] = field(default_factory=lambda: [0, 1, 2])
    pattern_period: int = 4
    attention_layers: list[int] | None = None

    def layer_types(self, num_layers: int) -> list[str]:
        if self.attention_layers is not None:
            bad = [i for i in self.attention_layers if not 0 <= i < num_layers]
            if bad:
                raise HybridizeError(f"attention layers {bad} are out of range for a {num_layers}-layer source")
            keep = set(self.attention_layers)
            return [FULL if i in keep else LINEAR for i in range(num_layers)]
        if self.pattern_period < 1:
            raise HybridizeError(f"pattern_period must be >= 1, got {self.pattern_period}")
        bad = [i for i in self.deltanet_layer_pattern if not 0 <= i < self.pattern_period]
        if bad:
            raise HybridizeError(f"pattern entries {bad} must lie in [0, {self.pattern_period - 1}]")
        return layer_types_from_pattern(num_layers, self.deltanet_layer_pattern, self.pattern_period)


@dataclass
class CrossArchTransferConfig:
    """How a source transformer becomes a hybrid, and how the result is healed.

    gate_init_strategy: "ones" (gate rows 0 and o_proj doubled: attention layers equal the source exactly),
    "zero" (gate rows 0, no compensation: attention output halved), "small" (gate rows N(0, 0.01^2), o_proj
    doubled). The distillation fields configure `DistillationTrainer`.

    calibrate_data: text (any format `distill` reads) on which each DeltaNet layer is fitted to the teacher's
    attention output before the hybrid is returned or written (`transfer/calibrate.py`); None keeps the
    uncalibrated init of `transfer/init.py`. The other calibrate_* fields (CLI: --calibrate-tokens, ...) size
    that fit.
    """

    source_model: str | None = None
    hybrid_attention: HybridAttentionConfig = field(default_factory=HybridAttentionConfig)
    gate_init_strategy: str = "ones"
    use_distillation: bool = True
    distillation_temperature: float = 2.0
    distillation_alpha: float = 0.5
    seed: int = 0
    calibrate_data: list[str] | None = None
    calibrate_tokens: int = 16_384
    calibrate_seq_len: int = 512
    calibrate_steps: int = 0
    calibrate_batch_size: int = 4
    calibrate_lr: float = 1e-3

    def __post_init__(self):
        if self.gate_init_strategy not in GATE_INIT_STRATEGIES:
            choices = ", ".join(GATE_INIT_STRATEGIES)
            raise HybridizeError(f"unknown gate_init_strategy {self.gate_init_strategy!r}; choose one of {choices}")
        if self.distillation_temperature <= 0:
            raise HybridizeError("distillation_temperature must be > 0")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise HybridizeError("distillation_alpha must lie in [0, 1]")
        if isinstance(self.calibrate_data, str):
            self.calibrate_data = [self.calibrate_data]
        if self.calibrate_data is not None and not self.calibrate_data:
            raise HybridizeError("calibrate_data is empty: name at least one file or folder (or None: no calibration)")
        for name in ("calibrate_tokens", "calibrate_seq_len", "calibrate_batch_size"):
            if getattr(self, name) < 1:
                raise HybridizeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.calibrate_steps < 0:
            raise HybridizeError(f"calibrate_steps must be >= 0, got {self.calibrate_steps}")
        if not self.calibrate_lr > 0:
            raise HybridizeError(f"calibrate_lr must be > 0, got {self.calibrate_lr}")


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def hybrid_config_from_source(source_config, family: str, attention: HybridAttentionConfig) -> HybridConfig:
    """Build the hybrid's config from a Qwen3 / Llama-family source config (already validated as supported).

    DeltaNet layers get as many q/k/v heads as the source has query heads (k/v are repeated), each of the source's
    head_dim, so that every attention weight has a place to go.
    """
    n_layers = source_config.num_hidden_layers
    heads = source_config.num_attention_heads
    head_dim = _head_dim(source_config)
    rope = dict(source_config.rope_parameters or {})
    rope.setdefault("rope_type", "default")
    rope["partial_rotary_factor"] = 1.0
    return HybridConfig(
        vocab_size=source_config.vocab_size,
        hidden_size=source_config.hidden_size,
        intermediate_size=source_config.intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=source_config.num_key_value_heads or heads,
        head_dim=head_dim,
        hidden_act=source_config.hidden_act,
        max_position_embeddings=source_config.max_position_embeddings,
        initializer_range=getattr(source_config, "initializer_range", 0.02),
        rms_norm_eps=source_config.rms_norm_eps,
        tie_word_embeddings=bool(source_config.tie_word_embeddings),
        rope_parameters=rope,
        attention_qk_norm=family in ("qwen3", "qwen3_5_text"),
        linear_key_head_dim=head_dim,
        linear_value_head_dim=head_dim,
        linear_num_key_heads=heads,
        linear_num_value_heads=heads,
        layer_types=attention.layer_types(n_layers),
        source_model_type=source_config.model_type,
        pad_token_id=source_config.pad_token_id,
        bos_token_id=source_config.bos_token_id,
        eos_token_id=source_config.eos_token_id,
    )
