"""`hybridize heal`: the whole healing job — convert, staged distillation, evaluation — as one resumable command.

    convert  SOURCE → OUT/hybrid (calibrated when the transfer config names calibration data)
    align    per-layer hidden-state alignment of the DeltaNet layers only, the rest frozen (RADLADS / LoLCATs
             stage 1: the new mixers learn the teacher's layer outputs before anything else moves) → OUT/align
    kd       end-to-end distillation of every parameter on the teacher's distribution → OUT/kd
    long     distillation on long windows, the same tokens per step (skipped unless long_context_tokens) → OUT/long
    final    the last stage's model as a normal model folder → OUT/final
    eval     perplexity, KL and greedy agreement against the teacher on each eval path, of the final model and
             of the fresh conversion (the 0-token point); passkey retrieval when asked → OUT/eval.json

Every stage is a `hybridize distill` run in its own folder (checkpoints, metrics.jsonl, curves.png), started from
the previous stage's `final`. OUT/heal.json records the settings and each finished stage; `resume` skips finished
stages and continues the one in progress from its last checkpoint, so a crash loses at most --save-every steps;
the evaluation keeps each finished piece (one model on one eval path, the passkey grid) and resumes with the rest.
With gpus > 1 each training stage runs as `torchrun --nproc-per-node GPUS -m hybridize distill ...`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from tqdm.auto import tqdm

from .errors import HybridizeError
from .output import atomic_output_folder, check_not_an_input, json_safe
from .train.config import DistillConfig
from .transfer.config import CrossArchTransferConfig, HybridAttentionConfig
from .transfer.select import METHODS as SELECT_METHODS

STATE_FILE = "heal.json"
STAGES = ("convert", "align", "kd", "long", "final", "eval")


@dataclass
class HealConfig:
    """What `hybridize heal` does beyond its convert and distill settings (one field per flag).

    tokens: the end-to-end KD stage's budget. align_tokens: the alignment stage's (0 skips it; None = 0 after a
    calibrated convert, tokens / 20 after a plain one), trained at align_lr. Why 0 after calibration: calibration
    already fits each DeltaNet layer to the teacher's attention on the teacher's own inputs, and one alignment step
    (raw residual-stream MSE, lr 1e-3) took the calibrated SmolLM2 hybrid from 7.1x to 88.9x the teacher's
    perplexity (CPU, 2026-12-02, 1,024 tokens); the MSE is dominated by a few large-activation dimensions.
    long_context_tokens > 0 adds a stage on long_seq_len windows (None = 4 × seq_len) at
    long_lr (None = a tenth of the KD stage's peak: it continues a healed model, it does not restart it).
    eval_tokens per eval path; eval_passkey: prompt lengths of a passkey check of the final model and the teacher
    (None = none). select_layers: a `select-layers` method whose choice of attention layers (on the training text)
    replaces the transfer config's layout; None keeps the layout. Default "kl+passkey" (the passkey scan needs text
    in the data; `hybridize heal` falls back to "kl" for .npy-only data): on SmolLM2-135M (H200, 15M KD tokens) its
    layers healed to val KL 0.320 and 68 % passkey retrieval over 1k-8k (teacher 39 %), against 0.370 / 0.368 and
    2 % for the kl layers (two seeds) and 0.463 / 0.461 and 0 % for the uniform 3:1 pattern (docs/BENCHMARKS.md,
    "Both scans at once"). gpus > 1 runs each training stage under torchrun.
    """

    tokens: int = 50_000_000
    align_tokens: int | None = None
    align_lr: float = 1e-3
    long_context_tokens: int = 0
    long_seq_len: int | None = None
    long_lr: float | None = None
    eval_tokens: int = 262_144
    eval_passkey: list[int] | None = None
    passkey_trials: int = 5
    weights_dtype: str | None = None
    select_layers: str | None = "kl+passkey"  # kl | passkey | kl+passkey | proxy: attention layers before converting
    gpus: int = 1

    def __post_init__(self):
        checks = [
            (self.tokens >= 1, "--tokens must be >= 1"),
            (self.align_tokens is None or self.align_tokens >= 0, "--align-tokens must be >= 0 (0 skips the stage)"),
            (self.long_context_tokens >= 0, "--long-context-tokens must be >= 0 (0 skips the stage)"),
            (self.long_seq_len is None or self.long_seq_len >= 2, "--long-seq-len must be >= 2"),
            (self.align_lr > 0 and (self.long_lr is None or self.long_lr > 0), "learning rates must be > 0"),
            (self.eval_tokens >= 1 and self.passkey_trials >= 1, "--eval-tokens and --passkey-trials must be >= 1"),
            (self.gpus >= 1, "--gpus must be >= 1"),
            (self.select_layers in (None, *SELECT_METHODS),
             f"--select-layers must be one of {', '.join(SELECT_METHODS)} or none"),
        ]
        for ok, message in checks:
            if not ok:
                raise HybridizeError(message)


@dataclass
class Stage:
    name: str
    config: DistillConfig
    description: str


@dataclass
class HealJob:
    """Everything one `heal` run needs; `to_dict` is what heal.json keeps and a resume compares."""

    source: str
    out: Path
    data: list[str]
    transfer: CrossArchTransferConfig
    distill: DistillConfig
    heal: HealConfig = field(default_factory=HealConfig)
    eval_data: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        transfer = asdict(self.transfer)
        return {"source": self.source, "data": self.data, "eval_data": self.eval_data, "transfer": transfer,
                "distill": self.distill.to_dict(), "heal": asdict(self.heal)}


# ------------------------------------------------------------------------------------------------ the stages
def training_stages(job: HealJob) -> list[Stage]:
    """The distillation stages in order, each a complete DistillConfig (their lengths in tokens)."""
    base, heal = replace(job.distill, steps=None, tokens=None, stop_at=None, align_only=False), job.heal
    stages = []
    align = heal.align_tokens
    if align is None:  # measured: after calibration, alignment undoes it (see HealConfig); from the no-op init, 5%
        align = 0 if job.transfer.calibrate_data else heal.tokens // 20
    if align:
        # no MTP heads yet: alignment fits the DeltaNet layers alone; the heads join in the KD stage
        stages.append(Stage("align", replace(base, tokens=align, align_only=True, train="linear", lr=heal.align_lr,
                                             min_lr=heal.align_lr / 10, warmup=min(base.warmup, _steps(align, base)),
                                             mtp_weight=0.0, mtp_depths=None),
                            f"{align:,} tokens of per-layer alignment, DeltaNet layers only"))
    stages.append(Stage("kd", replace(base, tokens=heal.tokens), f"{heal.tokens:,} tokens of end-to-end KD"))
    if heal.long_context_tokens:
        long = _long_config(base, heal)
        stages.append(Stage("long", long, f"{heal.long_context_tokens:,} tokens of KD on {long.seq_len}-token windows"))
    return stages


def _steps(tokens: int, config: DistillConfig) -> int:
    return max(1, math.ceil(tokens / config.tokens_per_step) - 1)


def _long_config(base: DistillConfig, heal: HealConfig) -> DistillConfig:
    """Long windows with the KD stage's tokens per step and per micro-step (so its memory per GPU stays close)."""
    seq_len = heal.long_seq_len or 4 * base.seq_len
    world = heal.gpus
    micro = max(1, base.batch_size // (base.grad_accum * world) * base.seq_len // seq_len)  # sequences a micro-step
    accum = max(1, base.batch_size * base.seq_len // (seq_len * micro * world))
    lr = heal.long_lr or base.lr / 10
    return replace(base, tokens=heal.long_context_tokens, seq_len=seq_len, batch_size=micro * accum * world,
                   grad_accum=accum, lr=lr, min_lr=min(base.min_lr, lr))


# ------------------------------------------------------------------------------------------------ state
def _read_state(out: Path) -> dict:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise HybridizeError(f"{out / STATE_FILE} is unreadable ({type(e).__name__}); it is not a heal folder, "
                             "or the file was damaged: start a new --out") from None


def recorded_heal_settings(out: Path) -> dict | None:
    """The HealConfig fields (as heal.json keeps them) of the heal run in `out`, None when `out` holds none."""
    return _read_state(out)["settings"].get("heal", {}) if (out / STATE_FILE).is_file() else None


def _write_json(path: Path, value: dict) -> None:
    """Whole or not at all: a crash mid-write leaves the previous file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(json_safe(value), indent=2, default=str) + "\n")
    tmp.replace(path)


def _write_state(out: Path, state: dict) -> None:
    _write_json(out / STATE_FILE, state)


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a} -> {b}")
    return out


def open_job(job: HealJob, resume: bool, override: bool) -> dict:
    """The run's state: new (OUT created) or resumed (settings checked against heal.json)."""
    out = job.out
    now = json.loads(json.dumps(job.to_dict(), default=str))
    if not resume:
        if out.exists():
            raise HybridizeError(f"{out} already exists: pass --resume to continue the heal run there, or choose a "
                                 "new OUT")
        if not out.parent.is_dir():
            raise HybridizeError(f"the parent folder of {out} does not exist")
        out.mkdir()
        state = {"settings": now, "done": {}}
        _write_state(out, state)
        return state
    if not (out / STATE_FILE).is_file():
        raise HybridizeError(f"nothing to resume: {out} holds no heal run ({STATE_FILE}); drop --resume to start one")
    state = _read_state(out)
    changes = _differences(state.get("settings", {}), now)
    if changes and not override:
        raise HybridizeError(f"--resume with settings that differ from the run's: {'; '.join(changes[:6])}; pass the "
                             "values it was started with, or add --override to continue with the new ones")
    state["settings"] = now
    return state


# ------------------------------------------------------------------------------------------------ running
def _say(message: str) -> None:
    tqdm.write(f"heal: {message}", file=sys.stderr)


def distill_argv(teacher: str, student: Path, data: list[str], run_dir: Path, config: DistillConfig,
                 eval_data: list[str], resume: bool, override: bool, progress: bool) -> list[str]:
    """`hybridize distill` arguments that rebuild `config` exactly (the CLI maps 1:1 onto DistillConfig)."""
    argv = ["distill", "--teacher", teacher, "--student", str(student), "--data", *data, "--out", str(run_dir)]
    if eval_data:
        argv += ["--eval-data", *eval_data]
    for f in fields(DistillConfig):
        value = getattr(config, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    argv += ["--resume"] * resume + ["--override"] * override + ["--no-progress"] * (not progress)
    return argv


def _tokenize_once(job: HealJob, model: Path, progress: bool) -> list[str]:
    """The training text tokenized once into OUT/data/tokens.npy (reused while the text is unchanged), so that the
    stages read token ids instead of each tokenizing the corpus again."""
    from .train.run import tokenize_cached, tokenizer_for

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    tokenize_cached(job.data, tokenizer_for(job.data, model), job.out / "data", True, progress, vocab)
    return [str(job.out / "data" / "tokens.npy")]


def _run_stage(job: HealJob, stage: Stage, student: Path, run_dir: Path, data: list[str], override: bool,
               progress: bool) -> dict:
    from .train.run import run_distill
    from .train.trainer import holds_run

    resume = holds_run(run_dir)  # started before: continue from its checkpoint (or step 0 when it has none)
    eval_data = job.eval_data[:1]
    if job.heal.gpus > 1:
        argv = distill_argv(job.source, student, data, run_dir, stage.config, eval_data, resume, override,
                            progress)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={job.heal.gpus}", "-m", "hybridize", *argv]
        code = subprocess.call(cmd, stdout=subprocess.DEVNULL)
        if code:
            raise HybridizeError(f"stage {stage.name} failed (torchrun exit status {code}; its messages are above); "
                                 "fix the cause and rerun with --resume")
        summary = {"run_dir": str(run_dir), "final": str(run_dir / "final")}
    else:
        summary = run_distill(job.source, str(student), data, str(run_dir), stage.config,
                              eval_data=eval_data or None, resume=resume, progress=progress, override=override)
    if not (run_dir / "final" / "config.json").is_file():  # a run stopped early writes no final model
        raise HybridizeError(f"stage {stage.name} ended without {run_dir / 'final'}; rerun with --resume")
    return summary


def _select_layers(job: HealJob, progress: bool) -> dict:
    """`select-layers --method job.heal.select_layers` on the training data (its defaults; passkey: one prompt per
    window, made from the text); the job converts with the chosen layers."""
    from .train.data import needs_tokenizer
    from .transfer.select import SelectConfig, select_attention_layers

    method = job.heal.select_layers
    if "passkey" in method:  # the prompts' filler is text (check_job made sure there is some)
        cfg = SelectConfig(method=method, data=[p for p in job.data if needs_tokenizer([p])], seq_len=1024,
                           batch_size=1)
    else:  # the first tokens of the training data, text or .npy
        cfg = SelectConfig(method=method, data=list(job.data))
    report = select_attention_layers(job.source, cfg, job.transfer, progress=progress)
    job.transfer = replace(job.transfer, hybrid_attention=HybridAttentionConfig(
        attention_layers=report["attention_layers"]))
    return report


def _convert(job: HealJob, progress: bool) -> dict:
    from .train.models import gguf_progress
    from .transfer.convert import convert_to_folder

    target = job.out / "hybrid"
    selection = _select_layers(job, progress) if job.heal.select_layers else None
    # a convert that died after its rename but before heal.json was written: its folder is complete, redo it anyway
    with gguf_progress(progress):
        summary = convert_to_folder(job.source, target, job.transfer, dtype=job.heal.weights_dtype, force=True,
                                    progress=progress)
    return summary if selection is None else {**summary, "selection": selection}


def _link_final(model_dir: Path, out: Path) -> None:
    """OUT/final: the last stage's model folder, hard-linked (no second copy on disk) where the filesystem allows."""
    with atomic_output_folder(out, force=True) as tmp:
        for f in sorted(model_dir.iterdir()):
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)


def _eval_settings(job: HealJob) -> dict:
    """What an evaluation's numbers depend on besides the models: a partial evaluation is reused only under these."""
    return {"eval_data": job.eval_data, "eval_tokens": job.heal.eval_tokens, "seq_len": job.distill.seq_len,
            "dtype": job.distill.dtype, "eval_passkey": job.heal.eval_passkey,
            "passkey_trials": job.heal.passkey_trials, "seed": job.distill.seed}


def _evaluate(job: HealJob, model_dir: Path, progress: bool, partial: dict, save) -> dict:
    """The evaluation of the healed model (and of the fresh conversion, the 0-token point), built piece by piece
    in `partial` with `save()` after each piece: a run killed while evaluating keeps what it finished, and
    `--resume` computes only the rest."""
    from .train.run import run_eval

    if partial.get("settings") != _eval_settings(job):
        partial.clear()
        partial["settings"] = _eval_settings(job)
    result = partial.setdefault("result", {"model": str(model_dir), "teacher": job.source, "data": {}, "fresh": {}})
    for path in job.eval_data:
        for key, folder in (("data", model_dir), ("fresh", job.out / "hybrid")):
            if path in result[key]:
                continue
            _say(f"eval of {folder.name} on {path}")
            result[key][path] = run_eval(str(folder), [path], teacher=job.source, seq_len=job.distill.seq_len,
                                         max_tokens=job.heal.eval_tokens, dtype=job.distill.dtype,
                                         chunk_tokens=job.distill.chunk_tokens, progress=progress)
            save()
    if job.heal.eval_passkey and "passkey" not in result:
        from .evals.runner import LongContextConfig, run_longctx

        _say(f"passkey at {', '.join(map(str, job.heal.eval_passkey))} tokens")
        config = LongContextConfig(lengths=list(job.heal.eval_passkey), trials=job.heal.passkey_trials,
                                   seed=job.distill.seed, dtype=job.distill.dtype)
        passkey = run_longctx(str(model_dir), config, teacher=job.source, progress=progress)
        result["passkey"] = {k: passkey[k] for k in ("lengths", "depths", "trials", "results")}
        save()
    return result


def check_job(job: HealJob) -> None:
    """Mistakes found before anything is written: missing data, an OUT that is or holds an input, --sharding none
    with --gpus > 1, a layer selection that would override an explicit layout, --select-layers passkey without
    text."""
    from .train.data import needs_tokenizer
    from .train.parallelize import resolve_sharding

    resolve_sharding(job.distill.sharding, job.heal.gpus)
    if job.heal.select_layers and job.transfer.hybrid_attention != HybridAttentionConfig():
        raise HybridizeError(f"select_layers={job.heal.select_layers!r} would replace the layout the transfer config "
                             "sets; pass select_layers=None (--select-layers none) to keep that layout")
    for path in [*job.data, *job.eval_data]:
        if not Path(path).expanduser().exists():
            raise HybridizeError(f"data path {path} does not exist")
    if "passkey" in (job.heal.select_layers or "") and not needs_tokenizer(job.data):
        raise HybridizeError(f"--select-layers {job.heal.select_layers} reads text from --data (the passkey prompts' "
                             "filler), which holds only pre-tokenized .npy arrays; pass the text, select with kl alone "
                             "(--select-layers kl), or pass --attention-layers")
    check_not_an_input(job.out, [job.source, *job.data, *job.eval_data], what="OUT")


def run_heal(job: HealJob, resume: bool = False, override: bool = False, progress: bool = True) -> dict:
    """Run (or continue) every stage of `job`; returns the summary that is also kept in OUT/heal.json."""
    start = time.perf_counter()
    job.out = Path(job.out).expanduser().absolute()
    check_job(job)
    stages = training_stages(job)
    state = open_job(job, resume, override)
    done = state["done"]
    plan = ["convert", *(s.name for s in stages), "final", *(["eval"] if job.eval_data or job.heal.eval_passkey
                                                              else [])]
    _say(f"{len(plan)} stages: {' → '.join(plan)}" + (f" (done: {', '.join(done)})" if done else ""))

    def finish(name: str, summary: dict) -> None:
        done[name] = summary
        _write_state(job.out, state)

    if "convert" not in done:
        _say(f"[1/{len(plan)}] convert {job.source} → {job.out / 'hybrid'}")
        finish("convert", _convert(job, progress))
    model = job.out / "hybrid"
    data = _tokenize_once(job, model, progress) if stages else None
    for i, stage in enumerate(stages, 2):
        run_dir = job.out / stage.name
        if stage.name not in done:
            _say(f"[{i}/{len(plan)}] {stage.name}: {stage.description} → {run_dir}")
            summary = _run_stage(job, stage, model, run_dir, data, override, progress)
            _plot(run_dir)
            finish(stage.name, summary)
        model = run_dir / "final"
    if "final" not in done:
        _link_final(model, job.out / "final")
        finish("final", {"from": str(model), "path": str(job.out / "final")})
    if "eval" in plan and "eval" not in done:
        _say(f"[{len(plan)}/{len(plan)}] eval of {job.out / 'final'} against {job.source}")
        partial = state.setdefault("eval_in_progress", {})
        evaluation = _evaluate(job, job.out / "final", progress, partial, lambda: _write_state(job.out, state))
        _write_json(job.out / "eval.json", evaluation)
        del state["eval_in_progress"]
        finish("eval", evaluation)
    state["seconds"] = round(state.get("seconds", 0) + time.perf_counter() - start, 1)
    _write_state(job.out, state)
    return {"out": str(job.out), "final": str(job.out / "final"), "stages": plan, "seconds": state["seconds"],
            "eval": _eval_summary(done.get("eval"))}


def _plot(run_dir: Path) -> None:
    """curves.png of a finished stage; a missing matplotlib only costs the picture."""
    try:
        from .train.plot import plot_run

        plot_run(run_dir)
    except (ImportError, HybridizeError) as e:
        _say(f"no curves for {run_dir.name}: {e}")


def _headline(m: dict) -> dict:
    ratio = m["perplexity"] / m["teacher_perplexity"] if m.get("teacher_perplexity") else None
    return {"perplexity": m.get("perplexity"), "teacher_perplexity": m.get("teacher_perplexity"),
            "ratio": round(ratio, 4) if ratio else None, "kl": m.get("kl"), "agreement": m.get("agreement")}


def _eval_summary(evaluation: dict | None) -> dict | None:
    """Per eval path the headline numbers (perplexity ratio to the teacher, KL, agreement), healed and fresh."""
    if not evaluation:
        return None
    out = {}
    for path, m in evaluation.get("data", {}).items():
        out[path] = {**_headline(m), "fresh": _headline(evaluation["fresh"][path])}
    if "passkey" in evaluation:
        out["passkey"] = {role: grid.get("mean") for role, grid in evaluation["passkey"]["results"]["passkey"].items()}
    return out
