"""ETD training pieces: focal loss and class weights against hand computations, route search against exhaustive
search and the base model's log-likelihood, router / expert steps that leave the base untouched, bias balancing."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_etd import VOCAB, etd, tiny_hybrid

from hybridize import HybridizeError
from hybridize.model.etd import EXECUTE, SKIP
from hybridize.train.etd import (
    class_weights,
    exhaustive_routes,
    expert_step,
    freeze_for,
    router_loss,
    router_step,
    search_routes,
    sequence_logliks,
    update_expert_bias,
)


def test_router_loss_is_focal_and_weighted():
    logits = torch.zeros(4, 3)
    labels = torch.tensor([0, 1, 1, 2])
    # uniform p = 1/3: (1 - 1/3)^2 · log 3
    assert router_loss(logits, labels, gamma=2.0).item() == pytest.approx((2 / 3) ** 2 * math.log(3), rel=1e-6)
    logits = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))
    w = torch.tensor([2.0, 0.5, 1.0])
    assert router_loss(logits, labels, w, gamma=0.0).item() == pytest.approx(
        F.cross_entropy(logits, labels, weight=w).item(), rel=1e-6)


def test_class_weights_are_inverse_frequency():
    assert class_weights(torch.tensor([1, 1, 1, 0])).tolist() == pytest.approx([1.5, 0.5, 0.0])


@pytest.fixture(scope="module")
def model_and_ids():
    base = tiny_hybrid()
    ids = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logp = torch.log_softmax(base(ids).logits[:, :-1], -1)
    base_ll = logp.gather(-1, ids[:, 1:, None])[..., 0].mean(-1)
    model = etd(base, n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1, max_think_iterations=1)
    return model, ids, base_ll


def test_search_improves_on_execute_and_matches_exhaustive_bound(model_and_ids):
    model, ids, base_ll = model_and_ids
    execute = torch.full((3, 1, 2), EXECUTE)
    assert (sequence_logliks(model, ids, execute) - base_ll).abs().max().item() <= 1e-5
    routes, ll = search_routes(model, ids)
    assert (ll >= base_ll - 1e-6).all()
    assert torch.allclose(sequence_logliks(model, ids, routes), ll, atol=1e-6)
    best, best_ll = exhaustive_routes(model, ids)  # 9 paths
    assert (best_ll >= ll - 1e-6).all()
    # a large skip bonus makes every position SKIP
    skipped, _ = search_routes(model, ids, skip_bonus=100.0)
    assert bool((skipped == SKIP).all())


def test_router_training_lowers_its_loss_and_leaves_the_base_alone(model_and_ids):
    model, ids, _ = model_and_ids
    trainable = freeze_for(model, "routers")
    assert trainable == sum(p.numel() for p in model.model.etd.layer_router.parameters())
    routes = torch.tensor([[[SKIP, EXECUTE]], [[EXECUTE, 2]], [[SKIP, 2]]])
    before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = [router_step(model, ids, routes, opt) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_expert_training_and_bias_balancing():
    model = etd(tiny_hybrid(), n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1, max_think_iterations=2,
                use_layer_router=False)
    with pytest.raises(HybridizeError, match="no routers"):
        freeze_for(model, "routers")
    freeze_for(model, "experts")
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = [expert_step(model, ids, opt, balance_rate=0.01) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.model.etd.lora[0].gate_B.abs().max() > 0
    biases = torch.stack([r.balance_bias for row in model.model.etd.expert_router for r in row])
    assert biases.abs().max().item() > 0  # moved by the loads, in steps of 0.01
    assert torch.allclose(biases * 100, (biases * 100).round(), atol=1e-4)
    router = model.model.etd.expert_router[0][0]
    router.balance_bias.zero_()
    router.load = torch.tensor([3.0, 1.0, 0.0, 0.0])  # mean 1
    update_expert_bias(model, rate=0.5)
    assert router.balance_bias.tolist() == [-0.5, 0.0, 0.5, 0.5] and router.load is None


def test_expert_kd_starts_at_zero_against_the_models_own_logits():
    """KL(teacher ‖ student) with the student's own logits as the teacher is 0 before the first update."""
    model = etd(tiny_hybrid(), n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1, use_layer_router=False)
    freeze_for(model, "experts")
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        own = model(ids).logits
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert abs(expert_step(model, ids, opt, teacher_logits=own)) <= 1e-6
    assert expert_step(model, ids, opt, teacher_logits=own + torch.randn_like(own)) > 0.01


def test_gradient_checkpointing_gives_the_same_expert_gradients():
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = etd(tiny_hybrid(), n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1)
        with torch.no_grad():
            for p in model.model.etd.lora.parameters():
                p.normal_(0, 0.1)
        freeze_for(model, "experts")
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 1e-3 and torch.equal(grads[0], grads[1])
