"""What the benchmarks share: random-weight models of a named shape, the software versions, the device's name."""

from __future__ import annotations

import re
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


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU): timings stop the clock after the GPU has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def profile_table(prof, rows: int = 25) -> dict:
    """Top CUDA kernels by self time, and self time summed by kind of kernel."""
    kinds = [("matmul", r"gemm|cutlass|xmma|nvjet|matmul|wgmma"), ("attention", r"flash|fmha|attention|sdpa"),
             ("nccl", r"nccl"), ("fla/triton", r"chunk|fused_recurrent|l2norm|causal_conv|layer_norm|swiglu|"
                                               r"recompute_w_u|solve_tril|kkt|gdn|triton|tilelang"),
             ("conv", r"conv|depthwise"), ("copy/cat", r"copy|cat|memcpy|memset|fill"),
             ("reduce/softmax", r"reduce|softmax|logsumexp|norm"), ("elementwise", r"elementwise|vectorized|unrolled")]
    from torch.autograd import DeviceType

    events = []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != DeviceType.CUDA:  # kernels only: operator rows would count twice
            continue
        t = getattr(e, "self_device_time_total", None)
        t = getattr(e, "self_cuda_time_total", 0) if t is None else t
        if t > 0:
            events.append((e.key, t / 1e3, e.count))
    events.sort(key=lambda x: -x[1])
    total = sum(t for _, t, _ in events) or 1.0
    by_kind: dict[str, float] = {}
    for name, t, _ in events:
        kind = next((k for k, pattern in kinds if re.search(pattern, name, re.I)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + t
    return {"gpu_ms": round(total, 2), "kernels": sum(c for _, _, c in events),
            "by_kind_ms": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": n[:90], "ms": round(t, 2), "calls": c} for n, t, c in events[:rows]]}
