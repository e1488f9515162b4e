"""The hybrid model on its own: cache == full forward, padding, generate, checkpointing, save/load round trips."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hybridize import HybridCache, HybridConfig, HybridForCausalLM

TOL = 1e-4


def tiny_config(**overrides) -> HybridConfig:
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=16, linear_value_head_dim=8, pad_token_id=0, eos_token_id=None)
    kw.update(overrides)
    return HybridConfig(**kw)


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = HybridForCausalLM(tiny_config()).eval()
    with torch.no_grad():  # make every parameter matter (default init leaves norms at identity, z random)
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def test_layer_stats(model):
    assert model.get_layer_stats() == {"deltanet_layers": 3, "gated_attention_layers": 1, "total_layers": 4}


def test_deltanet_layers_contribute(model):
    """Guard for the cache tests below: DeltaNet layers change the output, so their state is really tested."""
    ids = torch.randint(1, 97, (1, 12))
    ref = model(ids).logits
    with torch.no_grad():
        model.model.layers[0].linear_attn.out_proj.weight.zero_()
    assert (model(ids).logits - ref).abs().max() > 1e-3


@torch.no_grad()
def test_cached_decoding_equals_full_forward(model):
    ids = torch.randint(1, 97, (2, 29))
    full = model(ids).logits
    cache = HybridCache(model.config)
    parts = [model(ids[:, :11], cache=cache).logits]  # chunked prefill
    parts.append(model(ids[:, 11:20], cache=cache).logits)  # a second chunk on top of the cache
    parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(20, 29)]  # token by token
    assert (torch.cat(parts, 1) - full).abs().max() < TOL
    assert cache.get_seq_length() == 29


@torch.no_grad()
def test_left_padded_batch_equals_unpadded(model):
    ids = torch.randint(1, 97, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :9] = 0
    padded = ids.masked_fill(mask == 0, 0)
    out = model(padded, attention_mask=mask).logits
    for b in range(3):
        n = int(mask[b].sum())
        alone = model(ids[b : b + 1, -n:]).logits[0]
        assert (out[b, -n:] - alone).abs().max() < TOL


@torch.no_grad()
def test_cached_decoding_with_left_padding(model):
    ids = torch.randint(1, 97, (2, 15))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    full = model(ids, attention_mask=mask).logits
    cache = HybridCache(model.config)
    parts = [model(ids[:, :8], attention_mask=mask[:, :8], cache=cache).logits]
    parts += [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits for t in range(8, 15)]
    inc = torch.cat(parts, 1)
    real = mask.bool()
    assert (inc - full)[real].abs().max() < TOL


@torch.no_grad()
def test_generate_greedy_matches_manual_loop_and_padding(model):
    ids = torch.randint(1, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    padded = ids.masked_fill(mask == 0, 0)
    out = model.generate(padded, attention_mask=mask, max_new_tokens=7, do_sample=False)
    for b in range(2):
        seq = ids[b : b + 1, int((mask[b] == 0).sum()) :]
        for _ in range(7):  # no cache: the full forward each step
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert out[b, 9:].tolist() == seq[0, -7:].tolist()


@torch.no_grad()
def test_beam_search_with_cache_equals_without(model):
    """Beam search reorders the cache (reorder_cache): DeltaNet states must follow their beams."""
    ids = torch.randint(1, 97, (2, 7))
    cached = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


@torch.no_grad()
def test_generate_sampling_runs_with_cache(model):
    torch.manual_seed(1)
    a = model.generate(torch.randint(1, 97, (2, 5)), max_new_tokens=6, do_sample=True, top_k=10)
    assert a.shape == (2, 11)


@torch.no_grad()
def test_snapshot_restore_rolls_back_deltanet_state(model):
    ids = torch.randint(1, 97, (2, 12))
    cache = HybridCache(model.config)
    model(ids[:, :6], cache=cache)
    snap = cache.snapshot()
    first = model(ids[:, 6:], cache=cache).logits
    model(torch.randint(1, 97, (2, 3)), cache=cache)  # drift further
    cache.restore(snap)
    assert cache.get_seq_length() == 6
    assert (model(ids[:, 6:], cache=cache).logits - first).abs().max() == 0
    with pytest.raises(ValueError, match="snapshot"):
        cache.crop(3)


def test_loss_is_shifted_cross_entropy_with_ignore(model):
    ids = torch.randint(1, 97, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 97)
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(out["loss"].item() - ref.item()) < 1e-6


def test_logits_to_keep(model):
    ids = torch.randint(1, 97, (1, 8))
    assert torch.allclose(model(ids, logits_to_keep=1).logits[:, -1], model(ids).logits[:, -1], atol=1e-6)
    assert model(ids, logits_to_keep=1).logits.shape[1] == 1


def test_gradient_checkpointing_leaves_gradients_unchanged(model):
    ids = torch.randint(1, 97, (2, 12))
    model.train()

    def grads():
        model.zero_grad()
        model(ids, labels=ids)["loss"].backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.model.layers[0].gradient_checkpointing
    ckpt = grads()
    assert plain.keys() == ckpt.keys() and len(plain) == len(list(model.parameters()))
    assert max((plain[n] - ckpt[n]).abs().max().item() for n in plain) < 1e-6


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_auto_load_round_trip_is_exact(tmp_path, tie):
    torch.manual_seed(0)
    m = HybridForCausalLM(tiny_config(tie_word_embeddings=tie, rope_parameters={"rope_type": "linear",
                                      "rope_theta": 10000.0, "factor": 2.0})).eval()
    m.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "hybridize"
    for loader in (HybridForCausalLM, AutoModelForCausalLM):
        m2 = loader.from_pretrained(tmp_path).eval()
        assert isinstance(m2, HybridForCausalLM)
        sd, sd2 = m.state_dict(), m2.state_dict()
        assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
        ids = torch.randint(1, 97, (1, 9))
        assert torch.equal(m(ids).logits, m2(ids).logits)
    assert (m2.lm_head.weight is m2.model.embed_tokens.weight) == tie


def test_bad_layer_schedule_is_refused():
    with pytest.raises(ValueError, match="layer_types"):
        HybridForCausalLM(tiny_config(layer_types=["full_attention"] * 3))


@pytest.mark.parametrize("T", [1, 4, 17])
def test_masked_grouped_query_attention_equals_repeated_heads(T):
    """The folded GQA path of decode/verify steps (query heads of one KV head on the query axis, the mask row of
    each token repeated per head) against plain attention over K/V repeated to every query head."""
    from hybridize.model.layers import _attend

    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, S, d = 2, 8, 2, 23, 16
    q, k, v = (torch.randn(B, h, t, d, generator=gen, dtype=torch.float64) for h, t in ((H, T), (Hkv, S), (Hkv, S)))
    mask = torch.rand(B, 1, T, S, generator=gen) < 0.7
    mask[..., 0] = True  # every query sees at least one key
    y = _attend(q, k, v, mask, 0.0, d**-0.5)
    kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    scores = (q @ kr.transpose(-1, -2) * d**-0.5).masked_fill(~mask, float("-inf"))
    ref = scores.softmax(-1) @ vr
    assert y.shape == (B, H, T, d)
    assert (y - ref).abs().max().item() < 1e-12
