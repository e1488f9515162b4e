"""One entry point for the gated delta rule: fla's Triton kernels on CUDA when available, else our PyTorch ops.

fla (flash-linear-attention >= 0.6) is imported lazily and only on first CUDA use. ``HYBRIDIZE_DISABLE_FLA=1``
forces the PyTorch path.

GVA: fla >= 0.6 handles Hv > Hk itself in both kernels (value head j reads q/k head j // (Hv // Hk), as ours do).
Arguments go to fla by keyword: its `fused_recurrent_gated_delta_rule(q, k, v, g, gk, gv, beta, ...)` puts `gk`
where the chunk kernel has `beta`.
"""

from __future__ import annotations

import functools
import os

import torch

from .delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

__all__ = ["fla_available", "gated_delta_rule"]


@functools.lru_cache(maxsize=1)
def _fla_ops():
    """(chunk, fused_recurrent) from fla, or None if fla cannot be imported."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
    except Exception:  # ImportError, or triton/driver errors raised at import time
        return None
    return fla_chunk, fla_recurrent


def fla_available() -> bool:
    """True when fla's gated delta rule kernels are importable (does not check for a GPU or the env var)."""
    return _fla_ops() is not None


def _use_fla(x: torch.Tensor) -> bool:
    if os.environ.get("HYBRIDIZE_DISABLE_FLA", "0").strip().lower() not in ("", "0", "false", "no"):
        return False
    return x.is_cuda and fla_available()


def _torch_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state):
    fn = recurrent_gated_delta_rule if q.shape[1] <= 2 else chunk_gated_delta_rule
    return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, dispatched to the fastest available implementation.

    Args:
        q, k: [B, T, Hk, K], already L2-normalised; v: [B, T, Hv, V] (Hv % Hk == 0);
        g: [B, T, Hv] log decay (<= 0); beta: [B, T, Hv]; scale defaults to K ** -0.5;
        initial_state: [B, Hv, K, V] (float32) or None.

    Returns:
        o [B, T, Hv, V] in v.dtype, and final_state [B, Hv, K, V] float32 (float64 only on the torch path with
        float64 inputs) or None.

    Paths: CUDA + fla -> fla ``chunk_gated_delta_rule`` for T > 1, ``fused_recurrent_gated_delta_rule`` for
    T == 1; otherwise our torch recurrent for T <= 2 and torch chunk beyond.
    """
    if not _use_fla(v):
        return _torch_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state)

    fla_chunk, fla_recurrent = _fla_ops()
    T, K = k.shape[1], k.shape[3]
    if scale is None:
        scale = K**-0.5
    # fla wants q/k/v in one dtype and the state in float32
    q, k = q.to(v.dtype), k.to(v.dtype)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    kwargs = dict(g=g, beta=beta, scale=scale, initial_state=h0, output_final_state=output_final_state,
                  use_qk_l2norm_in_kernel=False)
    o, ht = (fla_recurrent if T == 1 else fla_chunk)(q, k, v, **kwargs)
    o = o.to(v.dtype)
    if ht is not None:
        ht = ht.float()
    return o, ht
