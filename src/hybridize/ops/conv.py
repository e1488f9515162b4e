"""Depthwise causal short convolution + SiLU (the q/k/v "short conv" of Gated DeltaNet).

Per channel d with kernel width W (x_{t<0} come from ``state``; PyTorch conv1d is a cross-correlation)::

    y_t[d] = sum_{i=0}^{W-1} weight[d, i] * x_{t-W+1+i}[d]   (+ bias[d]),     out_t = silu(y_t)

so ``weight[:, -1]`` multiplies the current token. This matches ``nn.Conv1d(D, D, W, groups=D,
padding=W-1)`` truncated to the first T outputs, i.e. the checkpoint's ``conv1d.weight`` [D, 1, W]
squeezed to [D, W]. Spec: :func:`hybridize.ops.naive.naive_causal_conv1d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    state: torch.Tensor | None = None,
    output_final_state: bool = False,
    bias: torch.Tensor | None = None,
    output_all_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Depthwise causal conv1d followed by SiLU.

    Args:
        x: [B, T, D].
        weight: [D, W] (squeeze the checkpoint's [D, 1, W]).
        state: [B, D, W-1], the last W-1 inputs before x (zeros when None).
        output_final_state: also return the last W-1 inputs (of state ++ x), for continuing later.
        bias: optional [D].
        output_all_states: return the state after every position instead, [B, T, D, W-1] (speculative decoding
            rolls back to any of them).

    Returns:
        (silu(y) [B, T, D] in x.dtype, new_state [B, D, W-1] in x.dtype or None).
        Running on x1 then on x2 from the returned state equals running on cat(x1, x2).
    """
    B, T, D = x.shape
    if weight.dim() == 3:  # tolerate the raw checkpoint layout [D, 1, W]
        weight = weight.squeeze(1)
    if weight.shape[0] != D:
        raise ValueError(f"weight {tuple(weight.shape)} must be [D={D}, W]")
    W = weight.shape[-1]
    if state is None:
        state = x.new_zeros(B, D, W - 1)
    elif state.shape != (B, D, W - 1):
        raise ValueError(f"state {tuple(state.shape)} must be [B, D, W-1] = {(B, D, W - 1)}")
    xs = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, D, W-1+T]: history then new inputs
    w = weight.to(x.dtype).unsqueeze(1)  # [D, 1, W]
    b = None if bias is None else bias.to(x.dtype)
    y = F.conv1d(xs, w, b, groups=D)  # [B, D, T]: valid conv over the history-prefixed sequence
    new_state = xs[:, :, xs.shape[-1] - (W - 1) :].contiguous() if output_final_state else None
    if output_all_states:  # window t+1 .. t+W-1 of xs is the history after token t
        new_state = xs[:, :, 1:].unfold(-1, W - 1, 1).transpose(1, 2).contiguous()  # [B, T, D, W-1]
    return F.silu(y).transpose(1, 2), new_state
