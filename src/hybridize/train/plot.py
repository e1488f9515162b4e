"""`hybridize plot RUN_DIR`: the curves of a run (metrics.jsonl, eval.jsonl) as one PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HybridizeError, one_line
from .trainer import EVAL_FILE, METRICS_FILE


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except ValueError:
                raise HybridizeError(f"{path} line {i} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise HybridizeError(f"{path} line {i} is not a metrics record (an object with a step)")
            out.append(record)
    return out


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r.get("tokens", r["step"]), r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write loss (total, KD, CE), learning rate, gradient norm, throughput and eval curves; return the PNG path."""
    run_dir = Path(run_dir)
    out = Path(out).expanduser() if out else run_dir / "curves.png"
    if not out.parent.is_dir():  # before drawing; and the error names OUT, not a temporary file
        raise HybridizeError(f"cannot write {out}: its folder {out.parent} does not exist")
    metrics = _records(run_dir / METRICS_FILE)
    if not metrics:
        raise HybridizeError(f"{run_dir} has no {METRICS_FILE}: is it a `hybridize distill --out` folder?")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HybridizeError("plotting needs matplotlib: pip install 'hybridize[plot]'") from None
    evals = _records(run_dir / EVAL_FILE)
    for r in evals:  # eval lines carry only the step: place them on the tokens axis
        r["tokens"] = r["step"] * metrics[0]["tokens"] // max(1, metrics[0]["step"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    panels = [
        (axes[0, 0], metrics, ["loss", "kd_loss", "task_loss", "align_loss", "mtp_loss"], "training loss", True),
        (axes[0, 1], evals, ["kl", "loss"], "eval (KL to teacher, student CE)", True),
        (axes[1, 0], metrics, ["grad_norm"], "gradient norm", True),
        (axes[1, 1], metrics, ["tok_per_s"], "tokens / s", False),
    ]
    for ax, records, keys, title, log in panels:
        for key in keys:
            x, y = _series(records, key)
            if x:
                ax.plot(x, y, label=key, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("tokens")
        if log and ax.lines and all(v > 0 for line in ax.lines for v in line.get_ydata()):
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    lr_ax = axes[1, 0].twinx()
    x, y = _series(metrics, "lr")
    lr_ax.plot(x, y, color="gray", linestyle="--", linewidth=1, label="lr")
    lr_ax.set_ylabel("learning rate")
    fig.suptitle(f"hybridize distill: {run_dir.name}")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise HybridizeError(f"cannot write {out}: {e.strerror or one_line(e)}") from None
    finally:
        plt.close(fig)
    return out
