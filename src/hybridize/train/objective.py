"""The distillation objective as one module, so that FSDP2 sees a single root forward.

`DistillationObjective(student, teacher)` runs both models and returns summed losses (see losses.py). Keeping the
lm_head matmuls inside this forward matters under FSDP2: the root unit's parameters (embeddings, final norms,
lm_heads) are only gathered while the root module runs, and the chunked loss reads the heads' weights directly.
The student's MTP heads (`student.mtp`, with `mtp=True`) belong to that root unit too, and run inside this forward.

Joint MTP training (`hybridize distill --mtp`, DeepSeek-V3 §2.2 / Qwen3.5 style): depth k at position i is scored
by cross-entropy on the *data* token x_{i+k+1}, and its gradients reach the backbone through h^0, the embeddings
and the shared lm_head. Why data tokens and not self-distillation targets (the backbone's own argmax, what
`hybridize train-mtp` uses): here the backbone trains too, and a target computed from the backbone would let the
MTP loss pull the backbone toward predictions that are easy for the heads (a moving, self-made target), while
the data tokens are fixed, are what the standard recipes train on, and cost no extra vocabulary-wide pass. Once
the backbone is healed, `train-mtp` can still tune the heads to the backbone's own predictions for acceptance.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.mtp import mtp_depth_states
from .losses import alignment_sum, depth_targets, distillation_sums, next_token_targets


def final_hidden(lm: nn.Module, input_ids, attention_mask, position_ids, with_states: bool):
    """(final normed hidden (B, T, D), per-layer states or None) of a HybridForCausalLM or a transformers LM.

    The states are the outputs of layers 0..L-2 plus the final normed output: the last layer is compared after the
    final norm because transformers reports it post-norm and ours pre-norm.
    """
    out = lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   output_hidden_states=with_states)
    final, states = out if isinstance(out, tuple) else (out.last_hidden_state, out.hidden_states)
    if not with_states:
        return final, None
    return final, [*states[1:-1], final]


class DistillationObjective(nn.Module):
    """Student and (frozen, optional) teacher; forward returns loss sums over the batch's target tokens.

    temperature: KD softmax temperature; align: compute per-layer hidden-state alignment (needs equal depth and
    width); chunk_tokens: positions per logits chunk; kd_weight / ce_weight: the weights of the differentiable
    `loss_sum` = kd_weight·kd_sum + ce_weight·ce_sum (the trainer's α and 1 − α); mtp: also score the student's
    MTP heads (`mtp_sums`, see `mtp_sums`), outside evaluation.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, temperature: float = 1.0,
                 align: bool = False, chunk_tokens: int = 1024, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 mtp: bool = False):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.temperature = temperature
        self.align = align
        self.chunk_tokens = chunk_tokens
        self.kd_weight, self.ce_weight = kd_weight, ce_weight
        self.mtp = mtp
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                eval_stats: bool = False) -> dict[str, torch.Tensor]:
        """Loss sums (see losses.distillation_sums; plus `align_sum` when aligning, `mtp_sums` / `mtp_counts` with
        MTP heads); `eval_stats` adds teacher CE and agreement, at temperature 1."""
        targets = next_token_targets(labels, attention_mask)
        # real tokens count positions from 0 whatever the padding side, for both models alike
        position_ids = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        teacher_final = teacher_states = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_final, teacher_states = final_hidden(
                    self.teacher, input_ids, attention_mask, position_ids, self.align)
        student_final, student_states = final_hidden(
            self.student, input_ids, attention_mask, position_ids, self.align)
        out = distillation_sums(
            student_final, self.student.lm_head.weight, targets, teacher_final,
            None if self.teacher is None else self.teacher.lm_head.weight,
            1.0 if eval_stats else self.temperature, self.chunk_tokens, eval_stats, self.kd_weight, self.ce_weight,
        )
        if self.align:
            out["align_sum"] = alignment_sum(student_states, teacher_states, targets)
        if self.mtp and not eval_stats:
            out["mtp_sums"], out["mtp_counts"] = self.mtp_sums(input_ids, labels, attention_mask, student_final)
        return out

    def mtp_sums(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                 hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy sum, target count) of each MTP depth, two (depths,) tensors; only the sums carry
        gradients. The data token k+1 steps ahead is depth k's target (see the module docstring); the head's
        logits go through the same chunked, fused loss as the next-token CE, so no (tokens, vocab) tensor is
        kept for the backward pass."""
        student = self.student
        depths = student.config.num_predict_tokens
        wide = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # as the fused loss accumulates
        sums = [hidden.new_zeros((), dtype=wide) for _ in range(depths)]
        counts = [torch.zeros((), dtype=torch.long, device=hidden.device) for _ in range(depths)]
        mask = None if attention_mask is None else attention_mask.bool()
        embeds = student.model.embed_tokens(input_ids)
        for k, h in mtp_depth_states(student.mtp, hidden, embeds, mask, depths):
            scored = distillation_sums(h[:, :-1], student.lm_head.weight, depth_targets(labels, mask, k),
                                       chunk_tokens=self.chunk_tokens, kd_weight=0.0, ce_weight=1.0)
            sums[k - 1], counts[k - 1] = scored["loss_sum"].to(wide), scored["count"]
        return torch.stack(sums), torch.stack(counts)
