"""benchmarks/etd_smollm2.py end to end on a tiny model (CPU): every arm trains and is measured, and a rerun
continues instead of retraining. The GPU session runs it only after a 15-minute heal, so a broken flag there costs
the session's measurement."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

from conftest import build_tiny_source

from hybridize.transfer.convert import convert_to_folder

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "etd_smollm2.py"


def _text(path: Path, documents: int) -> Path:
    rng = random.Random(0)
    words = "the of and a to in is was he for it with as his on be at by this had not are but from".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(200))}) + "\n"
                            for _ in range(documents)))
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_every_arm_trains_and_a_rerun_continues(tmp_path):
    teacher = build_tiny_source(tmp_path / "teacher", family="qwen3", num_hidden_layers=8)
    convert_to_folder(str(teacher), tmp_path / "hybrid", progress=False)
    out = tmp_path / "run"
    args = [str(tmp_path / "hybrid"), "--teacher", str(teacher), "--data", str(_text(tmp_path / "train.jsonl", 200)),
            "--eval-data", str(_text(tmp_path / "val.jsonl", 30)), "--out", str(out), "--tokens", "4k",
            "--seq-len", "64", "--batch-size", "4", "--iterations", "2", "--router-steps", "2",
            "--eval-tokens", "2048", "--eval-seq-len", "256"]
    first = _run(args)
    assert first.returncode == 0, first.stderr[-4000:]
    rows = json.loads((out / "etd.json").read_text())["rows"]
    assert [r["arm"] for r in rows] == ["base", "baseline", "experts-2", "routers-2"]
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 and r["ms_per_1k_tokens"] > 0 for r in rows)
    assert rows[0]["think_saved"] is None and rows[1]["think_saved"] is None
    assert all(-1 <= r["think_saved"] <= 1 for r in rows[2:])  # REPEAT runs a layer twice: below 0
    assert "--skip-bonus 0.0015" in first.stdout  # the router search gets the floor's budget
    assert "+ hybridize" in first.stdout and "baseline" in first.stdout

    again = _run(args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "+ hybridize" not in again.stdout  # every arm's output exists: nothing retrains
    rerun = json.loads((out / "etd.json").read_text())["rows"]
    assert [r["perplexity"] for r in rerun] == [r["perplexity"] for r in rows]
