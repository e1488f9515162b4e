"""Training ETD's additions with the base frozen: Dr.LLM-style router supervision and MoDr expert training.

Routers (Dr.LLM, arXiv 2510.12773): for each sequence, a search over per-(iteration, think layer) edits —
SKIP or REPEAT instead of EXECUTE — keeps the edits that raise the sequence's reference log-likelihood (a SKIP is
kept also when it costs at most `skip_bonus` nats per token: fewer executions at equal quality). The search path
becomes the label of every token of that sequence at that position, and the routers learn it with the path forced
(teacher forcing on the searched hidden states), through a class-weighted focal loss (EXECUTE dominates the
labels). Left out against Dr.LLM: its MCTS (ours is one greedy pass over positions, exact on small grids) and
its windowed pooling (deliberately: routes stay per token and causal).

Experts (MoDr): LoRA experts and their routers learn next-token CE (or KL to a teacher's logits) with every base
weight frozen; after each optimizer step `update_expert_bias` moves each router's balance bias towards
under-loaded experts by a fixed step (DeepSeek-V3's auxiliary-loss-free balancing), outside the gradient.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..errors import HybridizeError
from ..model.etd import EXECUTE, REPEAT, SKIP, ETDForCausalLM

PARTS = ("routers", "experts")


def router_loss(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None = None,
                gamma: float = 2.0) -> torch.Tensor:
    """Focal loss  Σ w_y (1 − p_y)^γ (−log p_y) / Σ w_y  over tokens; γ = 0 is class-weighted cross-entropy.

    logits (N, 3), labels (N,) in {SKIP, EXECUTE, REPEAT}; class_weights (3,) or None (all 1)."""
    logp = F.log_softmax(logits.float(), -1).gather(-1, labels[:, None])[:, 0]  # (N,)
    w = torch.ones_like(logp) if class_weights is None else class_weights.to(logp)[labels]
    return (w * (1 - logp.exp()) ** gamma * -logp).sum() / w.sum()


def class_weights(labels: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 over the classes present, 0 for absent ones (EXECUTE is the majority)."""
    counts = torch.bincount(labels.flatten(), minlength=num_classes).float()
    w = torch.where(counts > 0, 1 / counts.clamp(min=1), torch.zeros_like(counts))
    return w * (counts > 0).sum() / w.sum()


def freeze_for(model: ETDForCausalLM, part: str) -> int:
    """Leave only `part`'s parameters trainable ("routers": layer routers; "experts": LoRA + expert routers);
    returns how many parameters train."""
    if part not in PARTS:
        raise HybridizeError(f"unknown part {part!r}; choose one of {', '.join(PARTS)}")
    prefixes = ("model.etd.layer_router.",) if part == "routers" else ("model.etd.lora.", "model.etd.expert_router.")
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
        count += p.numel() if p.requires_grad else 0
    if count == 0:
        raise HybridizeError(f"the model has no {part} to train (see its ETDConfig)")
    return count


@torch.no_grad()
def sequence_logliks(model: ETDForCausalLM, ids: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """Mean next-token log-likelihood per sequence (B,) with each sequence's routes (B, T, K) forced."""
    model.model.forced_routes = routes
    try:
        with _autocast(ids):
            logits = model(ids).logits[:, :-1].float()
    finally:
        model.model.forced_routes = None
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0].mean(-1)


def _autocast(ids: torch.Tensor):
    """bfloat16 autocast on CUDA (the trained routers and experts and AdamW stay float32), as train-mtp does."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda)


def _grid(model: ETDForCausalLM) -> tuple[int, int]:
    etd = model.model.etd.settings
    if not etd.use_layer_router:
        raise HybridizeError("the model has no layer router (ETDConfig.use_layer_router=False)")
    return etd.max_think_iterations, etd.n_think_layers


def search_routes(model: ETDForCausalLM, ids: torch.Tensor, skip_bonus: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy per-sequence search: from all-EXECUTE, visit each (iteration, layer) once and keep SKIP or REPEAT
    when it raises  loglik + skip_bonus · #SKIP  (per token). Returns routes (B, T, K) and their logliks (B,)."""
    B = ids.shape[0]
    routes = torch.full((B, *_grid(model)), EXECUTE, dtype=torch.long, device=ids.device)
    ll = sequence_logliks(model, ids, routes)
    score = ll.clone()
    for t, j in itertools.product(*map(range, routes.shape[1:])):
        for option in (SKIP, REPEAT):
            trial = routes.clone()
            trial[:, t, j] = option
            trial_ll = sequence_logliks(model, ids, trial)
            trial_score = trial_ll + skip_bonus * (trial == SKIP).sum((1, 2))
            better = trial_score > score
            routes = torch.where(better[:, None, None], trial, routes)  # no boolean indexing: no host sync
            ll, score = torch.where(better, trial_ll, ll), torch.where(better, trial_score, score)
    return routes, ll


def exhaustive_routes(model: ETDForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every route path (3^(T·K) of them: tiny grids only); returns the best per sequence and its loglik."""
    shape = _grid(model)
    best_ll = torch.full((ids.shape[0],), -torch.inf, device=ids.device)
    best = torch.empty((ids.shape[0], *shape), dtype=torch.long, device=ids.device)
    for path in itertools.product((SKIP, EXECUTE, REPEAT), repeat=shape[0] * shape[1]):
        routes = torch.tensor(path, device=ids.device).view(1, *shape).expand(ids.shape[0], *shape)
        ll = sequence_logliks(model, ids, routes)
        better = ll > best_ll
        best[better], best_ll = routes[better], torch.where(better, ll, best_ll)
    return best, best_ll


def router_step(model: ETDForCausalLM, ids: torch.Tensor, routes: torch.Tensor, optimizer, gamma: float = 2.0
                ) -> float:
    """One step of router training: forward with the searched routes forced, focal loss of every router on the
    route label of its position (broadcast over the sequence's tokens), class-weighted."""
    model.model.forced_routes = routes
    try:
        with _autocast(ids):
            model(ids)
    finally:
        model.model.forced_routes = None
    logits = torch.stack(model.model.last_routing["router_logits"], 1)  # (B, T·K, L, 3), (t, j) order
    labels = routes.flatten(1)[:, :, None].expand(logits.shape[:3])
    labels = labels.reshape(-1)
    loss = router_loss(logits.reshape(-1, 3), labels, class_weights(labels), gamma)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def update_expert_bias(model: ETDForCausalLM, rate: float = 1e-3) -> None:
    """Auxiliary-loss-free balancing: bias_e += rate · sign(mean load − load_e) per expert router, then reset the
    load counters (filled by training-mode forwards)."""
    for row in getattr(model.model.etd, "expert_router", []):
        for router in row:
            if router.load is not None:
                router.balance_bias += rate * torch.sign(router.load.mean() - router.load).to(router.balance_bias)
                router.load = None


def expert_step(model: ETDForCausalLM, ids: torch.Tensor, optimizer, teacher_logits: torch.Tensor | None = None,
                balance_rate: float = 1e-3) -> float:
    """One step of expert training (base frozen by `freeze_for(model, "experts")`): next-token CE, or KL to
    `teacher_logits` when given; then the load-balancing bias update."""
    model.train()
    with _autocast(ids):
        logits = model(ids).logits[:, :-1].float()
    if teacher_logits is None:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    else:
        log_p = F.log_softmax(teacher_logits[:, :-1].float(), -1)
        loss = (log_p.exp() * (log_p - F.log_softmax(logits, -1))).sum(-1).mean()  # KL(teacher ‖ student) / token
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    update_expert_bias(model, balance_rate)
    return loss.item()


__all__ = ["router_loss", "class_weights", "freeze_for", "sequence_logliks", "search_routes", "exhaustive_routes",
           "router_step", "update_expert_bias", "expert_step"]
