"""The CUDA-graph decoding step on a StaticHybridCache (GPU, fla): replay == the same step run eagerly, and greedy
decoding equal to the dynamic cache (float32: every token; bfloat16: the first divergence over 256 tokens is
reported, as the issue asks)."""

from __future__ import annotations

import pytest
import torch

from hybridize import HybridCache, HybridConfig, HybridForCausalLM, StaticHybridCache
from hybridize.ops import fla_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not fla_available(), reason="flash-linear-attention (fla) is not installed"),
]

VOCAB = 512


def model_on_cuda(dtype) -> HybridForCausalLM:
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64)
    model = HybridForCausalLM(cfg)
    with torch.no_grad():  # peaked next-token distributions, so greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    return model.to("cuda", dtype).eval()


@torch.no_grad()
def _decode(model, ids, steps, cache, forced=None):
    """Greedy decoding through model(...) with `cache`, or fed the tokens `forced` (B, steps) instead of its own
    choices; returns the tokens (B, steps) and the logits that chose them (B, steps, V)."""
    logits = model(ids, cache=cache, logits_to_keep=1).logits[:, -1:]
    tokens, all_logits = [], []
    for i in range(steps):
        token = logits[:, -1:].argmax(-1) if forced is None else forced[:, i : i + 1]
        tokens.append(token)
        all_logits.append(logits[:, -1].float())
        logits = model(token, cache=cache).logits
    return torch.cat(tokens, 1), torch.stack(all_logits, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_eager_step(dtype):
    model = model_on_cuda(dtype)
    ids = torch.randint(1, VOCAB, (2, 100), device="cuda")
    graph_cache = StaticHybridCache(model.config, max_cache_len=200, cuda_graph=True)
    eager_cache = StaticHybridCache(model.config, max_cache_len=200, cuda_graph=False)
    a, la = _decode(model, ids, 64, graph_cache)
    b, lb = _decode(model, ids, 64, eager_cache)
    step = graph_cache.decode_step
    assert step.use_graph and step.graph is not None and not eager_cache.decode_step.use_graph
    delta = (la - lb).abs().max().item()
    print(f"{dtype}: graph replay vs eager fixed step, 64 tokens: max |Δ logits| {delta:.3g}")
    assert torch.equal(a, b) and delta <= 1e-5


def test_static_graph_greedy_equals_dynamic_float32():
    model = model_on_cuda(torch.float32)
    ids = torch.randint(1, VOCAB, (2, 100), device="cuda")
    a, la = _decode(model, ids, 64, StaticHybridCache(model.config, max_cache_len=200))
    b, lb = _decode(model, ids, 64, HybridCache(model.config))
    delta = (la - lb).abs().max().item()
    print(f"float32: static graph vs dynamic, 64 tokens: max |Δ logits| {delta:.3g}")
    assert torch.equal(a, b) and delta < 1e-2


def test_static_graph_vs_dynamic_bfloat16():
    """In bfloat16 the two paths round differently (other kernels, other orders), and a near-tie between two logits
    (bfloat16 resolves 0.25 at 50) flips a greedy choice at some step, so the first divergence of free-running
    decoding is reported, as the issue asks, not asserted on. What is asserted: fed the same tokens, the static graph's
    logits are as close to the float32 model's (the same weights before rounding) as the dynamic cache's are."""
    model = model_on_cuda(torch.bfloat16)
    ids = torch.randint(1, VOCAB, (1, 200), device="cuda")
    a, la = _decode(model, ids, 256, StaticHybridCache(model.config, max_cache_len=512))
    b, _ = _decode(model, ids, 256, HybridCache(model.config))
    differ = (a != b)[0].nonzero()
    _, lb = _decode(model, ids, 256, HybridCache(model.config), forced=a)
    with torch.no_grad():
        reference = model_on_cuda(torch.float32)(torch.cat([ids, a[:, :-1]], 1)).logits[:, ids.shape[1] - 1 :]
    static, dynamic = (la - reference).abs().max().item(), (lb - reference).abs().max().item()
    print(f"bfloat16, 256 greedy tokens: static graph vs dynamic first differ at step "
          f"{int(differ[0]) if len(differ) else 'none'}; fed the same tokens, max |Δ logits| from float32: static "
          f"{static:.3g}, dynamic {dynamic:.3g} (logits up to {reference.abs().max().item():.3g})")
    assert static <= 2 * dynamic, (static, dynamic)
    assert model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static").shape == (1, 208)


@torch.no_grad()
@pytest.mark.parametrize("in_place", [False, True], ids=["rollback", "rollback_in_place"])
def test_verify_step_graph_replay_equals_eager_step(in_place):
    """Speculative decoding's T-token verify step, one graph per T (5, 2, 1), with a rollback after each and a
    one-token step between: every replay equals the eager fixed step (float32). Each T runs at least twice: a
    shape's first call is its eager warm-up, the second captures. In place, the rollback is a graph per T too."""
    from hybridize.model.decode_step import forward_new_tokens

    model = model_on_cuda(torch.float32)
    ids = torch.randint(1, VOCAB, (2, 100), device="cuda")
    drafts = [torch.randint(1, VOCAB, (2, T), device="cuda") for T in (5, 5, 5, 2, 2, 2, 1, 1)]
    outs = {}
    for graph in (True, False):
        cache = StaticHybridCache(model.config, max_cache_len=200, cuda_graph=graph)
        model(ids, cache=cache)
        outs[graph] = []
        for i, d in enumerate(drafts):
            cache.checkpointing = True
            start = cache.seq_length
            outs[graph] += forward_new_tokens(model, cache, d)
            keep = torch.tensor([1 + i % d.shape[1], d.shape[1]])
            if in_place:
                cache.rollback_in_place(keep.cuda())
                cache.reclaim(start + d.shape[1])
            else:
                cache.rollback(keep)
            cache.checkpointing = False
            outs[graph].append(model(d[:, :1], cache=cache).logits)
        if graph:
            assert all(cache.decode_step.shapes[T, True].graph is not None for T in (1, 2, 5))
            assert all((cache.decode_step.shapes[T, True].rollback.graph is not None) == in_place for T in (2, 5))
            assert cache.decode_step.graph is not None  # the one-token step between: its own graph
    delta = max((a - b).abs().max().item() for a, b in zip(outs[True], outs[False], strict=True))
    print(f"verify steps: graph replay vs eager fixed step: max |Δ| {delta:.3g}")
    assert delta <= 1e-5


@torch.no_grad()
def test_speculative_on_the_graph_engine_equals_plain_greedy():
    """mtp_decoder.generate on the static cache (verify steps as CUDA graphs, rollback of rows that accept different
    drafts) gives model.generate's greedy tokens (float32, dynamic cache); untrained heads (the CPU tests cover
    trained ones)."""
    cfg = model_on_cuda(torch.float32).config
    cfg.mtp_num_hidden_layers, cfg.num_predict_tokens = 1, 3
    torch.manual_seed(0)
    model = HybridForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model = model.to("cuda").eval()
    ids = torch.randint(1, VOCAB, (3, 40), device="cuda")
    want = model.generate(ids, max_new_tokens=48, do_sample=False)
    got = model.mtp_decoder.generate(ids, max_new_tokens=48, cache_implementation="static")
    stats = model.mtp_decoder.stats
    print(f"speculative on the graph engine: tokens per verify {stats['tokens_per_verify']:.2f}")
    assert torch.equal(want, got)
    assert stats["cuda_graph"]  # the verify steps were captured, not run eagerly after a failed capture
    assert stats["heads_cuda_graph"]  # so were the MTP heads' draft and update steps
    # the graphed heads draft what the eager heads (dynamic cache) draft: the same acceptance, step for step
    assert model.mtp_decoder.generate(ids, max_new_tokens=48, cache_implementation="dynamic").equal(want)
    assert model.mtp_decoder.stats["accepted"] == stats["accepted"]
