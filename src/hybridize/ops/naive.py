"""Executable specifications (float64, per-token loops) for the kernels in :mod:`hybridize.ops`.

These are deliberately slow and literal: every fast path in this package is tested against them.
They always compute in float64 whatever the input dtype.

Gated delta rule, per batch element and value head (S is a [K, V] matrix, k/q are [K] vectors, v is [V])::

    S_t = exp(g_t) * S_{t-1} + beta_t * k_t (v_t - exp(g_t) * S_{t-1}^T k_t)^T
        = exp(g_t) * S_{t-1} (I - beta_t k_t k_t^T) + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

Depthwise causal conv (per channel d, kernel width W, x_{t<0} taken from the state, zeros if none)::

    y_t[d] = sum_{i=0}^{W-1} w[d, i] * x_{t-W+1+i}[d],      out_t = silu(y_t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _state_dtype(v: torch.Tensor) -> torch.dtype:
    """Recurrent states are float32, or float64 when the values are float64 (the tight-test mode)."""
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def naive_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference gated delta rule: a plain loop over tokens, computed in float64.

    Args:
        q, k: [B, T, Hk, K], already L2-normalised (not normalised here).
        v: [B, T, Hv, V], Hv a multiple of Hk; value head j reads q/k head j // (Hv // Hk).
        g: [B, T, Hv] log-space decay (<= 0).
        beta: [B, T, Hv] write strength in (0, 1).
        scale: multiplies q; default K ** -0.5.
        initial_state: [B, Hv, K, V] or None (zeros).
        output_final_state: also return S_T.

    Returns:
        o: [B, T, Hv, V] in v.dtype; final state [B, Hv, K, V] (float32, float64 if v is float64) or None.
    """
    B, T, Hk, K = k.shape
    Hv, V = v.shape[-2:]
    assert Hv % Hk == 0, f"Hv={Hv} must be a multiple of Hk={Hk}"
    scale = K**-0.5 if scale is None else scale
    f64 = torch.float64
    group = Hv // Hk
    q, k = (x.to(f64).repeat_interleave(group, dim=2) for x in (q, k))  # [B, T, Hv, K]
    v, g, beta = v.to(f64), g.to(f64), beta.to(f64)

    S = torch.zeros(B, Hv, K, V, dtype=f64, device=v.device)
    if initial_state is not None:
        S = S + initial_state.to(f64)
    outs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t] * scale, k[:, t], v[:, t]  # [B, Hv, K], [B, Hv, K], [B, Hv, V]
        decay = g[:, t].exp()[..., None, None]  # [B, Hv, 1, 1]
        b_t = beta[:, t][..., None]  # [B, Hv, 1]
        S = decay * S  # forget
        pred = torch.einsum("bhkv,bhk->bhv", S, k_t)  # what the memory currently returns for k_t
        delta = b_t * (v_t - pred)  # delta-rule correction
        S = S + torch.einsum("bhk,bhv->bhkv", k_t, delta)  # write
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q_t))  # read
    o = torch.stack(outs, dim=1) if T > 0 else v.new_zeros(B, 0, Hv, V)
    final = S.to(_state_dtype(v)) if output_final_state else None
    return o.to(v.dtype if v.dtype.is_floating_point else f64), final


def naive_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor | None = None,
    output_final_state: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference depthwise causal conv + SiLU, float64 loop over time.

    Args:
        x: [B, T, D]; weight: [D, W]; state: [B, D, W-1] = the W-1 inputs preceding x (zeros if None);
        bias: optional [D].

    Returns:
        (silu(y) [B, T, D] in x.dtype, new state [B, D, W-1] in x.dtype or None).
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    f64 = torch.float64
    hist = torch.zeros(B, D, W - 1, dtype=f64, device=x.device) if state is None else state.to(f64)
    xs = torch.cat([hist, x.to(f64).transpose(1, 2)], dim=-1)  # [B, D, W-1+T]
    w = weight.to(f64)
    ys = []
    for t in range(T):
        window = xs[:, :, t : t + W]  # inputs x_{t-W+1} .. x_t
        y = (window * w).sum(-1)
        if bias is not None:
            y = y + bias.to(f64)
        ys.append(y)
    y = torch.stack(ys, dim=1) if T > 0 else xs.new_zeros(B, 0, D)
    new_state = xs[:, :, xs.shape[-1] - (W - 1) :].to(x.dtype) if output_final_state else None
    return F.silu(y).to(x.dtype), new_state
