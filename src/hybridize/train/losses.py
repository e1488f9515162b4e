"""Distillation losses as pure functions of hidden states and lm_head weights.

Logits are never materialised for the whole batch: at vocab 151,936 one 4k-token sequence is 2.5 GB of float32
logits per model. `distillation_sums` selects the positions that have a target, then walks them in chunks; each
chunk's teacher and student logits live only inside a checkpointed function, so the backward pass recomputes them
chunk by chunk too. Peak extra memory is a few chunk × vocab float32 buffers, whatever the batch.

We return *sums* and the number of target tokens, so that a trainer can average over every token of a global
batch (all micro-batches, all ranks) rather than averaging per-batch means.

Checked before writing by hand: Liger-Kernel's chunked `LigerFusedLinear*` losses fuse the same idea, but need Triton
(absent on CPU and on our GPU image) and normalise per batch; torch has no fused linear + KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) labels aligned with the inputs → (B, T) targets: position t predicts labels[t + 1].

    A position gets IGNORE_INDEX when it or its target is padding (either padding side), and the last one always.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    if attention_mask is not None:
        real = attention_mask.bool()
        targets = targets.masked_fill(~real | ~F.pad(real[:, 1:], (0, 1), value=False), IGNORE_INDEX)
    return targets


def _chunk_losses(student_h, teacher_h, student_w, teacher_w, targets, temperature: float,
                  eval_stats: bool = False) -> torch.Tensor:
    """[KD sum, CE sum] over one chunk of N positions (+ [teacher CE sum, argmax agreements] with `eval_stats`).
    h: (N, D); w: (V, D); targets: (N,). Each head's logits are computed once per call."""
    s_logits = (student_h @ student_w.T).float()  # (N, V)
    ce = F.cross_entropy(s_logits, targets, reduction="sum")
    if teacher_h is None:
        return torch.stack([ce.new_zeros(()), ce])
    with torch.no_grad():
        t_logits = (teacher_h @ teacher_w.T).float()  # (N, V)
        t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    # T²·KL(p_t ‖ p_s): the T² keeps gradient magnitudes comparable across temperatures (Hinton et al.)
    kd = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") * temperature**2
    if not eval_stats:
        return torch.stack([kd, ce])
    teacher_ce = F.cross_entropy(t_logits, targets, reduction="sum")
    agree = (t_logits.argmax(-1) == s_logits.argmax(-1)).sum().to(ce.dtype)
    return torch.stack([kd, ce, teacher_ce, agree])


def _select(hidden: torch.Tensor | None, where: torch.Tensor) -> torch.Tensor | None:
    return None if hidden is None else hidden.reshape(-1, hidden.shape[-1])[where]


def distillation_sums(student_hidden: torch.Tensor, student_head: torch.Tensor, targets: torch.Tensor,
                      teacher_hidden: torch.Tensor | None = None, teacher_head: torch.Tensor | None = None,
                      temperature: float = 1.0, chunk_tokens: int = 1024, eval_stats: bool = False
                      ) -> dict[str, torch.Tensor]:
    """Summed KD and CE over every position with a target.

    student_hidden / teacher_hidden: (B, T, D) final (normed) hidden states; *_head: (V, D) lm_head weights;
    targets: (B, T) from `next_token_targets`. Returns `kd_sum` (T²·KL(teacher_T ‖ student_T), 0 without teacher),
    `ce_sum`, `count` (target tokens); with `eval_stats` also `teacher_ce_sum` and `agree` (argmax matches).
    """
    where = targets.reshape(-1) != IGNORE_INDEX
    y = targets.reshape(-1)[where]
    hs, ht = _select(student_hidden, where), _select(teacher_hidden, where)
    zero = student_hidden.new_zeros((), dtype=torch.float32)
    kd = ce = teacher_ce = agree = zero
    for i in range(0, y.numel(), chunk_tokens):
        part = slice(i, i + chunk_tokens)
        ht_i = None if ht is None else ht[part]
        args = (hs[part], ht_i, student_head, teacher_head, y[part], temperature)
        if torch.is_grad_enabled():  # training: recompute the chunk's logits in backward instead of keeping them
            sums = checkpoint(_chunk_losses, *args, use_reentrant=False)
        else:
            sums = _chunk_losses(*args, eval_stats=eval_stats)
        kd, ce = kd + sums[0], ce + sums[1]
        if len(sums) == 4:
            teacher_ce, agree = teacher_ce + sums[2], agree + sums[3]
    out = {"kd_sum": kd, "ce_sum": ce, "count": where.sum()}
    if eval_stats:
        out.update(teacher_ce_sum=teacher_ce, agree=agree)
    return out


def alignment_sum(student_states: list[torch.Tensor], teacher_states: list[torch.Tensor],
                  targets: torch.Tensor) -> torch.Tensor:
    """Per-layer hidden-state alignment: mean squared error per hidden unit, averaged over layers, summed over
    the positions that have a target (so it averages per token like KD). States: L tensors of (B, T, D)."""
    if len(student_states) != len(teacher_states):
        raise ValueError(f"student has {len(student_states)} aligned layers, teacher {len(teacher_states)}")
    where = (targets != IGNORE_INDEX).unsqueeze(-1)
    total = student_states[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(student_states, teacher_states, strict=True):
        err = (s.float() - t.float()).pow(2).mean(-1, keepdim=True)  # (B, T, 1)
        total = total + (err * where).sum()
    return total / len(student_states)
