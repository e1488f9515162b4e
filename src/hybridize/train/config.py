"""Distillation settings. `hybridize distill` maps its flags 1:1 onto these fields."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import HybridizeError
from ..transfer.config import CrossArchTransferConfig

TRAINABLE = ("all", "mixers", "linear")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
SHARDINGS = ("auto", "fsdp", "none")
MTP_WEIGHT = 0.3  # `--mtp`'s weight: DeepSeek-V3's λ for most of its pre-training (0.1 only for the last part)


@dataclass
class DistillConfig:
    """How a hybrid student is healed from its teacher.

    loss = alpha·KD + (1 − alpha)·CE + align_weight·alignment, each averaged over the target tokens of a whole
    global batch; `align_only` trains on the alignment alone (the first stage of RADLADS-style recipes; KD and
    CE are still computed and logged). batch_size is global (sequences per optimizer step over all ranks and
    micro-steps), so 1 or N processes train the same model. Run length: `steps`, else `tokens`, else one pass
    over the data; `stop_at` ends this invocation after that step with a checkpoint, without changing the
    schedule (--resume continues). `train`: "all" parameters, "mixers" (every layer's token mixer: DeltaNet and
    gated attention) or "linear" (only the DeltaNet layers, the parts conversion made new). `dtype` "auto"
    computes in bfloat16 on CUDA and in float32 on CPU; master weights and optimizer state are float32 either way.
    `sharding`: "fsdp" shards student and teacher with FSDP2 over the processes, "none" trains plain modules in
    one process (no per-layer gathers, casts and hooks; the same numerics, see parallelize.Unsharded), "auto" is
    none for one process and fsdp for more. The default stays fsdp: "none" is tested on CPUs only, and its first
    H200 run (2026-12-02) did not finish its warm-up steps in 140 s where fsdp's did. It may change between
    invocations of a run (checkpoints load either way).
    `mtp_weight` > 0 trains multi-token-prediction heads jointly (a student without heads gets fresh ones): the
    loss adds mtp_weight · (mean over the depths of each depth's cross-entropy on the data tokens, see
    objective.py); `mtp_depths` sets how many (num_predict_tokens; None keeps the student's).
    """

    seq_len: int = 2048
    batch_size: int = 16
    grad_accum: int = 1
    steps: int | None = None
    tokens: int | None = None
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    temperature: float = 1.0
    alpha: float = 1.0
    align_weight: float = 0.0
    align_only: bool = False
    train: str = "all"
    dtype: str = "auto"
    grad_checkpointing: bool = False
    sharding: str = "fsdp"
    save_every: int = 500
    keep: int = 2
    eval_every: int = 0
    eval_tokens: int = 262_144
    max_bad_steps: int = 10
    chunk_tokens: int = 1024
    seed: int = 0
    stop_at: int | None = None
    mtp_weight: float = 0.0
    mtp_depths: int | None = None

    def __post_init__(self):
        floats = ("lr", "min_lr", "weight_decay", "clip", "temperature", "alpha", "align_weight", "mtp_weight")
        for name in floats:  # inf passes `lr > 0`, and an inf learning rate turns every weight into NaN
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise HybridizeError(f"{name} must be a finite number, got {value!r}")
        checks = [
            (self.seq_len >= 2, "seq_len must be >= 2"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.steps is None or self.steps >= 1, "steps must be >= 1"),
            (self.tokens is None or self.tokens >= 1, "tokens must be >= 1"),
            (self.steps is None or self.tokens is None, "give steps or tokens, not both"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (self.warmup >= 0 and self.weight_decay >= 0, "warmup and weight_decay must be >= 0"),
            (self.clip >= 0, "clip must be >= 0 (0 disables clipping)"),
            (self.temperature > 0, "temperature must be > 0"),
            (0.0 <= self.alpha <= 1.0, "alpha must lie in [0, 1]"),
            (self.align_weight >= 0, "align_weight must be >= 0"),
            (self.train in TRAINABLE, f"train must be one of {', '.join(TRAINABLE)}"),
            (self.dtype in COMPUTE_DTYPES, f"dtype must be one of {', '.join(COMPUTE_DTYPES)}"),
            (self.sharding in SHARDINGS, f"sharding must be one of {', '.join(SHARDINGS)}"),
            (self.save_every >= 0 and self.eval_every >= 0, "save_every and eval_every must be >= 0"),
            (self.keep >= 1, "keep must be >= 1"),
            (self.stop_at is None or self.stop_at >= 1, "stop_at must be >= 1"),
            (self.max_bad_steps >= 1 and self.chunk_tokens >= 1, "max_bad_steps and chunk_tokens must be >= 1"),
            (self.mtp_weight >= 0, f"mtp_weight must be >= 0 (0 trains no MTP heads), got {self.mtp_weight}"),
            (self.mtp_depths is None or (type(self.mtp_depths) is int and 1 <= self.mtp_depths <= 64),
             f"mtp_depths must be an integer in [1, 64], got {self.mtp_depths!r}"),
            (self.mtp_depths is None or self.mtp, "mtp_depths needs MTP training: give mtp_weight > 0 (--mtp)"),
        ]
        for ok, message in checks:
            if not ok:
                raise HybridizeError(message)

    def compute_dtype(self, device_type: str) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device_type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    @property
    def aligns(self) -> bool:
        """Whether the per-layer hidden-state alignment is computed."""
        return self.align_only or self.align_weight > 0

    @property
    def mtp(self) -> bool:
        """Whether MTP heads train jointly."""
        return self.mtp_weight > 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def total_steps(self, windows_per_epoch: int) -> int:
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return -(-self.tokens // self.tokens_per_step)
        return max(1, windows_per_epoch // self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)


# Settings a resumed run keeps unless --override: they change the learning-rate schedule or the loss. The rest
# (e.g. --stop-at, --save-every, --grad-accum, --grad-checkpointing, --sharding) may change between invocations.
SCHEDULE_FIELDS = ("steps", "tokens", "lr", "min_lr", "warmup", "weight_decay", "clip", "temperature", "alpha",
                   "align_weight", "align_only", "dtype", "mtp_weight", "mtp_depths")
# Settings a resumed run can never change: the data windows and their order, and the parameters the optimizer
# state belongs to.
FIXED_FIELDS = ("seq_len", "batch_size", "seed", "train")


def schedule_changes(saved: dict, config: DistillConfig, fields: tuple[str, ...] = SCHEDULE_FIELDS) -> list[str]:
    """`--flag old -> new` for every setting in `fields` that differs from the checkpoint's saved config."""
    now = config.to_dict()
    return [f"--{name.replace('_', '-')} {saved[name]} -> {now[name]}" for name in fields
            if name in saved and saved[name] != now[name]]


def mtp_switch(saved: dict, config: DistillConfig) -> list[str]:
    """`--mtp off -> on` (or on -> off) when a resume would add or drop the MTP heads: their parameters and
    optimizer state are in the checkpoint or not, so this cannot change within a run (a new weight > 0 can)."""
    weight = saved.get("mtp_weight", 0.0)
    was = isinstance(weight, (int, float)) and weight > 0
    if was == config.mtp:
        return []
    return [f"--mtp {'on' if was else 'off'} -> {'on' if config.mtp else 'off'}"]


def as_distill_config(config: DistillConfig | CrossArchTransferConfig | None) -> DistillConfig:
    """The trainer's settings from a DistillConfig, or from a CrossArchTransferConfig's distillation fields
    (temperature, alpha; `use_distillation=False` trains on cross-entropy alone), or the defaults."""
    if config is None:
        return DistillConfig()
    if isinstance(config, DistillConfig):
        return config
    if isinstance(config, CrossArchTransferConfig):
        alpha = config.distillation_alpha if config.use_distillation else 0.0
        return DistillConfig(temperature=config.distillation_temperature, alpha=alpha, seed=config.seed)
    raise TypeError(f"expected a DistillConfig or CrossArchTransferConfig, got {type(config).__name__}")
