"""Gated delta rule in pure PyTorch: a chunked (WY / UT-transform) form for training and prefill, and a
token-by-token recurrent form for decode.

Checked against: flash-linear-attention (fla-org/flash-linear-attention, ``fla/ops/gated_delta_rule`` --
chunk.py, wy_fast.py, fused_recurrent.py: the chunked algorithm and the argument conventions) and
transformers' ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule`` in
``transformers/models/qwen3_5/modeling_qwen3_5.py``. The derivation and code below are our own; the
executable specification is :func:`hybridize.ops.naive.naive_gated_delta_rule`.

Conventions (fla): q, k [B, T, Hk, K]; v [B, T, Hv, V]; g, beta [B, T, Hv]; state [B, Hv, K, V].
Value head j uses q/k head j // (Hv // Hk) (grouped value attention, = ``repeat_interleave`` on q/k).

Recurrence per (batch, value head), S is [K, V]::

    S_t = exp(g_t) S_{t-1} + k_t u_t^T,      u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t)
    o_t = S_t^T q_t                          (q already multiplied by scale)

Chunked form. Split time into chunks of C tokens; inside a chunk let gam_i = g_1 + ... + g_i (inclusive
cumsum, positions 1..C) and S_0 the state entering the chunk. Unrolling the recurrence inside the chunk::

    S_i = exp(gam_i) S_0 + sum_{j<=i} exp(gam_i - gam_j) k_j u_j^T

Substituting exp(g_i) S_{i-1} = exp(gam_i) S_0 + sum_{j<i} exp(gam_i - gam_j) k_j u_j^T into u_i gives a
unit lower-triangular linear system for the C "new values" u_i::

    u_i + beta_i sum_{j<i} exp(gam_i - gam_j) (k_i . k_j) u_j = beta_i v_i - beta_i exp(gam_i) S_0^T k_i
    (I + A) U = diag(beta) V - diag(beta exp(gam)) K S_0,   A_ij = beta_i exp(gam_i - gam_j) k_i.k_j  (j < i)

so with T_c = (I + A)^{-1} (the UT transform; we solve instead of inverting)::

    U = U0 - W S_0,      U0 = T_c diag(beta) V,      W = T_c diag(beta exp(gam)) K        (WY representation)
    O = diag(exp(gam)) Q S_0 + (Q K^T * M) U,          M_ij = exp(gam_i - gam_j) for j <= i, else 0
    S_C = exp(gam_C) S_0 + (diag(exp(gam_C - gam)) K)^T U

U0, W and the intra-chunk attention Q K^T * M are computed for all chunks at once; only the state
hand-off S_0 -> S_C is a sequential loop over chunks. All exponents are <= 0 (g <= 0), so nothing overflows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(*xs: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64 (tight tests), else float32 (bf16/fp16/fp32 inputs)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _prepare(q, k, v, g, beta, scale, initial_state):
    """Shared input handling. Returns head-major tensors in the compute dtype:
    q (scaled), k: [B, Hv, T, K]; v: [B, Hv, T, V]; g, beta: [B, Hv, T]; S: [B, Hv, K, V].
    """
    B, T, Hk, K = k.shape
    Hv, V = v.shape[-2:]
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:2] != (B, T) or Hv % Hk != 0:
        raise ValueError(f"v {tuple(v.shape)} incompatible with k {tuple(k.shape)} (Hv must be a multiple of Hk)")
    if g.shape != (B, T, Hv) or beta.shape != (B, T, Hv):
        raise ValueError(f"g {tuple(g.shape)} and beta {tuple(beta.shape)} must be [B, T, Hv] = {(B, T, Hv)}")
    if initial_state is not None and initial_state.shape != (B, Hv, K, V):
        raise ValueError(f"initial_state {tuple(initial_state.shape)} must be [B, Hv, K, V] = {(B, Hv, K, V)}")
    dt = _compute_dtype(q, k, v, g, beta, initial_state)
    scale = K**-0.5 if scale is None else scale
    if Hv != Hk:  # grouped value attention: value head j reads q/k head j // (Hv // Hk)
        q = q.repeat_interleave(Hv // Hk, dim=2)
        k = k.repeat_interleave(Hv // Hk, dim=2)
    q, k, v = (x.transpose(1, 2).to(dt) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).to(dt) for x in (g, beta))
    q = q * scale
    if initial_state is None:
        S = torch.zeros(B, Hv, K, V, dtype=dt, device=v.device)
    else:
        S = initial_state.to(dt)
    return q, k, v, g, beta, S


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule (training / prefill); differentiable by autograd.

    Args:
        q, k: [B, T, Hk, K], already L2-normalised.
        v: [B, T, Hv, V] with Hv % Hk == 0.
        g: [B, T, Hv] log-space decay (<= 0).
        beta: [B, T, Hv] in (0, 1).
        scale: multiplies q; default K ** -0.5.
        initial_state: [B, Hv, K, V] (float32 normally) or None.
        output_final_state: return the state after the last token.
        chunk_size: C; any T works (padded internally with no-op tokens g=0, beta=0, k=v=q=0).

    Returns:
        o: [B, T, Hv, V] in v.dtype.
        final_state: [B, Hv, K, V] in the compute dtype (float32; float64 if any input is float64) or None.

    Computes in float32 (float64 if any input is float64).
    """
    v_dtype = v.dtype
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, scale, initial_state)
    B, H, T, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    if pad:  # padded tokens: g=0 (no decay), beta=0 and k=0 (no write), q=0 (output discarded)
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    N = (T + pad) // C
    # [B, H, N, C, *]
    q, k, v = (x.reshape(B, H, N, C, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.reshape(B, H, N, C) for x in (g, beta))

    gam = g.cumsum(-1)  # [B, H, N, C] inclusive in-chunk cumulative log decay
    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= i
    strict = incl.tril(-1)  # j < i
    diff = gam[..., :, None] - gam[..., None, :]  # [B, H, N, C, C]: gam_i - gam_j
    M = diff.masked_fill(~incl, float("-inf")).exp()  # exp(gam_i - gam_j) for j <= i, else 0

    # UT transform: (I + A) [U0 | W] = [diag(beta) V | diag(beta exp(gam)) K]
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * M).masked_fill(~strict, 0.0)
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    rhs = torch.cat([beta[..., None] * v, (beta * gam.exp())[..., None] * k], dim=-1)  # [B, H, N, C, V+K]
    sol = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    U0, W = sol[..., :V], sol[..., V:]

    attn = (q @ k.transpose(-1, -2)) * M  # [B, H, N, C, C] intra-chunk (causal, decayed) scores
    q_dec = q * gam.exp()[..., None]  # diag(exp(gam)) Q: reads the incoming state
    k_dec = k * (gam[..., -1:] - gam).exp()[..., None]  # diag(exp(gam_C - gam)) K: writes into the next state
    chunk_decay = gam[..., -1].exp()[..., None, None]  # [B, H, N, 1, 1]

    outs = []
    for n in range(N):  # sequential state hand-off between chunks
        U = U0[:, :, n] - W[:, :, n] @ S  # [B, H, C, V] new values given the incoming state
        outs.append(q_dec[:, :, n] @ S + attn[:, :, n] @ U)
        S = chunk_decay[:, :, n] * S + k_dec[:, :, n].transpose(-1, -2) @ U
    if outs:
        o = torch.stack(outs, dim=2).reshape(B, H, N * C, V)[:, :, :T]
    else:
        o = v.new_zeros(B, H, 0, V)
    return o.transpose(1, 2).to(v_dtype), (S if output_final_state else None)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    output_all_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token gated delta rule (decode, small T). Same arguments, returns and dtypes as
    :func:`chunk_gated_delta_rule` (without ``chunk_size``); differentiable by autograd.
    ``output_all_states`` returns the state after every token, [B, T, Hv, K, V], instead of the final one: the
    per-position checkpoints speculative decoding rolls back to."""
    v_dtype = v.dtype
    q, k, v, g, beta, S = _prepare(q, k, v, g, beta, scale, initial_state)
    T = k.shape[2]
    outs, states = [], []
    for t in range(T):
        k_t = k[:, :, t]  # [B, H, K]
        S = g[:, :, t].exp()[..., None, None] * S  # decay
        pred = (S * k_t[..., None]).sum(-2)  # S^T k_t: [B, H, V]
        u = beta[:, :, t, None] * (v[:, :, t] - pred)  # delta-rule new value
        S = S + k_t[..., None] * u[..., None, :]  # rank-1 write k_t u^T
        outs.append((S * q[:, :, t, :, None]).sum(-2))  # S^T q_t
        if output_all_states:
            states.append(S)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape[0], 0, v.shape[1], v.shape[-1])
    if output_all_states:
        return o.to(v_dtype), torch.stack(states, dim=1)
    return o.to(v_dtype), (S if output_final_state else None)


def unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for strictly lower-triangular A [..., T, T], with matmuls only: N = -A is nilpotent (N^T = 0), so
    (I + A)^-1 = sum_{n<T} N^n = (I + N)(I + N^2)(I + N^4)...: ceil(log2 T) - 1 squarings. Why not
    torch.linalg.solve_triangular: on CUDA it is cuBLAS's batched trsm, whose pointer arrays are set up from the
    host, which a CUDA-graph capture may refuse (it refuses linalg.solve, pytorch/pytorch#96632); with it, the
    H200 verify step cost what an eager step costs (speculative decoding at 0.19x plain, 2026-12-03), the sign of
    a failed capture. Matmuls capture. Exact in exact arithmetic, like the solve; meant for a verify step's small
    T."""
    T = A.shape[-1]
    N = -A
    inverse = torch.eye(T, dtype=A.dtype, device=A.device) + N  # covers N^0, N^1
    for _ in range(max((T - 1).bit_length() - 1, 0)):  # each squaring doubles the powers covered
        N = N @ N
        inverse = inverse + inverse @ N
    return inverse


def all_states_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a few tokens (a speculative verify step) with the state after every token, in
    closed form: no loop over tokens, so a step is a fixed handful of kernels (the per-token loop costs T times
    the launches, which dominates a captured verify step). The chunked form of the module docstring with one
    chunk of T tokens, keeping every S_t instead of only the last::

        U   = U0 - W S_0                                       (the UT transform: one T x T triangular solve)
        S_t = exp(gam_t) S_0 + sum_{j<=t} exp(gam_t - gam_j) k_j u_j^T       (one batched matmul for all t)
        o_t = S_t^T q_t

    Same arguments as :func:`recurrent_gated_delta_rule`. Returns o [B, T, Hv, V] in v.dtype and the states
    [B, T, Hv, K, V] in the compute dtype (float32; float64 if any input is float64). Costs O(T^2 K V) per head:
    meant for short T (use the chunked form for prefill)."""
    v_dtype = v.dtype
    q, k, v, g, beta, S0 = _prepare(q, k, v, g, beta, scale, initial_state)
    B, H, T, K = k.shape
    V = v.shape[-1]
    if T == 0:
        return v.new_zeros(B, 0, H, V).to(v_dtype), S0.new_zeros(B, 0, H, K, V)
    gam = g.cumsum(-1)  # [B, H, T]
    incl = torch.ones(T, T, dtype=torch.bool, device=k.device).tril()
    M = (gam[..., :, None] - gam[..., None, :]).masked_fill(~incl, float("-inf")).exp()  # exp(gam_t - gam_j), j<=t
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * M).tril(-1)
    rhs = torch.cat([beta[..., None] * v, (beta * gam.exp())[..., None] * k], dim=-1)  # [B, H, T, V+K]
    sol = unit_lower_inverse(A) @ rhs
    U = sol[..., :V] - sol[..., V:] @ S0  # [B, H, T, V]: the new values given the incoming state
    k_dec = M[..., None] * k[:, :, None]  # [B, H, T(t), T(j), K]: exp(gam_t - gam_j) k_j, zero for j > t
    S = gam.exp()[..., None, None] * S0[:, :, None] + k_dec.transpose(-1, -2) @ U[:, :, None]  # [B, H, T, K, V]
    o = (q[..., None, :] @ S)[..., 0, :]  # [B, H, T, V]: S_t^T q_t
    return o.transpose(1, 2).to(v_dtype), S.transpose(1, 2).contiguous()
