"""Distillation losses as pure functions of hidden states and lm_head weights.

Logits are never materialised for the whole batch: at vocab 151,936 one 4k-token sequence is 2.5 GB of float32
logits per model. `distillation_sums` selects the positions that have a target, then walks them in chunks.

Training uses a fused head (`_FusedHeadLoss`): for each chunk it computes both models' logits once, the loss
sums, and the gradient of the weighted loss with respect to the student's logits in closed form
(KD: T·(softmax(s/T) − softmax(t/T)); CE: softmax(s) − onehot(y)), which it turns into the gradients of the
student's hidden states and head weight right away. The backward pass then only scales them: no logits are kept
or recomputed (the teacher's head matmul runs once instead of twice, the student's three times instead of four).
Evaluation (no gradients) computes the same sums chunk by chunk in `_chunk_losses`.

We return *sums* and the number of target tokens, so that a trainer can average over every token of a global
batch (all micro-batches, all ranks) rather than averaging per-batch means.

Checked before writing by hand: Liger-Kernel's `LigerFusedLinear*` losses and fla's `FusedKLDivLoss` /
`FusedLinearCrossEntropyLoss` fuse the same idea, but need Triton (absent on CPU), normalise per batch, and fla's
KL takes no temperature and no CE term; torch has no fused linear + KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def depth_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """(B, T-k-1) targets of MTP depth k (model/mtp.py): position i predicts labels[i + k + 1], the data token
    k + 1 steps ahead. IGNORE_INDEX where position i or its target is padding (padding is contiguous on either
    side, so the tokens in between are real too). Depth 0 would be `next_token_targets` without its last column."""
    targets = labels[:, k + 1 :]
    if attention_mask is not None:
        real = attention_mask.bool()
        targets = targets.masked_fill(~real[:, : targets.shape[1]] | ~real[:, k + 1 :], IGNORE_INDEX)
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


def _logit_grad(s_logits, t_logits, targets, temperature: float, kd_weight: float, ce_weight: float):
    """(kd sum, ce sum, d(kd_weight·KD + ce_weight·CE)/d s_logits) for one chunk; logits (N, V) float32.

    Works in place where it can (t_logits and the softmax buffers are consumed), so a chunk peaks at about four
    (N, V) buffers."""
    log_z = torch.logsumexp(s_logits, -1, keepdim=True)  # (N, 1)
    ce = (log_z.squeeze(-1) - s_logits.gather(-1, targets[:, None]).squeeze(-1)).sum()
    kd = ce.new_zeros(())
    grad = None
    if t_logits is not None:
        t_logp = t_logits.div_(temperature)
        t_logp = t_logp.sub_(torch.logsumexp(t_logp, -1, keepdim=True))  # log softmax(t/T), in t_logits' buffer
        s_logp = (s_logits - log_z) if temperature == 1 else F.log_softmax(s_logits / temperature, dim=-1)
        t_p = t_logp.exp()
        kd = t_logp.sub_(s_logp).mul_(t_p).sum() * temperature**2  # T²·KL(p_t ‖ p_s), t_logp consumed
        del t_logp
        grad = s_logp.exp_().sub_(t_p).mul_(kd_weight * temperature)  # T·(softmax(s/T) − p_t), in s_logp's buffer
        del t_p
    if ce_weight:
        p_s = (s_logits - log_z).exp_()  # softmax(s) − onehot(y)
        p_s.scatter_add_(-1, targets[:, None], p_s.new_full((targets.numel(), 1), -1.0))
        grad = p_s.mul_(ce_weight) if grad is None else grad.add_(p_s, alpha=ce_weight)
    if grad is None:
        grad = torch.zeros_like(s_logits)
    return kd, ce, grad


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits, float64 kept (exact reference checks)."""
    return x if x.dtype == torch.float64 else x.float()


class _FusedHeadLoss(torch.autograd.Function):
    """kd_weight·KD + ce_weight·CE over all positions, with the head's gradients computed in the forward pass.

    Returns (weighted sum [differentiable], kd sum, ce sum). The gradient of the student's head weight is
    accumulated in float32 over chunks and cast to the weight's dtype once.
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, targets, temperature, kd_weight, ce_weight, chunk_tokens):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hs) if want_h else None
        acc = _wide(hs.new_zeros(())).dtype
        grad_w = torch.zeros(ws.shape, dtype=acc, device=ws.device) if want_w else None
        kd = ce = hs.new_zeros((), dtype=acc)
        for i in range(0, targets.numel(), chunk_tokens):
            part = slice(i, i + chunk_tokens)
            s_logits = _wide(hs[part] @ ws.T)
            t_logits = None if ht is None else _wide(ht[part] @ wt.T)
            kd_i, ce_i, dlogits = _logit_grad(s_logits, t_logits, targets[part], temperature, kd_weight, ce_weight)
            kd, ce = kd + kd_i, ce + ce_i
            dlogits = dlogits.to(hs.dtype)
            if want_h:
                grad_h[part] = dlogits @ ws.to(hs.dtype)
            if want_w:
                grad_w += dlogits.T @ hs[part]
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(ws.dtype))
        loss = kd * kd_weight + ce * ce_weight
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None


def _select(hidden: torch.Tensor | None, where: torch.Tensor) -> torch.Tensor | None:
    return None if hidden is None else hidden.reshape(-1, hidden.shape[-1])[where]


def distillation_sums(student_hidden: torch.Tensor, student_head: torch.Tensor, targets: torch.Tensor,
                      teacher_hidden: torch.Tensor | None = None, teacher_head: torch.Tensor | None = None,
                      temperature: float = 1.0, chunk_tokens: int = 1024, eval_stats: bool = False,
                      kd_weight: float = 1.0, ce_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Summed KD and CE over every position with a target.

    student_hidden / teacher_hidden: (B, T, D) final (normed) hidden states; *_head: (V, D) lm_head weights;
    targets: (B, T) from `next_token_targets`. Returns `kd_sum` (T²·KL(teacher_T ‖ student_T), 0 without teacher),
    `ce_sum`, `count` (target tokens) and `loss_sum` = kd_weight·kd_sum + ce_weight·ce_sum, the one term that
    carries gradients when they are enabled (kd_sum and ce_sum are then plain values); with `eval_stats` also
    `teacher_ce_sum` and `agree` (argmax matches).
    """
    where = targets.reshape(-1) != IGNORE_INDEX
    y = targets.reshape(-1)[where]
    hs, ht = _select(student_hidden, where), _select(teacher_hidden, where)
    if teacher_hidden is None:
        kd_weight = 0.0
    if torch.is_grad_enabled() and not eval_stats and (kd_weight or ce_weight):
        loss, kd, ce = _FusedHeadLoss.apply(hs, student_head, ht, teacher_head, y, temperature, kd_weight,
                                            ce_weight, chunk_tokens)
        return {"loss_sum": loss, "kd_sum": kd, "ce_sum": ce, "count": where.sum()}
    zero = student_hidden.new_zeros((), dtype=torch.float32)
    kd = ce = teacher_ce = agree = zero
    with torch.no_grad():  # values only: evaluation, or a loss that gives the head no weight (--align-only)
        for i in range(0, y.numel(), chunk_tokens):
            part = slice(i, i + chunk_tokens)
            sums = _chunk_losses(hs[part], None if ht is None else ht[part], student_head, teacher_head, y[part],
                                 temperature, eval_stats=eval_stats)
            kd, ce = kd + sums[0], ce + sums[1]
            if len(sums) == 4:
                teacher_ce, agree = teacher_ce + sums[2], agree + sums[3]
    out = {"loss_sum": kd * kd_weight + ce * ce_weight, "kd_sum": kd, "ce_sum": ce, "count": where.sum()}
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
