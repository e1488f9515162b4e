"""The distillation loop: one pass of `fit` reads top to bottom.

    step:  micro-batches → objective sums → backward of (sum / global target tokens) → clip → AdamW → schedule
    every save_every steps: a DCP checkpoint (model, optimizer, scheduler, data position, RNG)
    every step: one JSON line in RUN_DIR/metrics.jsonl; every eval_every steps: one in RUN_DIR/eval.jsonl

Losses are averaged over every target token of the global batch (all micro-batches of all ranks), so the same
global batch trains the same model on 1 or N processes; with MTP heads (config.mtp_weight > 0) each depth's loss is
averaged over that depth's target tokens the same way. A step whose loss or gradient norm is not finite is
skipped and logged; after `max_bad_steps` such steps the run stops.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..errors import HybridizeError
from ..ops.dispatch import fla_available
from ..output import atomic_output_folder, copy_side_files, json_safe
from ..transfer.config import CrossArchTransferConfig
from .checkpoint import (
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    load_scheduler_state,
    read_trainer_state,
    remove_unfinished,
    save_checkpoint,
)
from .config import FIXED_FIELDS, DistillConfig, as_distill_config, mtp_switch, schedule_changes
from .evaluate import evaluate
from .losses import IGNORE_INDEX, depth_targets, next_token_targets
from .models import check_pair
from .mtp import add_mtp_heads
from .objective import DistillationObjective
from .parallelize import DistEnv, Parallelized, broadcast_from_rank0, full_states, init_distributed, parallelize
from .signals import StopSignals

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"


def lr_at(step: int, config: DistillConfig, total_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, total_steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases, A_log, dt_bias)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _mtp_mean(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The MTP loss: the mean over depths of each depth's cross-entropy per target token (DeepSeek-V3's
    L_MTP = (1/D)·Σ_k L_k), from (depths,) sums and counts."""
    return (sums / counts.to(sums.dtype).clamp(min=1)).mean()


def _full_value(t: torch.Tensor) -> float:
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _append_json(path: Path, record: dict) -> None:
    """One strict-JSON line: NaN / inf become null (with the keys listed in "non_finite"), see output.json_safe."""
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _truncate_log(path: Path, last_step: int) -> None:
    """Drop log lines past `last_step`: a resumed run re-does those steps. A line a kill cut short is dropped too."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept = [line for line in lines if (step := _step_of(line)) is not None and step <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def holds_run(run_dir: Path) -> bool:
    """Whether a distill run was started in `run_dir` (even one that never saved a checkpoint)."""
    return (run_dir / METRICS_FILE).exists() or checkpoint_root(run_dir).is_dir()


def check_run_dir(run_dir: Path, resume: bool, config: DistillConfig | None = None, override: bool = False
                  ) -> Path | None:
    """The checkpoint to resume from (None: start at step 0); refuse to mix two runs in one folder.

    `--resume` on a run without a complete checkpoint (killed before its first save, stopped by NaN steps with
    --save-every 0, a failed save) restarts it from step 0 rather than leaving a folder nothing can continue. With
    `config`, a resume whose schedule-changing settings differ from the checkpoint's is refused unless `override`.
    """
    checkpoint = latest_checkpoint(run_dir)
    if not resume:
        if holds_run(run_dir):
            again = " (it has no complete checkpoint, so it restarts from step 0)" if checkpoint is None else ""
            raise HybridizeError(f"{run_dir} already holds a run: pass --resume to continue it{again}, or choose a "
                                 f"new --out")
        return None
    if checkpoint is None:
        if not holds_run(run_dir):
            raise HybridizeError(f"nothing to resume: {run_dir} holds no run; drop --resume to start one")
        return None
    if config is not None:
        saved = read_trainer_state(checkpoint)["config"]
        fixed = schedule_changes(saved, config, FIXED_FIELDS) + mtp_switch(saved, config)
        if fixed:
            raise HybridizeError(f"--resume cannot change {'; '.join(fixed)} (the data order and the optimizer state "
                                 f"depend on them); pass the values the run was started with")
        changes = schedule_changes(saved, config)
        if changes and not override:
            raise HybridizeError(f"--resume with settings that change the run: {'; '.join(changes)}; pass the "
                                 f"values the run was started with, or add --override to continue with the new ones")
    return checkpoint


def _any_rank(flag: bool, env: DistEnv | None) -> bool:
    """Whether `flag` is set on any rank (all ranks then raise together; none waits at a barrier forever)."""
    if env is None or not dist.is_initialized():
        return flag
    value = torch.tensor(float(flag), device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _add_seeded_heads(student: nn.Module, config: DistillConfig) -> None:
    """`add_mtp_heads`, drawing fresh heads from config.seed alone (the same heads for the same seed whatever ran
    before, and the global RNG is left as it was), and make them trainable whatever config.train froze: they are
    in the loss."""
    device = student.lm_head.weight.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        add_mtp_heads(student, config.mtp_depths)
    student.mtp.requires_grad_(True)


class DistillationTrainer:
    """Heals a hybrid `student` toward its `teacher` by knowledge distillation.

    `config` is a DistillConfig, or a CrossArchTransferConfig whose distillation_temperature / distillation_alpha
    (default 2.0 / 0.5) set the loss. `teacher=None` with alpha 0 fine-tunes on cross-entropy alone.

    `compute_loss` works on plain modules (tests, notebooks); `fit` lays both models out for training
    (`parallelize`: FSDP2 over the processes torchrun started, plain modules in one process unless
    config.sharding says "fsdp") and runs the resumable loop.

    With config.mtp_weight > 0 the student gets MTP heads if it has none (`add_mtp_heads`, as train-mtp does,
    seeded by config.seed), with config.mtp_depths depths when given, and they train whatever config.train says
    (they are in the loss); construct the trainer before anything else reads the student's parameters
    (a trainable-parameter count, an optimizer).
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module,
                 config: DistillConfig | CrossArchTransferConfig | None = None):
        self.config = as_distill_config(config)
        if teacher is not None:
            check_pair(teacher, student, self.config.aligns)
        elif self.config.alpha > 0 or self.config.aligns:
            raise HybridizeError("without a teacher only cross-entropy can train: set alpha 0 and no alignment")
        if self.config.mtp:
            _add_seeded_heads(student, self.config)
        self.student, self.teacher = student, teacher
        kd_weight, ce_weight = self._head_weights()
        self.objective = DistillationObjective(student, teacher, self.config.temperature,
                                               align=self.config.aligns, chunk_tokens=self.config.chunk_tokens,
                                               kd_weight=kd_weight, ce_weight=ce_weight, mtp=self.config.mtp)
        self.env: DistEnv | None = None
        self.parallel: Parallelized | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.finished = False

    # ------------------------------------------------------------------------------------------ the loss
    def _head_weights(self) -> tuple[float, float]:
        """Weights of KD and CE in the loss: (α, 1 − α), or none with --align-only."""
        cfg = self.config
        return (0.0, 0.0) if cfg.align_only else (cfg.alpha, 1.0 - cfg.alpha)

    def _combine(self, kd, ce, align):
        kd_weight, ce_weight = self._head_weights()
        return kd_weight * kd + ce_weight * ce + self._align_weight() * align

    def _align_weight(self) -> float:
        return 1.0 if self.config.align_only else self.config.align_weight

    def _loss_sum(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """The differentiable loss sum: the head's weighted KD + CE, plus the weighted alignment."""
        if "align_sum" not in sums:
            return sums["loss_sum"]
        return sums["loss_sum"] + self._align_weight() * sums["align_sum"]

    def compute_loss(self, input_ids: torch.Tensor, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """loss = α·KD + (1−α)·CE (+ w·alignment) (+ mtp_weight·MTP), each a mean over this batch's target tokens
        (MTP: the mean over depths of each depth's mean).

        Labels are aligned with the inputs (shifted inside); −100 and padded positions are ignored. Only `loss`
        carries gradients; `kd_loss`, `task_loss` (and `align_loss`, `mtp_loss`) are its parts, as values.
        """
        sums = self.objective(input_ids, labels, attention_mask)
        n = sums["count"].clamp(min=1)
        kd, ce = sums["kd_sum"].detach() / n, sums["ce_sum"].detach() / n
        out = {"loss": self._loss_sum(sums) / n, "kd_loss": kd, "task_loss": ce}
        if "align_sum" in sums:
            out["align_loss"] = (sums["align_sum"] / n).detach()
        if "mtp_sums" in sums:
            mtp = _mtp_mean(sums["mtp_sums"], sums["mtp_counts"])
            out["loss"] = out["loss"] + self.config.mtp_weight * mtp
            out["mtp_loss"] = mtp.detach()
        return out

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, total_steps: int) -> DistEnv:
        """Process group, sharding (or not: `parallelize` decides), optimizer and schedule (once)."""
        if self.env is not None:
            return self.env
        env = init_distributed()
        states = full_states(self.objective) if env.is_main and env.world_size > 1 else None
        self.parallel = parallelize(self.objective, env, self.config.compute_dtype(env.device.type),
                                    self.config.grad_checkpointing, self.config.sharding)
        broadcast_from_rank0(self.objective, env, states)  # other ranks may hold meta-device skeletons
        del states
        cfg = self.config
        self.optimizer = torch.optim.AdamW(_param_groups(self.student, cfg.weight_decay), lr=cfg.lr,
                                           betas=(0.9, 0.95), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_at(step, cfg, total_steps) / cfg.lr)
        self.env = env
        return env

    # ------------------------------------------------------------------------------------------ one step
    def _global_counts(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Target tokens of the global batch: [next-token targets, then each MTP depth's when its heads train]."""
        depths = self.student.config.num_predict_tokens if self.config.mtp else 0
        kinds = [next_token_targets] + [partial(depth_targets, attention_mask=None, k=k) for k in range(1, depths + 1)]
        local = [sum(int((targets(mb) != IGNORE_INDEX).sum()) for mb in micro_batches) for targets in kinds]
        counts = torch.tensor(local, dtype=torch.float32, device=self.env.device)
        dist.all_reduce(counts)
        return counts

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict:
        """Forward/backward over this rank's micro-batches and one optimizer step; returns the step's metrics."""
        env, cfg = self.env, self.config
        self.objective.train()
        counts = self._global_counts(micro_batches)
        count, mtp_counts = counts[0], counts[1:]
        sums = torch.zeros(3 + len(mtp_counts), device=env.device)  # kd, ce, align, MTP depths over this rank's tokens
        with self.parallel.compute_weights():  # float32 gradients on the master weights after it
            for i, mb in enumerate(micro_batches):
                mb = mb.to(env.device, non_blocking=True)
                with self.parallel.micro_step(last=i == len(micro_batches) - 1):  # gradients reduced once per step
                    out = self.objective(mb, mb)
                    align = out.get("align_sum", out["kd_sum"].new_zeros(()))
                    mtp = out.get("mtp_sums", out["kd_sum"].new_zeros((0,)))
                    # FSDP averages gradients over ranks; × world_size turns that into a sum over the global batch
                    rank_loss = self._loss_sum(out) * (env.world_size / count)
                    if self.config.mtp:
                        rank_loss = rank_loss + self.config.mtp_weight * _mtp_mean(mtp * env.world_size, mtp_counts)
                    rank_loss.backward()
                sums += torch.cat([torch.stack([out["kd_sum"], out["ce_sum"], align]), mtp]).detach().float()
        dist.all_reduce(sums)
        kd, ce, align = (sums[:3] / count).tolist()
        loss = self._combine(kd, ce, align)
        if self.config.mtp:
            mtp_loss = float(_mtp_mean(sums[3:], mtp_counts))
            loss += self.config.mtp_weight * mtp_loss
        params = [p for p in self.student.parameters() if p.requires_grad]
        grad_norm = _full_value(torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf))
        lr = self.scheduler.get_last_lr()[0]
        ok = math.isfinite(loss) and math.isfinite(grad_norm) and math.isfinite(lr)
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        record = {"loss": loss, "kd_loss": kd, "task_loss": ce, "lr": lr, "grad_norm": grad_norm}
        if self.objective.align:
            record["align_loss"] = align
        if self.config.mtp:
            record["mtp_loss"] = mtp_loss
        if not ok:
            record = {k: (v if math.isfinite(v) else None) for k, v in record.items()}
            record["skipped"] = "non-finite loss or gradient"
        return record

    # ------------------------------------------------------------------------------------------ the loop
    def _state(self, step: int, tokens: int, batches, bad_steps: int) -> dict:
        return {"step": step, "tokens": tokens, "data": batches.state_dict(), "bad_steps": bad_steps,
                "scheduler": self.scheduler.state_dict(), "config": self.config.to_dict()}

    def fit(self, batches, run_dir: str | Path, eval_windows: torch.Tensor | None = None, resume: bool = False,
            progress: bool = True, override: bool = False) -> dict:
        """Train for `config.steps` / `config.tokens` / one epoch of `batches` (a train.data.PackedBatches built
        for this rank), or until `config.stop_at`. Returns the last step's metrics; `self.finished` tells whether
        the schedule ran to its end. `override` accepts a resume whose schedule settings differ (check_run_dir)."""
        cfg, run_dir = self.config, Path(run_dir)
        total = cfg.total_steps(batches.num_windows)
        env = self.setup(total)
        checkpoint = check_run_dir(run_dir, resume, cfg, override)  # every rank checks: all fail together
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            remove_unfinished(run_dir)
            if resume and checkpoint is None:
                print(f"hybridize: note: {run_dir} has no complete checkpoint; starting it again from step 0",
                      file=sys.stderr)
        step, tokens, bad_steps = 0, 0, 0
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, self.student, self.optimizer, env.rank, env.device)
            batches.load_state_dict(state["data"])
            step, tokens, bad_steps = state["step"], state["tokens"], state["bad_steps"]
            # the lr itself came back with the optimizer
            load_scheduler_state(self.scheduler, state["scheduler"], checkpoint)
        if env.is_main and resume:  # a resumed run re-does the steps after its checkpoint (all of them: none)
            _truncate_log(run_dir / METRICS_FILE, step)
            _truncate_log(run_dir / EVAL_FILE, step)
        record: dict = {"step": step, "tokens": tokens}  # what a run that is already finished reports
        bar = tqdm(total=total, initial=step, unit="step", desc="distill", disable=not (progress and env.is_main))
        if env.is_main and step < total and env.device.type == "cuda" and fla_available():
            print("hybridize: note: the first step compiles and autotunes fla's Triton kernels for these shapes "
                  "(186 s for SmolLM2 on a fresh H200, two runs at once; cached in TRITON_CACHE_DIR, default "
                  "~/.triton/cache, for later runs)", file=sys.stderr)
        with StopSignals() as stop:
            end = total if cfg.stop_at is None else min(total, cfg.stop_at)
            while step < end:
                start = time.perf_counter()
                record = self.train_step(batches.next_step())
                step, tokens = step + 1, tokens + batches.tokens_per_step
                if env.device.type == "cuda":
                    torch.cuda.synchronize(env.device)
                tok_per_s = batches.tokens_per_step / (time.perf_counter() - start)
                record = {"step": step, **record, "tokens": tokens, "tok_per_s": round(tok_per_s, 1)}
                bad_steps += self._log_step(run_dir, record, bar, bad_steps)
                if eval_windows is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                    self._evaluate(run_dir, step, eval_windows, batches.micro_batch)
                stopping = stop.requested(env.device)
                if (cfg.save_every and step % cfg.save_every == 0) or step == end or stopping:
                    save_checkpoint(run_dir, step, self.student, self.optimizer,
                                    self._state(step, tokens, batches, bad_steps), env.rank, env.device, cfg.keep)
                if stopping:
                    raise HybridizeError(f"interrupted at step {step}; checkpoint saved: continue with --resume")
        bar.close()
        self.finished = step >= total
        return record

    def _log_step(self, run_dir: Path, record: dict, bar, bad_steps: int) -> int:
        """Write the metrics line and update the bar; returns 1 for a skipped step (and stops after too many)."""
        if self.env.is_main:
            _append_json(run_dir / METRICS_FILE, record)
        bar.update(1)
        if "skipped" not in record:
            mtp = {"mtp": f"{record['mtp_loss']:.4f}"} if "mtp_loss" in record else {}
            bar.set_postfix(loss=f"{record['loss']:.4f}", kd=f"{record['kd_loss']:.4f}", **mtp,
                            tok_s=f"{record['tok_per_s']:,.0f}")
            return 0
        bad_steps += 1
        if self.env.is_main:
            tqdm.write(f"step {record['step']}: non-finite loss or gradient, skipped ({bad_steps} so far)",
                       file=sys.stderr)
        if bad_steps >= self.config.max_bad_steps:
            last = latest_checkpoint(run_dir)
            if last is None:
                fix = ("no checkpoint was written yet; check the data, or restart from step 0 with a lower --lr and "
                       "--resume")
            else:
                fix = f"check the data, or continue from {last.name} with a lower --lr and --resume --override"
            raise HybridizeError(f"stopped: {bad_steps} steps had a non-finite loss or gradient; {fix}")
        return 1

    def _evaluate(self, run_dir: Path, step: int, windows: torch.Tensor, batch_size: int) -> None:
        with self.parallel.compute_weights():
            result = evaluate(self.objective, windows, batch_size, self.env)
        if self.env.is_main:
            _append_json(run_dir / EVAL_FILE, {"step": step, **result})
            tqdm.write(f"step {step}: eval {json.dumps(result)}", file=sys.stderr)

    # ------------------------------------------------------------------------------------------ export
    def save_final(self, out: str | Path, dtype: torch.dtype, side_files: list[Path] = (), force: bool = True
                   ) -> None:
        """Gather the student and write it as an HF folder (rank 0 writes; collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True,
                                                                            cpu_offload=True))
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if _any_rank(bool(bad), self.env):
            raise HybridizeError(
                f"the trained student has non-finite weights (e.g. {bad[0] if bad else 'on another rank'}), so {out} "
                f"was not written; lower --lr and continue from an earlier checkpoint with --resume --override")
        if self.env is None or self.env.is_main:
            config = self.student.config
            with torch.device("meta"):
                model = type(self.student)(config)
            model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)  # strict: all or error
            model.tie_weights()
            model.config.dtype = dtype
            with atomic_output_folder(out, force=force) as tmp:
                model.save_pretrained(tmp)
                copy_side_files(side_files, tmp, config)
        if dist.is_initialized():
            dist.barrier()
