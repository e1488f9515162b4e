"""SIGTERM / SIGINT during training: finish the current step, checkpoint, then stop (nothing is lost)."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist


class StopSignals:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step (all ranks agree first)."""

    def __enter__(self):
        self.flag = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (a collective: every rank calls it; one process reads `flag`)."""
        flag = torch.tensor(float(self.flag), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


__all__ = ["StopSignals"]
