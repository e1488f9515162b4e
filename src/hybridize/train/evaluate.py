"""Held-out evaluation: perplexity, and against a teacher the per-token KL and greedy agreement.

Shared by `hybridize eval` (one process, plain modules) and the trainer's periodic eval (FSDP2 over N ranks: each
rank takes every N-th window and the sums are all-reduced).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .objective import DistillationObjective


@torch.no_grad()
def evaluate(objective: DistillationObjective, windows: torch.Tensor, batch_size: int, env=None,
             progress: bool = False) -> dict:
    """Metrics over `windows` (k, seq_len) of token ids, averaged per predicted token.

    Returns tokens, loss (student CE) and perplexity; with a teacher also teacher_loss, teacher_perplexity,
    kl (KL(teacher ‖ student) per token, temperature 1) and agreement (share of positions where the two argmaxes
    agree). `env` (a DistEnv) shards the windows over ranks; None means one process on the student's device.
    """
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    device = env.device if env is not None else next(objective.student.parameters()).device
    usable = windows.shape[0] - windows.shape[0] % world  # every rank must run the same number of forwards
    mine = windows[rank:usable:world]
    was_training = objective.training
    objective.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # ce, kl, teacher ce, agree, count
    for i in tqdm(range(0, mine.shape[0], batch_size), desc="eval", disable=not progress, unit="batch"):
        batch = mine[i:i + batch_size].to(device)
        out = objective(batch, batch, eval_stats=True)
        zero = out["ce_sum"].new_zeros(())
        sums += torch.stack([out["ce_sum"], out["kd_sum"], out.get("teacher_ce_sum", zero),
                             out.get("agree", zero), out["count"].to(zero.dtype)]).double()
    if world > 1:
        dist.all_reduce(sums)
    objective.train(was_training)
    ce, kl, teacher_ce, agree, count = sums.tolist()
    n = max(count, 1.0)
    result = {"tokens": int(count), "loss": ce / n, "perplexity": math.exp(min(ce / n, 700.0))}
    if objective.teacher is not None:
        result.update(teacher_loss=teacher_ce / n, teacher_perplexity=math.exp(min(teacher_ce / n, 700.0)),
                      kl=kl / n, agreement=agree / n)
    return result
