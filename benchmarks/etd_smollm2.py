"""Issue 12's measurement: does looping the think block (ETD) with LoRA experts beat training the plain hybrid on
the same tokens, and what does the layer router save?

    python benchmarks/etd_smollm2.py MODEL --teacher SOURCE --data TRAIN --eval-data VAL --out DIR
        [--tokens 2M] [--seq-len 512] [--batch-size 16] [--iterations 1,2,3] [--router-steps 100] [--json FILE]

MODEL is a healed hybrid (`hybridize heal … OUT/final`), SOURCE its teacher. Every arm trains on the same first
--tokens tokens of TRAIN (written once to DIR/train_head.npy), one pass, KD from the teacher:
- `baseline`: the plain hybrid, all weights, `hybridize distill` (--baseline-lr, cosine to a tenth);
- `experts-K` for each K in --iterations: an ETD model of MODEL with K think iterations, the base frozen, its 4 LoRA
  experts trained by `hybridize train-etd --part experts --teacher SOURCE`;
- `routers`: the routers of `experts-2` (or the first K > 1) trained by `train-etd --part routers` (route-search
  labels, base and experts frozen), --router-steps batches of 4 × 256 tokens; the search keeps a SKIP that costs
  at most --skip-bonus nats per token (the default spends the floor's budget, 1 % perplexity ≈ 0.01 nats per
  token, on the ~6 skips that save 20 % of SmolLM2's 2 × 15 think-layer slots).
Then each model (and MODEL itself) is evaluated on the first --eval-tokens tokens of VAL against the teacher
(`hybridize eval`'s numbers: perplexity, KL, agreement), ETD models also for the share of think-layer executions
their routers skip, and every model's forward time per token on the same windows (same process, same card).
Each arm is skipped when its output exists, so a rerun after a crash or a time limit continues (the arms
themselves resume from their last save with the same command).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _count(text: str) -> int:
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _hybridize(*args) -> None:
    cmd = [sys.executable, "-m", "hybridize", *map(str, args)]
    print("+ hybridize " + " ".join(map(str, args)), flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"etd_smollm2: `hybridize {args[0]}` failed (see above); rerun this script to continue")


def train_head(model: Path, data: list[str], tokens: int, out: Path) -> Path:
    """The first `tokens` tokens of the training data as one .npy: every arm sees exactly these."""
    from hybridize.train.data import first_windows

    path = out / "train_head.npy"
    if not path.is_file():
        stream = first_windows(model, data, tokens, 1).flatten().numpy().astype(np.int64)
        if len(stream) < tokens:
            sys.exit(f"etd_smollm2: the training data holds {len(stream):,} tokens, fewer than --tokens {tokens:,}")
        np.save(out / "train_head.tmp.npy", stream)
        (out / "train_head.tmp.npy").rename(path)
    return path


def run_arms(args, head: Path) -> dict[str, Path]:
    """Train every arm that has no output yet; returns arm name → model folder."""
    steps = max(1, args.tokens // (args.batch_size * args.seq_len))
    shape = ["--seq-len", args.seq_len, "--batch-size", args.batch_size]
    models = {"base": Path(args.model)}
    baseline = args.out / "baseline"
    if not (baseline / "final" / "config.json").is_file():
        _hybridize("distill", "--teacher", args.teacher, "--student", args.model, "--data", head, "--out", baseline,
                   "--steps", steps, *shape, "--lr", args.baseline_lr, "--min-lr", args.baseline_lr / 10,
                   "--warmup", max(1, steps // 20), "--save-every", 100, "--eval-every", 0, "--no-progress",
                   *(["--resume"] if baseline.exists() else []))
    models["baseline"] = baseline / "final"
    for k in args.iterations:
        run = args.out / f"experts-{k}"
        if not (run / "model" / "config.json").is_file() or _steps_done(run) < steps:
            _hybridize("train-etd", args.model, run, "--data", head, "--part", "experts", "--iterations", k,
                       "--teacher", args.teacher, "--tokens", args.tokens, "--steps", steps, *shape,
                       "--lr", args.experts_lr, "--no-progress", *_continue(run))
        models[f"experts-{k}"] = run / "model"
    looped = [k for k in args.iterations if k > 1]
    if looped and args.router_steps:
        src, run = models[f"experts-{looped[0]}"], args.out / f"routers-{looped[0]}"
        if not (run / "model" / "config.json").is_file() or _steps_done(run) < args.router_steps:
            _hybridize("train-etd", src, run, "--data", head, "--part", "routers", "--steps", args.router_steps,
                       "--batch-size", 4, "--seq-len", 256, "--tokens", args.router_steps * 4 * 256,
                       "--skip-bonus", args.skip_bonus,
                       "--no-progress", *_continue(run))
        models[f"routers-{looped[0]}"] = run / "model"
    return models


def _continue(run: Path) -> list[str]:
    """train-etd flags for a run folder: resume from its last save; start over when nothing was saved yet."""
    return ["--resume"] if _steps_done(run) else (["--force"] if run.exists() else [])


def _steps_done(run: Path) -> int:
    state = run / "model" / "trainer_state.pt"
    return int(torch.load(state, map_location="cpu", weights_only=True)["step"]) if state.is_file() else 0


@torch.no_grad()
def executions_and_speed(path: Path, windows: torch.Tensor, batch_size: int) -> dict:
    """Share of think-layer executions the model's routers skip (ETD only) and forward seconds per 1k tokens."""
    from hybridize.device import resolve_device
    from hybridize.model.etd import ETDForCausalLM
    from hybridize.train.config import DistillConfig
    from hybridize.train.models import load_language_model

    device = resolve_device()
    model = load_language_model(path, DistillConfig().compute_dtype(device.type), progress=False).to(device).eval()
    batches = [windows[i:i + batch_size].to(device) for i in range(0, len(windows), batch_size)]
    model(batches[0])  # warm-up (kernel compilation, autotuning)
    saved, seconds = [], 0.0
    for batch in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(batch, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        if isinstance(model, ETDForCausalLM):
            saved.append(model.think_executions()["saved"])
    return {"think_saved": float(np.mean(saved)) if saved else None,
            "ms_per_1k_tokens": 1000 * seconds / windows.numel() * 1000}


def measure(args, models: dict[str, Path]) -> list[dict]:
    from hybridize.train.data import first_windows
    from hybridize.train.run import run_eval

    windows = first_windows(args.model, args.eval_data, args.eval_tokens, args.eval_seq_len)
    rows = []
    for name, path in models.items():
        quality = run_eval(str(path), args.eval_data, teacher=args.teacher, seq_len=args.eval_seq_len,
                           max_tokens=args.eval_tokens, progress=False)
        rows.append({"arm": name, "model": str(path), "perplexity": quality["perplexity"],
                     "teacher_perplexity": quality.get("teacher_perplexity"), "kl": quality.get("kl"),
                     "agreement": quality.get("agreement"), **executions_and_speed(path, windows, 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    base = {r["arm"]: r for r in rows}.get("baseline")
    lines = [f"{'arm':<12} {'ppl':>8} {'× baseline':>11} {'KL':>7} {'agree':>6} {'think saved':>11} "
             f"{'ms/1k tok':>9}"]
    for r in rows:
        vs = f"{r['perplexity'] / base['perplexity']:.4f}" if base else "-"
        saved = "-" if r["think_saved"] is None else f"{100 * r['think_saved']:.1f}%"
        lines.append(f"{r['arm']:<12} {r['perplexity']:>8.3f} {vs:>11} {r['kl']:>7.4f} "
                     f"{100 * r['agreement']:>5.1f}% {saved:>11} {r['ms_per_1k_tokens']:>9.2f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the healed hybrid (a hybridize folder)")
    p.add_argument("--teacher", required=True, help="its teacher (folder, .gguf)")
    p.add_argument("--data", required=True, nargs="+", help="training text or .npy tokens")
    p.add_argument("--eval-data", required=True, nargs="+", help="validation text")
    p.add_argument("--out", required=True, type=Path, help="run folder (reused: finished arms are skipped)")
    p.add_argument("--tokens", type=_count, default=_count("2M"), help="training tokens per arm [2M]")
    p.add_argument("--seq-len", type=int, default=512, help="training window [512]")
    p.add_argument("--batch-size", type=int, default=16, help="training windows per step [16]")
    p.add_argument("--iterations", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3],
                   help="think iterations of the expert arms [1,2,3]")
    p.add_argument("--experts-lr", type=float, default=1e-3, help="LoRA experts' learning rate [1e-3]")
    p.add_argument("--baseline-lr", type=float, default=5e-5, help="the baseline's peak learning rate [5e-5]")
    p.add_argument("--router-steps", type=int, default=100, help="router training steps (0: none) [100]")
    p.add_argument("--skip-bonus", type=float, default=0.0015,
                   help="route search: nats per token a SKIP may cost and still be kept [0.0015]")
    p.add_argument("--eval-tokens", type=_count, default=131072, help="validation tokens [131072]")
    p.add_argument("--eval-seq-len", type=int, default=2048, help="validation window [2048]")
    p.add_argument("--json", type=Path, help="also write the rows here [DIR/etd.json]")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    head = train_head(Path(args.model), args.data, args.tokens, args.out)
    rows = measure(args, run_arms(args, head))
    print(table(rows))
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}
    target = args.json or args.out / "etd.json"
    target.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
