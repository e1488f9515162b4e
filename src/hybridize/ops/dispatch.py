"""One entry point per op: fla's fused Triton kernels on CUDA when available, else our PyTorch ops.

The Gated DeltaNet layer calls three functions, each with the same meaning on both paths:

- `short_conv`: depthwise causal conv + SiLU (fla `causal_conv1d`, Triton backend),
- `gated_delta_net`: L2-normalise q/k, g = −exp(A_log)·softplus(a + dt_bias), β = σ(b), then the gated delta
  rule — on CUDA all of it inside fla's kernels (`use_qk_l2norm_in_kernel`, `use_gate_in_kernel`,
  `use_beta_sigmoid_in_kernel`), so no float32 copies of q, k, g or β are written,
- `gated_rms_norm`: rmsnorm(o)·w·silu(z) in one pass (fla `rms_norm_gated`),

and `rms_norm` (x̂·(1 + w), the qwen3_5_text convention) serves every other norm; `silu_mul` is the SwiGLU MLP's
activation. Small eager calls of the norms and `silu_mul` without gradients take the PyTorch ops even on
CUDA (host-bound: see `_HOST_BOUND_NUMEL`), except under `always_fused`. The fused and reference paths are
compared, values and gradients, in tests/test_gpu_parity.py.

fla (flash-linear-attention >= 0.6) is imported lazily on first CUDA use. When it is missing or fails to import
(e.g. tilelang without its libz3), one line on stderr says why and that the slower PyTorch path runs.
``HYBRIDIZE_DISABLE_FLA=1`` forces the PyTorch path.

fla's conventions we rely on: arguments by keyword (its `fused_recurrent_gated_delta_rule(q, k, v, g, gk, gv,
beta, ...)` puts `gk` where the chunk kernel has `beta`); GVA (Hv > Hk) handled natively; its conv state holds the
last W inputs, of which a W-tap conv reads only W − 1, so ours ([B, D, W − 1]) is its state without the oldest
column.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from contextvars import ContextVar
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .conv import causal_conv1d
from .delta_rule import all_states_gated_delta_rule, chunk_gated_delta_rule, recurrent_gated_delta_rule

__all__ = ["always_fused", "fla_available", "fla_status", "gated_delta_net", "gated_delta_rule", "gated_rms_norm",
           "note_if_slow_path", "rms_norm", "scaled_rms_norm", "short_conv", "silu_mul"]


@functools.lru_cache(maxsize=1)
def _fla() -> SimpleNamespace | str:
    """fla's kernels, or the reason (one line) why they cannot be imported."""
    try:
        from fla.modules.activations import swiglu
        from fla.modules.causal_conv1d import causal_conv1d as conv
        from fla.modules.norm.fused_norm_gate import rms_norm_gated
        from fla.modules.norm.layernorm import rms_norm as fla_rms_norm
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as recurrent
    except Exception as e:  # ImportError, or triton/driver/tilelang errors raised at import time
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
    return SimpleNamespace(chunk=chunk, recurrent=recurrent, conv=conv, rms_norm_gated=rms_norm_gated,
                           rms_norm=fla_rms_norm, swiglu=swiglu)


def fla_available() -> bool:
    """True when fla's kernels are importable (does not check for a GPU or the env var)."""
    return not isinstance(_fla(), str)


def fla_status() -> str:
    """'fla' when the fused kernels run on CUDA, else why not (for logs and `hybridize bench`)."""
    if _disabled():
        return "disabled by HYBRIDIZE_DISABLE_FLA"
    return "fla" if fla_available() else f"unavailable ({_fla()})"


def _disabled() -> bool:
    return os.environ.get("HYBRIDIZE_DISABLE_FLA", "0").strip().lower() not in ("", "0", "false", "no")


@functools.lru_cache(maxsize=1)
def _say_once_why_not() -> None:
    print(f"hybridize: note: flash-linear-attention cannot be used on CUDA ({_fla()}); DeltaNet layers run the "
          "PyTorch reference path, several times slower. Install it with: pip install 'hybridize[gpu]'",
          file=sys.stderr)


def note_if_slow_path(device: torch.device) -> None:
    """Say (once, on stderr) why fla's kernels will not run on a CUDA device, before any work starts."""
    if device.type == "cuda" and not _disabled() and not fla_available():
        _say_once_why_not()


def _use_fla(x: torch.Tensor) -> bool:
    if not x.is_cuda or _disabled():
        return False
    if not fla_available():
        _say_once_why_not()
        return False
    return True


# An eager call of one of fla's elementwise Triton functions (norms, SwiGLU) costs 120-220 us of host time (its
# Python wrappers; torch profiler, H200, 2026-12-03) against ~40 us for the few PyTorch ops of the reference path.
# Eager decoding work on small tensors (the MTP draft chain and head update, a dynamic cache's steps) is
# host-bound, so there the PyTorch ops win; inside the fixed-buffer step (`always_fused`: few kernels per CUDA
# graph replay), with gradients, or on large tensors, the fused kernel does.
_HOST_BOUND_NUMEL = 1 << 20
_ALWAYS_FUSED = ContextVar("hybridize_always_fused", default=False)


@contextlib.contextmanager
def always_fused():
    """Run fla's fused kernels for small inputs too (a step that is captured as a CUDA graph, and its eager twin)."""
    token = _ALWAYS_FUSED.set(True)
    try:
        yield
    finally:
        _ALWAYS_FUSED.reset(token)


def _use_fused_elementwise(x: torch.Tensor) -> bool:
    if not _use_fla(x):
        return False
    return x.numel() >= _HOST_BOUND_NUMEL or torch.is_grad_enabled() or _ALWAYS_FUSED.get()


# ------------------------------------------------------------------------------------------------ delta rule
def _torch_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state):
    fn = recurrent_gated_delta_rule if q.shape[1] <= 2 else chunk_gated_delta_rule
    return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def _fla_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, **fused):
    fla = _fla()
    T, K = k.shape[1], k.shape[3]
    scale = K**-0.5 if scale is None else scale
    h0 = None if initial_state is None else initial_state.float().contiguous()  # fla keeps the state in float32
    recurrent = T == 1 and not (torch.is_grad_enabled() and v.requires_grad)  # fla's recurrent has no backward
    o, ht = (fla.recurrent if recurrent else fla.chunk)(
        q=q.to(v.dtype), k=k.to(v.dtype), v=v, g=g, beta=beta, scale=scale, initial_state=h0,
        output_final_state=output_final_state, **fused)
    return o.to(v.dtype), (None if ht is None else ht.float())


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
    """Gated delta rule on prepared inputs, dispatched to the fastest available implementation.

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
    return _fla_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel=False)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|² + eps) in float32, as fla and transformers' qwen3_5 normalise q and k."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def gdn_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log decay g = −exp(A_log)·softplus(a + dt_bias), in float32 (Mamba-2's parametrisation)."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())


def gated_delta_net(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    output_all_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Gated DeltaNet core from the layer's raw projections.

    q, k: [B, T, Hk, K] (not normalised); v: [B, T, Hv, V]; a, b: [B, T, Hv] raw decay / β projections;
    A_log, dt_bias: [Hv]. Computes l2norm(q), l2norm(k), g = −exp(A_log)·softplus(a + dt_bias), β = σ(b) and the
    gated delta rule with scale K^-½. Returns (o [B, T, Hv, V], final state [B, Hv, K, V] float32 or None).
    `output_all_states` (speculative verify steps, a few tokens) returns the state after every token instead,
    [B, T, Hv, K, V]: with fla, its one-token recurrent kernel once per token (fla's kernels keep only the last
    state); otherwise the closed-form PyTorch op.
    """
    if output_all_states and k.shape[1] and _use_fla(v) and not torch.is_grad_enabled():
        return _fla_states_token_by_token(q, k, v, a, b, A_log, dt_bias, initial_state)
    if output_all_states:
        g, beta = gdn_decay(a, A_log, dt_bias), b.sigmoid()
        return all_states_gated_delta_rule(l2norm(q), l2norm(k), v, g, beta, initial_state=initial_state)
    if not _use_fla(v):
        g, beta = gdn_decay(a, A_log, dt_bias), b.sigmoid()
        return _torch_gated_delta_rule(l2norm(q), l2norm(k), v, g, beta, None, initial_state, output_final_state)
    return _fla_delta_rule(q, k, v, a, b, None, initial_state, output_final_state, use_qk_l2norm_in_kernel=True,
                           use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)


def _fla_states_token_by_token(q, k, v, a, b, A_log, dt_bias, initial_state):
    """All states of a verify step as T one-token calls of fla's fused recurrent kernel: one launch per token and
    layer, where the closed form takes ~50 small kernels per layer — in a captured 4-token verify step of the
    healed SmolLM2 those made the step cost twice a 1-token step (5.2 against 2.6 ms, H200, 2026-12-03). Each
    token also runs the very recurrence kernel plain decoding runs."""
    outs, states, state = [], [], initial_state
    for t in range(k.shape[1]):
        o, state = _fla_delta_rule(
            q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], a[:, t : t + 1], b[:, t : t + 1], None, state, True,
            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
            use_beta_sigmoid_in_kernel=True)
        outs.append(o)
        states.append(state)
    return torch.cat(outs, dim=1), torch.stack(states, dim=1)


# ------------------------------------------------------------------------------------------------ conv and norms
def short_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None,
               output_final_state: bool = False, output_all_states: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal conv + SiLU; x [B, T, D], weight [D, W], state [B, D, W − 1] (see ops.conv).
    `output_all_states`: the state after every token, [B, T, D, W − 1] (PyTorch path on any device)."""
    if output_all_states or not _use_fla(x):
        return causal_conv1d(x, weight, state, output_final_state, output_all_states=output_all_states)
    h0 = None if state is None else F.pad(state.to(x.dtype), (1, 0)).contiguous()  # fla: the last W inputs
    y, ht = _fla().conv(x=x, weight=weight, initial_state=h0, output_final_state=output_final_state,
                        activation="silu", backend="triton")
    return y, (None if ht is None else ht[..., 1:].contiguous())


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x)·w·silu(gate) over the last dim (DeltaNet's output norm), in x's dtype."""
    if not _use_fused_elementwise(x):
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * xf.to(dtype)
        return (out * F.silu(gate.float())).to(dtype)
    return _fla().rms_norm_gated(x=x, g=gate, weight=weight, bias=None, activation="swish", eps=eps).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x̂·(1 + w) computed in float32 (qwen3_5_text's convention: a source weight w is stored as w − 1)."""
    return scaled_rms_norm(x, 1.0 + weight.float(), eps)  # float32 even for bf16 w: 1 + w would lose w's low bits


def scaled_rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """x̂·scale with a float32 `scale` (rms_norm's 1 + w, computed once by a caller that knows w is frozen)."""
    if not _use_fused_elementwise(x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (xf * scale).type_as(x)
    return _fla().rms_norm(x, scale, None, eps=eps).type_as(x)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate)·up, the SwiGLU MLP's activation, in one pass on CUDA."""
    if not _use_fused_elementwise(gate):
        return F.silu(gate) * up
    return _fla().swiglu(gate, up)
