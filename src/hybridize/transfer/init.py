"""How each hybrid tensor is made from the source: the weight-transfer recipe in one documented place.

| source                     | gated attention layer                  | Gated DeltaNet layer                       |
|----------------------------|----------------------------------------|--------------------------------------------|
| q_proj                     | q rows of q_proj, interleaved per head | q rows of in_proj_qkv, q_norm folded in    |
| k_proj, v_proj (Hkv heads) | copy                                   | repeated to Hq heads, k_norm folded into k |
| q_norm, k_norm             | copy (stored as w − 1)                 | folded (the L2 norm replaces RMSNorm)      |
| o_proj                     | copy, ×2 for gate "ones"/"small"       | out_proj                                   |
| —                          | gate rows: 0 / 0 / N(0, 0.01²)         | conv1d identity, z = 0, a/b/A_log/dt_bias  |

DeltaNet's new parameters (documented default, stable at init):
- `in_proj_z = 0`: silu(0) = 0 gates the output to zero, so each DeltaNet layer starts as a no-op on the residual
  stream (its MLP still runs) and distillation grows it from there; z still gets gradient (silu'(0) = ½).
- `A_log = log U(1, 16)`, `dt_bias = softplus⁻¹(dt)`, dt log-uniform in [1e-3, 0.1] (Mamba-2's recipe, also
  fla's): per-token decays e^{g} from ≈0.2 to ≈0.999, a spread of memory lengths across heads.
- `in_proj_a`, `in_proj_b` ~ N(0, initializer_range): near-constant decay and β ≈ ½ at first.
- `conv1d`: identity (last tap 1), so q, k, v = silu(projections) of the current token.
- gated norm weight 1.
Random draws come from a generator seeded by (seed, layer), so every code path gives the same tensors.

This init makes a fresh hybrid far from its teacher (each DeltaNet layer drops its attention's contribution).
`convert --calibrate DATA` starts from it and then fits each DeltaNet layer to the teacher's attention output on
real text: see `transfer/calibrate.py` for that recipe and its measured effect.
"""

from __future__ import annotations

import math

import torch


def layer_generator(seed: int, layer_idx: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + layer_idx)


def zero_centered(weight: torch.Tensor) -> torch.Tensor:
    """Source RMSNorm weight w (x̂·w) -> hybrid weight w − 1 (x̂·(1 + w))."""
    return weight.float() - 1.0


def attention_q_proj(q_weight: torch.Tensor, num_heads: int, head_dim: int, strategy: str,
                     gen: torch.Generator) -> torch.Tensor:
    """(H·d, D) q rows -> (2·H·d, D) rows interleaved per head [q_h; gate_h]."""
    q = q_weight.float().view(num_heads, head_dim, -1)  # (H, d, D)
    if strategy == "small":
        gate = torch.randn(q.shape, generator=gen) * 0.01
    else:  # "ones" and "zero": gate rows 0 -> sigmoid(0) = ½
        gate = torch.zeros_like(q)
    return torch.cat([q, gate], dim=1).reshape(2 * num_heads * head_dim, -1)


def attention_o_proj(o_weight: torch.Tensor, strategy: str) -> torch.Tensor:
    """o_proj doubled to cancel the gate's ½ ("ones", "small"), or copied ("zero": output halved)."""
    return o_weight.float() * (1.0 if strategy == "zero" else 2.0)


def deltanet_in_proj_qkv(q_weight, k_weight, v_weight, num_heads: int, num_kv_heads: int, head_dim: int,
                         q_norm: torch.Tensor | None, k_norm: torch.Tensor | None) -> torch.Tensor:
    """Rows [q | k | v] of H heads each: k/v repeated from Hkv heads, q/k-norm weights folded per channel."""
    rep = num_heads // num_kv_heads
    q = q_weight.float().view(num_heads, head_dim, -1)  # (H, d, D)
    k = k_weight.float().view(num_kv_heads, head_dim, -1).repeat_interleave(rep, dim=0)  # (H, d, D)
    v = v_weight.float().view(num_kv_heads, head_dim, -1).repeat_interleave(rep, dim=0)
    if q_norm is not None:
        q = q * q_norm.float()[None, :, None]
        k = k * k_norm.float()[None, :, None]
    return torch.cat([q, k, v]).reshape(3 * num_heads * head_dim, -1)


def identity_conv(conv_dim: int, kernel: int) -> torch.Tensor:
    """Depthwise causal conv weight (conv_dim, 1, kernel) that passes the current token through."""
    w = torch.zeros(conv_dim, 1, kernel)
    w[:, 0, -1] = 1.0
    return w


def deltanet_decay_params(num_heads: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_log, dt_bias) by Mamba-2's recipe (see the module docstring)."""
    A = torch.empty(num_heads).uniform_(1.0, 16.0, generator=gen)
    log_dt = torch.empty(num_heads).uniform_(math.log(1e-3), math.log(1e-1), generator=gen)
    dt = log_dt.exp()
    dt_bias = dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt)
    return A.log(), dt_bias


def small_normal(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std
