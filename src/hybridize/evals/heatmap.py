"""`hybridize plot EVAL.json`: the accuracy heat maps (depth × length) of a `hybridize eval --task ... --json` file.

One panel per variant and model, side by side with the teacher's when it ran, so that where the hybrid loses
retrieval (deep in long prompts, typically) shows at a glance against the same cells of its teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HybridizeError


def read_longctx_json(path: str | Path) -> dict:
    """An eval --task result, checked for the fields the heat map needs."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HybridizeError(f"cannot read {path} as JSON: {' '.join(str(e).split())}") from None
    if not isinstance(result, dict) or not {"results", "lengths", "depths"} <= result.keys():
        raise HybridizeError(f"{path} is not the JSON of `hybridize eval --task ... --json` (it lacks results, "
                             "lengths or depths)")
    return result


def plot_longctx(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the heat maps of the result at `path` as a PNG (default: beside it, .png); return the PNG's path."""
    path = Path(path)
    result = read_longctx_json(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HybridizeError("plotting needs matplotlib: pip install 'hybridize[plot]'") from None
    roles = [r for r in ("model", "teacher") if result.get(r)]
    variants = list(result["results"])
    lengths, depths = result["lengths"], result["depths"]
    size = (2.2 + 0.9 * len(lengths) * len(roles), 0.8 + 0.45 * len(depths) * len(variants))
    fig, axes = plt.subplots(len(variants), len(roles), squeeze=False, figsize=size, layout="constrained")
    image = None
    for row, variant in enumerate(variants):
        for col, role in enumerate(roles):
            ax = axes[row, col]
            grid = result["results"][variant][role]["accuracy"]  # [length][depth]
            cells = [[grid[i][j] for i in range(len(lengths))] for j in range(len(depths))]  # rows: depth
            image = ax.imshow(cells, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
            for j in range(len(depths)):
                for i in range(len(lengths)):
                    ax.text(i, j, f"{100 * cells[j][i]:.0f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
            name = Path(str(result[role])).name or str(result[role])
            mean = result["results"][variant][role]["mean"]
            ax.set_title(f"{variant} · {role}: {name} ({100 * mean:.0f}%)", fontsize=9)
            ax.set_xlabel("prompt length (tokens)", fontsize=8)
            ax.set_ylabel("needle depth", fontsize=8)
    fig.colorbar(image, ax=axes, label="accuracy", shrink=0.8)
    fig.suptitle(f"hybridize eval --task {result.get('task', '?')}: accuracy (%), trials a cell: "
                 f"{result.get('trials', '?')}", fontsize=10)
    out = Path(out) if out else path.with_suffix(".png")
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)
    return out
