"""Encode–Think–Decode: config checks, equality with the base hybrid, looping semantics against hand-written
layer loops, cache == full forward with random routers and experts, causality, save/load, export refusal."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from hybridize import (
    CrossArchTransferConfig,
    ETDConfig,
    ETDForCausalLM,
    HybridCache,
    HybridConfig,
    HybridForCausalLM,
    HybridizeError,
    create_full_hybrid_model,
)
from hybridize.model.etd import EXECUTE, REPEAT, SKIP, default_split, etd_from_hybrid

VOCAB = 97


def tiny_hybrid(seed: int = 0, layers: int = 4) -> HybridForCausalLM:
    """A tiny hybrid (DeltaNet and attention layers) whose every parameter matters (norms and z off their init)."""
    torch.manual_seed(seed)
    cfg = HybridConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, pad_token_id=0,
                       eos_token_id=None)
    model = HybridForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def randomize_etd(model: ETDForCausalLM, seed: int = 1) -> ETDForCausalLM:
    """Non-zero routers and experts: routes mix SKIP / EXECUTE / REPEAT and experts add something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.etd.named_parameters():
            scale = 0.3 if "lora" in name else 1.0
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def etd(model, **kw) -> ETDForCausalLM:
    return etd_from_hybrid(model, ETDConfig(**kw)).eval()


def plain_loop(base: HybridForCausalLM, ids, order: list[int]) -> torch.Tensor:
    """Independent computation: run the base layers in `order` (indices may repeat) without any cache."""
    m = base.model
    x = m.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    pe = m.rotary_emb(x, pos)
    for i in order:
        x = m.layers[i](x, pe)
    return base.lm_head(m.norm(x))


# ------------------------------------------------------------------------------------------------------ config


def test_config_validation_is_one_line():
    with pytest.raises(HybridizeError, match="max_think_iterations is 0"):
        ETDConfig(max_think_iterations=0)
    with pytest.raises(HybridizeError, match="confidence_threshold is 1.5"):
        ETDConfig(confidence_threshold=1.5)
    with pytest.raises(HybridizeError, match="n_think_layers is 0"):
        ETDConfig(1, 0, 1)
    with pytest.raises(HybridizeError, match="use_layer_router is 'yes'"):
        ETDConfig(use_layer_router="yes")
    with pytest.raises(HybridizeError, match="= 5, but the model has 4"):
        ETDConfig(1, 3, 1).resolve(4)
    with pytest.raises(HybridizeError, match="give all three"):
        ETDConfig(1, None, 1).resolve(4)
    assert default_split(4) == (1, 2, 1) and default_split(36) == (9, 18, 9) and default_split(2) == (0, 2, 0)
    assert ETDConfig().resolve(30).n_think_layers == 16


# ------------------------------------------------------------------------------------------- equality, looping


@torch.no_grad()
def test_one_iteration_equals_base_hybrid():
    base = tiny_hybrid()
    ids = torch.randint(1, VOCAB, (2, 17))
    ref = base(ids).logits
    model = etd(base, n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1, max_think_iterations=1,
                use_layer_router=False, use_lora_experts=True)
    delta = (model(ids).logits - ref).abs().max().item()
    assert delta <= 1e-5, delta  # measured 0.0: B = 0 adds an exact zero
    names = [n for n, _ in model.named_parameters() if ".etd." in n]
    assert names and all(("router" in n) != ("lora" in n) for n in names)


@torch.no_grad()
def test_untrained_router_executes_and_iterations_loop_the_think_block():
    """Two iterations with a fresh router (EXECUTE prior) and zero B = encoder, think, think, decoder."""
    base = tiny_hybrid()
    ids = torch.randint(1, VOCAB, (2, 15))
    ref = plain_loop(base, ids, [0, 1, 2, 1, 2, 3])
    model = etd(base, n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1, max_think_iterations=2)
    assert (model(ids).logits - ref).abs().max().item() <= 1e-5
    assert all(bool((d == EXECUTE).all()) for d in model.model.last_routing["decisions"])


@pytest.mark.parametrize("route, order", [(SKIP, [0, 3]), (REPEAT, [0, 1, 1, 2, 2, 3])])
@torch.no_grad()
def test_forced_skip_and_repeat_equal_hand_loops(route, order):
    """SKIP keeps the residual (the layer still runs for its state); REPEAT applies the layer twice."""
    base = tiny_hybrid()
    ids = torch.randint(1, VOCAB, (2, 11))
    ref = plain_loop(base, ids, order)
    model = etd(base, n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1, max_think_iterations=1)
    model.model.forced_routes = torch.full((2, 1, 2), route)
    assert (model(ids).logits - ref).abs().max().item() <= 1e-5
    saved = model.think_executions()["saved"]
    assert saved == (1.0 if route == SKIP else -1.0)


# ------------------------------------------------------------------------------------------ cache, causality


@pytest.fixture(scope="module")
def random_etd():
    model = randomize_etd(etd(tiny_hybrid(), n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1,
                              max_think_iterations=2))
    ids = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
    decisions = torch.cat([d.flatten() for d in model.model.last_routing["decisions"]])
    experts = torch.cat([c.flatten() for c in model.model.last_routing["expert_choice"]])
    # guards: the routes really mix, experts differ per token, and the experts change the output
    assert {SKIP, EXECUTE, REPEAT} <= set(decisions.tolist()) and len(set(experts.tolist())) >= 2
    return model, ids, full


@torch.no_grad()
def test_cached_decoding_equals_full_forward(random_etd):
    model, ids, full = random_etd
    cache = HybridCache(model.config)
    parts = [model(ids[:, :9], cache=cache).logits, model(ids[:, 9:16], cache=cache).logits]
    parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(16, 24)]
    delta = (torch.cat(parts, 1) - full).abs().max().item()
    # float32 rounding of the chunked (full) against the one-token (cached) recurrences, amplified by two random
    # think iterations (logits up to 1.65): 1.04e-4 on one 2-core CPU, below 1e-4 on another; the same comparison
    # with float64 weights gives 2.2e-6 (the norms compute in float32)
    assert delta <= 2e-4, delta
    # L = 4 layers, T = 2 iterations, think layers 1, 2: iteration 1 at t·L + i, REPEAT passes at (T + t)·L + i
    assert set(cache.conv_states) | set(cache.key_cache) == {0, 1, 2, 3, 5, 6, 9, 10, 13, 14}


@torch.no_grad()
def test_prefix_logits_do_not_change_when_tokens_are_appended(random_etd):
    model, ids, full = random_etd
    delta = (model(ids[:, :10]).logits - full[:, :10]).abs().max().item()
    assert delta <= 1e-5, delta


@torch.no_grad()
def test_generate_equals_full_forward_greedy(random_etd):
    model, ids, _ = random_etd
    prompt = ids[:1, :8]
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    seq = prompt
    for step in range(10):  # greedy with a full forward over the whole sequence each step
        logits = model(seq).logits[:, -1]
        assert (logits - out.logits[step]).abs().max().item() <= 1e-4
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, seq)


@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(random_etd):
    """Routes and expert choices of padded positions never reach real tokens."""
    model, ids, _ = random_etd
    ids = ids[:, :14]
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    out = model(ids.masked_fill(mask == 0, 0), attention_mask=mask).logits
    for b in range(2):
        n = int(mask[b].sum())
        assert (out[b, -n:] - model(ids[b:b + 1, -n:]).logits[0]).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------------------- save, load, create


@torch.no_grad()
def test_save_load_round_trip_through_auto(random_etd, tmp_path):
    model, ids, full = random_etd
    model.model.etd.expert_router[1][0].balance_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.1]))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ETDForCausalLM and loaded.config.etd == model.config.etd
    assert torch.equal(loaded.model.etd.expert_router[1][0].balance_bias, torch.tensor([0.5, -0.5, 0.0, 0.1]))
    assert (loaded(ids).logits - model(ids).logits).abs().max().item() == 0.0


@torch.no_grad()
def test_create_full_hybrid_model_with_etd(tiny_qwen3_dir):
    transfer = CrossArchTransferConfig(source_model=str(tiny_qwen3_dir))
    base = create_full_hybrid_model(transfer)  # the existing call still works
    assert type(base) is HybridForCausalLM
    ids = torch.randint(1, 128, (1, 12))
    model = create_full_hybrid_model(str(tiny_qwen3_dir), use_etd=True, etd_config=ETDConfig(
        max_think_iterations=1, use_layer_router=False))
    assert type(model) is ETDForCausalLM and model.config.etd["n_think_layers"] == 2
    assert (model(ids).logits - base(ids).logits).abs().max().item() <= 1e-5
    with pytest.raises(HybridizeError, match="use_etd is False"):
        create_full_hybrid_model(transfer, etd_config=ETDConfig())


@torch.no_grad()
def test_confidence_threshold_keeps_unsure_tokens_on_execute(random_etd):
    """The first router sees the same input whatever the threshold: its decision must be the argmax where the
    top probability reaches the threshold, EXECUTE elsewhere."""
    model, ids, _ = random_etd
    model(ids)
    probs = model.model.last_routing["router_logits"][0].softmax(-1)
    top, argmax = probs.max(-1)
    threshold = float(top.median())
    model.model.etd.settings.confidence_threshold = threshold
    try:
        model(ids)
        first = model.model.last_routing["decisions"][0]
    finally:
        model.model.etd.settings.confidence_threshold = 0.0
    expected = torch.where(top >= threshold, argmax, EXECUTE)
    assert torch.equal(first, expected) and (expected == EXECUTE).sum() > (argmax == EXECUTE).sum()


@torch.no_grad()
def test_composes_with_mtp_heads():
    """An ETD model over a hybrid with MTP heads: task + MTP loss, and speculative decoding (every rejected draft
    rolled back through the per-iteration cache slots) token-identical to plain greedy generate."""
    from hybridize.model.config import HybridConfig

    base = tiny_hybrid()
    cfg = {k: v for k, v in base.config.to_dict().items()
           if k not in ("model_type", "transformers_version", "architectures")}
    with_heads = HybridForCausalLM(HybridConfig(**{**cfg, "mtp_num_hidden_layers": 1, "num_predict_tokens": 3}))
    with_heads.load_state_dict(base.state_dict(), strict=False)
    torch.manual_seed(2)
    for p in with_heads.mtp.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    model = randomize_etd(etd(with_heads.eval(), n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1,
                              max_think_iterations=2))
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    out = model(ids, labels=ids)
    task = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:])
    weights = 0.3 * 0.8 ** torch.arange(3.0)  # mtp_loss_weight · mtp_loss_decay^(k-1), the config defaults
    assert out.mtp_losses.shape == (3,) and model.config.mtp_loss_weight == 0.3 and model.config.mtp_loss_decay == 0.8
    assert out.loss.item() == pytest.approx((task + (weights * out.mtp_losses).sum()).item(), rel=1e-5)
    reference = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    for drafts in (1, 3):
        for cache in ("dynamic", "static"):  # static: the fixed heads and the in-place rollback, run eagerly
            got = model.mtp_decoder.generate(ids, max_new_tokens=16, num_draft_tokens=drafts,
                                             cache_implementation=cache)
            assert torch.equal(got, reference), (drafts, cache)


def test_lora_expert_delta_equals_a_per_token_float64_loop():
    """Each token gets scaling · gate · B_e A_e x of its own expert e, nothing from the others."""
    from hybridize.model.etd import LoRAExperts

    torch.manual_seed(0)
    experts = LoRAExperts(hidden=12, intermediate=20, num_experts=4, rank=3, alpha=6.0).double()
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    choice = torch.randint(0, 4, (2, 7))
    choice[0, :4] = torch.tensor([0, 1, 2, 3])  # every expert chosen somewhere
    gate = torch.rand(2, 7, dtype=torch.float64)
    got = experts.delta("up", x, choice, gate)
    want = torch.stack([torch.stack([
        experts.scaling * gate[b, t] * experts.up_B[e] @ (experts.up_A[e] @ x[b, t])
        for t, e in enumerate(choice[b].tolist())]) for b in range(2)])
    assert got.shape == (2, 7, 20)
    assert (got - want).abs().max().item() < 1e-12
