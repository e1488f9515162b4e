"""Where a command runs: the GPU when there is one, unless the user names a device.

Every command that loads a model picks its device here, so `--device` means the same everywhere and a command
that forgets to move its model to the GPU cannot slip through (train-mtp once trained on the GPU machine's CPU)."""

from __future__ import annotations

import torch

from .errors import HybridizeError

DEVICE_CHOICES = "auto (the GPU when there is one), cpu, cuda or cuda:N"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto`/None: cuda when torch sees a GPU, else cpu; otherwise the named device, checked to exist."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise HybridizeError(f"unknown device {name!r}; choose {DEVICE_CHOICES}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HybridizeError(f"device {name!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__}); "
                                 f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HybridizeError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise HybridizeError(f"unsupported device {name!r}; choose {DEVICE_CHOICES}")
    return device


__all__ = ["DEVICE_CHOICES", "resolve_device"]
