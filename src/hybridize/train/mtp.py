"""`hybridize train-mtp`: train a hybrid's MTP heads alone, backbone frozen, on the backbone's own predictions.

Retrofitted heads get their acceptance from self-distillation: what speculative decoding accepts is the
backbone's own next token, not the corpus's, so depth k at position i is trained on the backbone's prediction at
position i+k (teacher-forced on the corpus tokens): by default its argmax (`targets="argmax"`, cross-entropy), or
its whole distribution (`"soft"`, KL(p ‖ q) per depth, Medusa-2's self-distillation). The two tied on SmolLM2
(CPU, 123k tokens: 1.31 tokens per verify each; docs/BENCHMARKS.md) and soft costs a (B, T, V) distribution
per batch, so argmax stays the default. The backbone
runs once per batch under no_grad; only `mtp.*` has gradients. The learning rate warms up linearly over
`warmup` steps (None: 5 %) and decays along a cosine to a tenth of `lr`. On CUDA the step runs under bfloat16
autocast (the heads' weights and AdamW stay float32). A model without heads gets fresh ones
(mtp_num_hidden_layers = 1).

Resumable: while it trains, the run lives in the work folder `OUT.partial/` beside OUT: `settings.json` (the
settings a resume must repeat) and `checkpoints/step_N/` every `save_every` steps and at `stop_at`, each holding
`mtp.safetensors` (the heads only: the backbone is frozen and comes from MODEL), `optimizer.pt` (AdamW's state
and the RNG state: tensors and plain values only, loaded with weights_only=True) and `trainer_state.json` (step,
per-step losses, data position). A checkpoint is written as `step_N.tmp` and renamed when complete; older ones
are then deleted. `resume=True` continues from the latest one exactly (same losses, same heads as an uninterrupted
run); the work folder is removed once OUT is in place.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..device import resolve_device
from ..errors import HybridizeError
from ..model.modeling import HybridForCausalLM
from ..model.mtp import MultiTokenPredictor, mtp_depth_losses, mtp_depth_states
from ..output import TOKENIZER_FILES, atomic_output_folder, check_not_an_input, check_output_folder, copy_side_files
from .checkpoint import PREFIX, STATE_FILE, checkpoint_root, complete_checkpoints, remove_unfinished
from .data import PackedBatches, load_or_build_tokens
from .models import load_tokenizer
from .signals import StopSignals

WORK_SUFFIX = ".partial"  # OUT.partial/: the run's checkpoints until OUT is written
SETTINGS_FILE = "settings.json"
HEADS_FILE = "mtp.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
TARGETS = ("argmax", "soft")


@dataclass
class TrainMTPConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-3
    warmup: int | None = None  # linear warmup steps (None: 5 % of steps), then cosine to lr / 10
    targets: str = "argmax"  # argmax: cross-entropy on the backbone's argmax; soft: KL to its distribution
    num_predict_tokens: int | None = None  # None: keep the model's
    seed: int = 0
    save_every: int = 100  # checkpoint every N steps (0: none until the end; `stop_at` always saves)
    stop_at: int | None = None  # end this invocation after this step with a checkpoint; resume continues
    device: str = "auto"  # where it trains: the GPU when there is one (see hybridize.device)

    def __post_init__(self):
        if self.save_every < 0:
            raise HybridizeError(f"save_every must be >= 0, got {self.save_every}")
        if self.stop_at is not None and self.stop_at < 1:
            raise HybridizeError(f"stop_at must be >= 1, got {self.stop_at}")
        if self.targets not in TARGETS:
            raise HybridizeError(f"targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if self.warmup is not None and self.warmup < 0:
            raise HybridizeError(f"warmup must be >= 0, got {self.warmup}")

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): linear warmup, then a cosine from lr to lr / 10."""
        warmup = max(1, self.steps // 20) if self.warmup is None else self.warmup
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, self.steps - warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def settings(self) -> dict:
        """What a resume must repeat: everything but when this invocation stops or saves."""
        return {k: v for k, v in asdict(self).items() if k not in ("save_every", "stop_at", "device")}


def self_distillation_labels(model: HybridForCausalLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the backbone's normed hidden states, labels whose position j+1 holds the backbone's argmax at j): with
    these labels `mtp_depth_losses` scores depth k at i on the token the backbone itself predicts at i+k."""
    with torch.no_grad():
        hidden, _ = model.model(input_ids)
        predicted = model.lm_head(hidden).argmax(-1)  # (B, T): the backbone's next token after each position
    return hidden, torch.cat([input_ids[:, :1], predicted[:, :-1]], dim=1)


def add_mtp_heads(model: HybridForCausalLM, num_predict_tokens: int | None) -> None:
    """Give a model without MTP heads fresh ones (random, as `_init_weights` makes them) on the model's device and
    in its dtype (a meta-device skeleton gets meta heads, filled by rank 0's broadcast); set the depth count.
    Shared by `train-mtp` and `distill --mtp` (DistillationTrainer)."""
    if num_predict_tokens is not None:
        model.config.num_predict_tokens = num_predict_tokens
    if model.mtp is None:
        model.config.mtp_num_hidden_layers = 1
        weight = model.lm_head.weight
        with torch.device(weight.device):
            mtp = MultiTokenPredictor(model.config)
        mtp.apply(model._init_weights)
        model.mtp = mtp.to(weight.dtype)
    model.config.validate_mtp()


def mtp_optimizer(model: HybridForCausalLM, config: TrainMTPConfig) -> torch.optim.AdamW:
    """Freeze everything but `mtp.*`; AdamW over the heads."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("mtp."))
    return torch.optim.AdamW(model.mtp.parameters(), lr=config.lr, weight_decay=0.0)


def soft_depth_losses(model: HybridForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """KL(backbone ‖ head) of each depth k = 1..num_predict_tokens, shape (depths,): depth k at position i is
    scored against the backbone's distribution at position i+k (both predict token i+k+1), averaged over
    positions; a depth with no position scores 0. Aligned like `mtp_depth_losses` with self-distillation labels."""
    with torch.no_grad():
        hidden, _ = model.model(input_ids)
        target = F.log_softmax(model.lm_head(hidden).float(), dim=-1)  # (B, T, V): backbone at each position
    depths = model.config.num_predict_tokens
    losses = [target.new_zeros(()) for _ in range(depths)]
    for k, h in mtp_depth_states(model.mtp, hidden, model.model.embed_tokens(input_ids), None, depths):
        head = F.log_softmax(model.lm_head(h[:, :-1]).float(), dim=-1)  # positions 0..T-k-2
        p = target[:, k: k + head.shape[1]]
        losses[k - 1] = F.kl_div(head, p, reduction="none", log_target=True).sum(-1).mean()
    return torch.stack(losses)


def _mtp_losses(model: HybridForCausalLM, ids: torch.Tensor, targets: str) -> torch.Tensor:
    if targets == "soft":
        return soft_depth_losses(model, ids)
    hidden, labels = self_distillation_labels(model, ids)
    return mtp_depth_losses(model.mtp, model.lm_head, hidden, model.model.embed_tokens(ids), labels, None,
                            model.config.num_predict_tokens)


def _mtp_step(model: HybridForCausalLM, opt: torch.optim.Optimizer, ids: torch.Tensor, config: TrainMTPConfig,
              step: int) -> list[float]:
    """One AdamW step of the heads on a batch (bfloat16 autocast on CUDA); returns the per-depth losses."""
    for group in opt.param_groups:
        group["lr"] = config.lr_at(step)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda):
        losses = _mtp_losses(model, ids, config.targets)
    opt.zero_grad(set_to_none=True)
    losses.mean().backward()
    opt.step()
    return losses.tolist()


SaveFn = Callable[[int, torch.optim.Optimizer, list[list[float]]], None]


def train_mtp(model: HybridForCausalLM, batches: PackedBatches, config: TrainMTPConfig, progress: bool = False,
              optimizer: torch.optim.Optimizer | None = None, history: list[list[float]] | None = None,
              save: SaveFn | None = None) -> list[list[float]]:
    """Train `model.mtp` in place, backbone frozen; returns each step's per-depth losses.

    A resume passes the restored `optimizer` and `history` (training continues at step len(history)); `save(step,
    optimizer, history)` is called every `config.save_every` steps and at `config.stop_at`, where training ends,
    and after the current step on SIGTERM / Ctrl-C (then KeyboardInterrupt is raised: the CLI exits 130)."""
    opt = optimizer if optimizer is not None else mtp_optimizer(model, config)
    history = [] if history is None else history
    end = config.steps if config.stop_at is None else min(config.steps, config.stop_at)
    model.train()
    device = model.lm_head.weight.device
    first, t0 = len(history), time.perf_counter()
    with StopSignals() as stop:
        for step in range(first, end):
            history.append(_mtp_step(model, opt, torch.cat(batches.next_step()).long().to(device), config, step))
            done = step + 1
            if progress and (step % 10 == 0 or done == config.steps):
                rate = (done - first) * config.batch_size * config.seq_len / (time.perf_counter() - t0)
                print(f"step {done}/{config.steps}: " + " ".join(f"L{k + 1} {v:.3f}" for k, v in
                                                             enumerate(history[-1])) + f" ({rate:,.0f} tok/s)",
                      flush=True)
            if stop.flag:  # SIGTERM / Ctrl-C: keep every finished step, then stop like an interrupt
                if save is not None:
                    save(done, opt, history)
                    print(f"train-mtp: stopped after step {done}; --resume continues from it", flush=True)
                raise KeyboardInterrupt
            if save is not None and done < config.steps and (
                    done == config.stop_at or (config.save_every and done % config.save_every == 0)):
                save(done, opt, history)
    model.eval()
    return history


# ------------------------------------------------------------------------------------------------ checkpoints


def work_folder(out: Path) -> Path:
    return out.parent / f"{out.name}{WORK_SUFFIX}"


def save_mtp_checkpoint(work: Path, step: int, model: HybridForCausalLM, optimizer: torch.optim.Optimizer,
                        history: list[list[float]], batches: PackedBatches) -> Path:
    """Write `work/checkpoints/step_N` atomically (a `.tmp` folder renamed when complete), then drop older ones."""
    root = checkpoint_root(work)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step}"
    tmp = root / f"{PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    heads = {n: p.detach().contiguous() for n, p in model.state_dict().items() if n.startswith("mtp.")}
    save_file(heads, tmp / HEADS_FILE)
    torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / OPTIMIZER_FILE)
    state = {"step": step, "history": history, "data": batches.state_dict(),
             "num_predict_tokens": model.config.num_predict_tokens}
    (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in complete_checkpoints(work):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_mtp_checkpoint(path: Path, model: HybridForCausalLM, optimizer: torch.optim.Optimizer,
                        batches: PackedBatches) -> list[list[float]]:
    """Restore the heads, AdamW, the RNG and the data position from `path`; returns the loss history."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        heads = load_file(path / HEADS_FILE)
        saved = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a damaged checkpoint is a one-line error)
        raise HybridizeError(f"cannot read the checkpoint {path}: {type(e).__name__}: {e}".splitlines()[0]) from e
    mine = {n for n in model.state_dict() if n.startswith("mtp.")}
    if set(heads) != mine:
        raise HybridizeError(f"the checkpoint {path} holds other MTP tensors than the model's heads; "
                             f"pass --force to start over")
    model.load_state_dict(heads, strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    batches.load_state_dict(state["data"])
    history = state["history"]
    if len(history) != state["step"]:
        raise HybridizeError(f"the checkpoint {path} is inconsistent: step {state['step']} with "
                             f"{len(history)} losses; pass --force to start over")
    return history


def open_work_folder(work: Path, settings: dict, resume: bool, force: bool) -> Path | None:
    """Prepare `work` for this run; returns the checkpoint to resume from (None: start at step 0)."""
    if work.exists() and not resume:
        if not force:
            raise HybridizeError(f"{work} holds an unfinished train-mtp run: pass --resume to continue it, or "
                                 f"--force to start over")
        shutil.rmtree(work)
    if resume and not work.is_dir():
        raise HybridizeError(f"nothing to resume: {work} does not exist; drop --resume to start a run")
    if not work.exists():
        return None  # created by `start_work_folder` once the model and the data have loaded
    try:
        saved = json.loads((work / SETTINGS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise HybridizeError(f"{work} has no readable {SETTINGS_FILE}; pass --force to start over") from e
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
    changed += [f"{k} {saved[k]!r} -> (none)" for k in saved if k not in settings]
    if changed:
        raise HybridizeError(f"--resume with settings other than the run's: {'; '.join(changed)}; pass the values "
                             f"the run was started with, or --force to start over")
    remove_unfinished(work)
    found = complete_checkpoints(work)
    return found[-1] if found else None


def start_work_folder(work: Path, settings: dict) -> None:
    if not work.exists():
        work.mkdir()
        (work / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")


def run_train_mtp(model_dir: str | Path, data: list[str], out: str | Path, config: TrainMTPConfig,
                  force: bool = False, progress: bool = True, resume: bool = False) -> dict:
    """Load MODEL, train its MTP heads on `data`, write the whole model (heads included) to `out`.

    Checkpoints go to `OUT.partial/` (see the module docstring); `resume` continues from the latest one, `force`
    replaces an existing OUT and (without `resume`) discards an existing work folder. With `config.stop_at` before
    the end, nothing is written to `out` and the summary says `"stopped": true`."""
    start = time.perf_counter()
    model_dir = Path(model_dir).expanduser()
    out = check_output_folder(out, force, [model_dir, *data], what="--out")
    work = work_folder(out)
    check_not_an_input(work, [model_dir, *data], what="the work folder")
    if not (model_dir / "config.json").is_file():
        raise HybridizeError(f"{model_dir} is not a model folder: no config.json")
    settings = {"model": str(model_dir.absolute()), "data": [str(Path(d).expanduser().absolute()) for d in data],
                **config.settings()}
    checkpoint = open_work_folder(work, settings, resume, force)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = HybridForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_mtp_heads(model, config.num_predict_tokens)  # on the CPU, so a seed gives the same heads on any device
    model.to(device)
    tokenizer = load_tokenizer(model_dir)
    tokens = load_or_build_tokens(data, tokenizer, model.config.eos_token_id, None, progress=progress,
                                  vocab_size=model.config.vocab_size)
    batches = PackedBatches(tokens, config.seq_len, config.batch_size, seed=config.seed)
    start_work_folder(work, settings)
    optimizer = mtp_optimizer(model, config)
    history = None
    if checkpoint is not None:
        history = load_mtp_checkpoint(checkpoint, model, optimizer, batches)
        if progress:
            print(f"resuming from step {len(history)} ({checkpoint})", flush=True)

    def save(step: int, opt: torch.optim.Optimizer, hist: list[list[float]]) -> None:
        save_mtp_checkpoint(work, step, model, opt, hist, batches)

    first_step, train_start = len(history or []), time.perf_counter()
    history = train_mtp(model, batches, config, progress, optimizer=optimizer, history=history, save=save)
    trained_tokens = (len(history) - first_step) * config.batch_size * config.seq_len
    summary = {"output": str(out), "device": str(device), "targets": config.targets,
               "seconds": round(time.perf_counter() - start, 2),
               "tokens_per_s": round(trained_tokens / max(time.perf_counter() - train_start, 1e-9), 1),
               "steps": len(history),
               "first_losses": [round(v, 4) for v in history[0]] if history else [],
               "last_losses": [round(v, 4) for v in history[-1]] if history else []}
    if len(history) < config.steps:  # stopped at config.stop_at: the checkpoint holds the run
        return {**summary, "stopped": True, "work_folder": str(work)}
    with atomic_output_folder(out, force, inputs=[model_dir]) as tmp:
        model.save_pretrained(tmp)
        copy_side_files((model_dir / f for f in TOKENIZER_FILES), tmp, model.config)
    shutil.rmtree(work, ignore_errors=True)
    return summary


__all__ = ["TrainMTPConfig", "add_mtp_heads", "load_mtp_checkpoint", "run_train_mtp", "save_mtp_checkpoint",
           "self_distillation_labels", "soft_depth_losses", "train_mtp", "work_folder"]
