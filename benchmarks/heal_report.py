"""Tables from `hybridize heal` folders: final quality per run, and KL against training tokens.

    python benchmarks/heal_report.py RUN [RUN ...] [--json FILE] [--plot PNG] [--milestones 0,5M,10M,20M,50M]

Per run (its OUT/heal.json): perplexity ratio to the teacher, KL and greedy agreement on each eval path, passkey
accuracy of model and teacher; then the KL of the KD stage's --eval-every evaluations at the token milestones (the
last evaluation at or before each; tokens count from the start of the KD stage, the alignment stage's tokens are
reported apart) and the fresh conversion's KL at 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _count(text: str) -> int:
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_rows(run: Path) -> list[dict]:
    """One row per eval path of a finished heal run."""
    state = json.loads((run / "heal.json").read_text())
    evaluation = state["done"].get("eval", {})
    passkey = evaluation.get("passkey", {}).get("results", {}).get("passkey", {})
    rows = []
    for path, m in evaluation.get("data", {}).items():
        rows.append({"run": run.name, "data": Path(path).stem, "ratio": m["perplexity"] / m["teacher_perplexity"],
                     "perplexity": m["perplexity"], "teacher_perplexity": m["teacher_perplexity"], "kl": m["kl"],
                     "agreement": m["agreement"],
                     "passkey": (passkey.get("model", {}).get("mean"), passkey.get("teacher", {}).get("mean"))})
    return rows


def kl_curve(run: Path, milestones: list[int]) -> dict:
    """KL on the first eval path at each milestone of KD tokens: the fresh conversion's at 0, then the last
    --eval-every evaluation of the KD stage at or before it (None before the first)."""
    state = json.loads((run / "heal.json").read_text())
    per_step = state["settings"]["distill"]["batch_size"] * state["settings"]["distill"]["seq_len"]
    fresh = next(iter(state["done"].get("eval", {}).get("fresh", {}).values()), {})
    points = [(0, fresh.get("kl"))] + [(e["step"] * per_step, e["kl"]) for e in _records(run / "kd" / "eval.jsonl")]
    out = {}
    for tokens in milestones:
        seen = [kl for t, kl in points if t <= tokens and kl is not None]
        out[tokens] = seen[-1] if seen else None
    return out


def kd_points(run: Path) -> list[tuple[int, float, float]]:
    """(KD tokens, KL, perplexity ratio) of the fresh conversion and every --eval-every evaluation of the KD stage."""
    state = json.loads((run / "heal.json").read_text())
    per_step = state["settings"]["distill"]["batch_size"] * state["settings"]["distill"]["seq_len"]
    fresh = next(iter(state["done"].get("eval", {}).get("fresh", {}).values()), None)
    points = [] if fresh is None else [(0, fresh["kl"], fresh["perplexity"] / fresh["teacher_perplexity"])]
    return points + [(e["step"] * per_step, e["kl"], e["perplexity"] / e["teacher_perplexity"])
                     for e in _records(run / "kd" / "eval.jsonl")]


def plot_curves(runs: list[Path], out: Path) -> None:
    """KL and perplexity ratio (log scale) against KD tokens, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        tokens, kl, ratio = zip(*kd_points(run), strict=True)
        millions = [t / 1e6 for t in tokens]
        axes[0].plot(millions, kl, marker=".", label=run.name)
        axes[1].plot(millions, ratio, marker=".", label=run.name)
    for ax, name in zip(axes, ("KL(teacher || student) / token", "perplexity / teacher's"), strict=True):
        ax.set_xlabel("KD tokens (M)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def format_report(runs: list[Path], milestones: list[int]) -> str:
    lines = [f"{'run':<26} {'data':<10} {'ppl ratio':>9} {'KL':>7} {'agree':>6} {'passkey model/teacher':>22}"]
    for run in runs:
        for r in final_rows(run):
            model, teacher = r["passkey"]
            key = "-" if model is None else f"{model:.2f} / {teacher:.2f}"
            lines.append(f"{r['run']:<26} {r['data']:<10} {r['ratio']:>9.3f} {r['kl']:>7.3f} {r['agreement']:>6.1%} "
                         f"{key:>22}")
    lines.append("")
    lines.append(f"{'KL at KD tokens':<26} " + " ".join(f"{m / 1e6:>7g}M" for m in milestones))
    for run in runs:
        curve = kl_curve(run, milestones)
        lines.append(f"{run.name:<26} " + " ".join("       -" if v is None else f"{v:>8.3f}" for v in curve.values()))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="heal output folders")
    parser.add_argument("--milestones", default="0,5M,10M,20M,50M", help="KD tokens for the KL curve")
    parser.add_argument("--json", type=Path, help="also write every number as JSON")
    parser.add_argument("--plot", type=Path, help="also draw KL and perplexity ratio against KD tokens (PNG)")
    args = parser.parse_args()
    runs = [r for r in args.runs if (r / "heal.json").is_file()]
    milestones = [_count(m) for m in args.milestones.split(",")]
    print(format_report(runs, milestones))
    if args.json:
        report = {r.name: {"final": final_rows(r), "kl_curve": kl_curve(r, milestones)} for r in runs}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot_curves(runs, args.plot)


if __name__ == "__main__":
    main()
