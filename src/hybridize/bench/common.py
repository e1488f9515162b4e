"""What the benchmarks share: random-weight models of a named shape, the software versions, the device's name."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..model.modeling import HybridForCausalLM
from .shapes import hybrid_config, source_config


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in `dtype` (no float32 copy first: Qwen3-8B in bf16 fits, in fp32 it may not)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(kind: str, shape: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A randomly initialised model of `shape`: the hybrid, or transformers' model of the source."""
    with torch.device(device), default_dtype(dtype):
        if kind == "hybrid":
            return HybridForCausalLM(hybrid_config(shape))
        from transformers import AutoModelForCausalLM

        config, _ = source_config(shape)
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def device_name(device: torch.device, world_size: int = 1) -> str:
    if device.type == "cuda":
        return f"{world_size} × {torch.cuda.get_device_name(device)}"
    return "cpu"


def versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import fla

        out["fla"] = getattr(fla, "__version__", "?")
    except Exception:  # fla missing or broken: fla_status says why
        pass
    return out
