"""StaticHybridCache and the fixed-buffer decoding step against the dynamic HybridCache (float32, CPU).

On a CPU the step runs eagerly — the same function a CUDA graph captures on a GPU (tests/test_gpu_static.py
replays it there) — so these tests check its math: positions and the attention mask from `valid`, K/V written at a
device slot, DeltaNet states updated in place, padding, rollback holes, beam reordering, ETD's extra slots, and the
T-token verify step of speculative decoding (per-position checkpoints in fixed buffers, then `rollback`).
"""

import pytest
import torch
from test_etd import etd, randomize_etd, tiny_hybrid
from test_mtp import V, perturbed_model

from hybridize import HybridCache, StaticHybridCache
from hybridize.model.decode_step import DecodeStep, forward_new_tokens


@pytest.fixture(scope="module")
def model():
    return perturbed_model(mtp_num_hidden_layers=0)


def _greedy(model, ids, mask=None, **kw):
    out = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True, **kw)
    cache = out.get("cache", out.get("past_key_values"))
    if kw.get("cache_implementation") == "static":  # guard: generate really decoded through the fixed step
        assert isinstance(cache, StaticHybridCache) and isinstance(cache.decode_step, DecodeStep)
    return out.sequences, torch.stack(out.scores, 1)


@torch.no_grad()
def test_generate_static_equals_dynamic_with_left_padding(model):
    ids = torch.randint(1, V, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    ref, ref_scores = _greedy(model, ids, mask, max_new_tokens=12)
    seq, scores = _greedy(model, ids, mask, max_new_tokens=12, cache_implementation="static")
    assert seq.tolist() == ref.tolist()
    delta = (scores - ref_scores).abs().max().item()
    print(f"max |Δ scores| static vs dynamic over 12 tokens: {delta:.3g}")
    assert delta < 1e-4


@torch.no_grad()
def test_fixed_step_runs_and_matches_per_step(model):
    """Token by token through model(..) on both caches: the static one takes the fixed-buffer step every time."""
    ids = torch.randint(1, V, (2, 20), generator=torch.Generator().manual_seed(1))
    dynamic, static = HybridCache(model.config), StaticHybridCache(model.config, max_cache_len=24)
    worst = 0.0
    for cache in (dynamic, static):
        model(ids[:, :8], cache=cache)
    for t in range(8, 20):
        a = model(ids[:, t : t + 1], cache=dynamic).logits
        b = model(ids[:, t : t + 1], cache=static).logits
        worst = max(worst, (a - b).abs().max().item())
    assert isinstance(static.decode_step, DecodeStep) and not static.decode_step.use_graph  # CPU: eager
    assert static.get_seq_length() == dynamic.get_seq_length() == 20
    assert static.valid[:, :20].all() and not static.valid[:, 20:].any()
    assert worst < 1e-5, worst


@pytest.mark.parametrize("T", [1, 3, 5])
@torch.no_grad()
def test_verify_step_equals_dynamic_forward_then_rolls_back(model, T):
    """Two verify steps of T tokens (rows keep different counts: holes) on a left-padded batch: the fixed-buffer
    step's hidden states and logits equal the dynamic cache's eager forward, and after each rollback both caches
    decode on identically; growing the static cache mid-way changes nothing."""
    gen = torch.Generator().manual_seed(6)
    prefix = torch.randint(1, V, (2, 9), generator=gen)
    mask = torch.ones_like(prefix)
    mask[1, :4] = 0
    dynamic, static = HybridCache(model.config), StaticHybridCache(model.config, max_cache_len=9 + 2 * (T + 2))
    for cache in (dynamic, static):
        model(prefix, attention_mask=mask, cache=cache)
    worst = {"verify": 0.0, "after": 0.0}
    for round_ in range(2):
        new = torch.randint(1, V, (2, T), generator=gen)
        out = {}
        for name, cache in (("dynamic", dynamic), ("static", static)):
            cache.checkpointing = True
            out[name] = forward_new_tokens(model, cache, new)
        assert (T, True) in static.decode_step.shapes and static.get_seq_length() == dynamic.get_seq_length()
        for a, b in zip(out["dynamic"], out["static"], strict=True):
            assert a.shape == b.shape
            worst["verify"] = max(worst["verify"], (a - b).abs().max().item())
        keep = torch.tensor([1, T]) if round_ == 0 else torch.tensor([T, max(T - 1, 1)])
        for cache in (dynamic, static):
            cache.rollback(keep)
            cache.checkpointing = False
        assert static.get_seq_length() == dynamic.get_seq_length()
        if round_ == 1:
            static.grow(static.max_cache_len + 5)
            assert static.decode_step is None and static.valid.shape[1] == static.max_cache_len
        for _ in range(2):  # one-token steps over the holes the rollback left
            tok = torch.randint(1, V, (2, 1), generator=gen)
            a, b = model(tok, cache=dynamic).logits, model(tok, cache=static).logits
            worst["after"] = max(worst["after"], (a - b).abs().max().item())
    assert isinstance(static.decode_step, DecodeStep) and not static.decode_step.use_graph  # CPU: eager
    print(f"T={T}: max |Δ| static vs dynamic: verify {worst['verify']:.3g}, decoding after rollback "
          f"{worst['after']:.3g}")
    assert worst["verify"] < 1e-5 and worst["after"] < 1e-5


@torch.no_grad()
def test_snapshot_restore_and_overflow(model):
    ids = torch.randint(1, V, (1, 10), generator=torch.Generator().manual_seed(2))
    cache = StaticHybridCache(model.config, max_cache_len=12)
    model(ids[:, :6], cache=cache)
    snap = cache.snapshot()
    first = [model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 10)]
    cache.restore(snap)
    assert cache.get_seq_length() == 6 and not cache.valid[:, 6:].any()
    again = [model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 10)]
    assert max((a - b).abs().max().item() for a, b in zip(first, again, strict=True)) == 0
    model(ids[:, :2], cache=cache)
    with pytest.raises(ValueError, match="static cache holds 12 tokens.*larger max_cache_len"):
        model(ids[:, :1], cache=cache)
    cache.restore(snap)
    with pytest.raises(ValueError, match="static cache holds 1 sequences, got 2"):
        model(torch.cat([ids[:, :1]] * 2), cache=cache)


@torch.no_grad()
def test_beam_search_static_equals_dynamic(model):
    ids = torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(3))
    ref = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    seq = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, cache_implementation="static")
    assert seq.tolist() == ref.tolist()


@torch.no_grad()
def test_etd_model_decodes_the_same_on_a_static_cache():
    model = randomize_etd(etd(tiny_hybrid(), n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1,
                              max_think_iterations=2))
    ids = torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(4))
    ref, ref_scores = _greedy(model, ids, max_new_tokens=8)
    seq, scores = _greedy(model, ids, max_new_tokens=8, cache_implementation="static")
    assert seq.tolist() == ref.tolist()
    assert (scores - ref_scores).abs().max().item() < 1e-4


@torch.no_grad()
def test_cuda_graph_refused_where_it_cannot_run(model):
    cache = StaticHybridCache(model.config, max_cache_len=8, cuda_graph=True)
    model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="not on CUDA"):
        model(torch.ones(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_cache_len"):
        StaticHybridCache(model.config, max_cache_len=0)


def test_norm_scale_is_kept_only_while_weights_are_frozen():
    """Under frozen_weights (the fixed-buffer step) RMSNorm computes 1 + w once and reuses it until the weight
    changes in place; outside it, and with autograd on, every call recomputes (training must see new weights)."""
    from hybridize.model.layers import RMSNorm, frozen_weights

    norm = RMSNorm(8)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        norm.weight.uniform_(-0.5, 0.5)
        with frozen_weights():
            first = norm.scale()
            assert norm.scale() is first  # reused
            expected = norm(x)
            norm.weight.add_(1.0)  # an in-place update moves the version counter
            assert norm.scale() is not first
            torch.testing.assert_close(norm.scale(), 1.0 + norm.weight.float(), rtol=0, atol=0)
            assert (norm(x) - expected).abs().max() > 0.1
        assert norm.scale() is not norm.scale()  # not frozen: computed on every call
    with frozen_weights():
        assert norm.scale().requires_grad  # autograd on: never cached


@torch.no_grad()
def test_generate_reuses_its_static_cache_across_calls(model):
    """A static generate call reuses the previous call's cache (reset; the same buffers and decoding step, so on
    CUDA the same captured graphs) when it has as many rows and room enough, and decodes exactly what the dynamic
    cache decodes — a padded, shorter prompt after a longer one; more rows, more tokens or far fewer tokens get a
    new cache."""

    def run(ids, mask, n, static=True):
        out = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=n,
                             output_scores=True, return_dict_in_generate=True,
                             **({"cache_implementation": "static"} if static else {}))
        return out.sequences, torch.stack(out.scores, 1), out.get("cache", out.get("past_key_values"))

    model.release_static_cache()
    g = torch.Generator().manual_seed(5)
    long_ids, short_ids = torch.randint(1, V, (2, 11), generator=g), torch.randint(1, V, (2, 6), generator=g)
    short_mask = torch.ones_like(short_ids)
    short_mask[1, :2] = 0
    _, _, first = run(long_ids, None, 9)
    step = first.decode_step
    seq, scores, second = run(short_ids.masked_fill(short_mask == 0, 0), short_mask, 7)
    assert second is first and second.decode_step is step
    ref, ref_scores, _ = run(short_ids.masked_fill(short_mask == 0, 0), short_mask, 7, static=False)
    assert seq.tolist() == ref.tolist() and (scores - ref_scores).abs().max().item() < 1e-4
    seq, _, third = run(long_ids, None, 9)  # the first prompt again on the reused cache: the first call's tokens
    assert third is first and seq.tolist() == run(long_ids, None, 9, static=False)[0].tolist()
    longer = run(long_ids, None, 30)[2]
    assert longer is not first  # more tokens than it holds: a new cache
    assert run(short_ids, None, 3)[2] is not longer  # far fewer (10 of 42 slots): a new, shorter one
    three = torch.randint(1, V, (3, 5), generator=g)
    assert run(three, None, 4)[2].rows == 3  # more rows: a new cache
    model.release_static_cache()
    assert model._reusable_static_cache is None


def test_a_failed_capture_names_the_error_that_broke_it():
    """A capture broken by one op ends with a second, generic error from the capture's exit; the note names the
    first (the op's), which Python keeps as the context of the second."""
    from hybridize.model.decode_step import _root_cause

    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture") from None
    except RuntimeError as e:
        hidden = e
    assert _root_cause(hidden) == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    assert _root_cause(ValueError("only\n  one")) == "ValueError: only one"
