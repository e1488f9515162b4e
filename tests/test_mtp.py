"""MTP heads and lossless speculative decoding: layout, loss, per-position DeltaNet rollback, token identity with
`model.generate`, and the sampled distribution."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hybridize import HybridCache, HybridConfig, HybridForCausalLM, StaticHybridCache
from hybridize.errors import HybridizeError
from hybridize.export.qwen3_5 import export_qwen3_5

V = 97


def tiny_config(**overrides) -> HybridConfig:
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
              linear_key_head_dim=16, linear_value_head_dim=8, pad_token_id=0, eos_token_id=None,
              mtp_num_hidden_layers=1, num_predict_tokens=4)
    kw.update(overrides)
    return HybridConfig(**kw)


def perturbed_model(seed: int = 0, scale: float = 0.05, **overrides) -> HybridForCausalLM:
    """A random model whose every parameter matters (default init leaves norms at identity)."""
    torch.manual_seed(seed)
    m = HybridForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * scale)
    return m


@pytest.fixture(scope="module")
def model():
    return perturbed_model()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts the decoding tests use: (8, 6) ids and mask; row 2 is left-padded by 3; the trained heads saw
    the continuations of rows 0-5 only."""
    ids = torch.randint(1, V, (8, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def self_distill(model: HybridForCausalLM, steps: int = 60) -> HybridForCausalLM:
    """A copy whose MTP heads alone (backbone frozen) were trained on the backbone's own greedy continuations of
    `prompts()` 0-5: heads that get drafts accepted, so the tests exercise acceptance, not only rejection."""
    trained = copy.deepcopy(model)
    ids, mask = (t[:6] for t in prompts())
    with torch.no_grad():
        data = trained.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(6, data.shape[1] - 6, dtype=torch.long)], 1)
    for n, p in trained.named_parameters():
        p.requires_grad_(n.startswith("mtp."))
    opt = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    trained.train()
    for _ in range(steps):
        opt.zero_grad()
        out = trained(data, attention_mask=full_mask, labels=data.masked_fill(full_mask == 0, -100))
        out.loss.backward()  # the task loss has no gradient here: the backbone is frozen
        opt.step()
    return trained.eval()


@pytest.fixture(scope="module")
def trained(model):
    return self_distill(model)


# ------------------------------------------------------------------------------------------------ layout


def test_mtp_tensors_have_qwen3_5_names_and_shapes(model):
    """vLLM's qwen3_5_mtp loader maps `mtp.*` onto fc (2D -> D), pre_fc_norm_{embedding,hidden}, norm and
    layers.{i} = transformers' / vLLM's full-attention Qwen3_5DecoderLayer; embed_tokens and lm_head are shared."""
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer

    cfg = model.config
    D = cfg.hidden_size
    qcfg = Qwen3_5TextConfig(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")},
        num_hidden_layers=1, layer_types=["full_attention"])  # fmt: skip
    layer = Qwen3_5DecoderLayer(qcfg, 0)
    expected = {f"mtp.layers.0.{n}": tuple(t.shape) for n, t in layer.state_dict().items()}
    expected |= {"mtp.fc.weight": (D, 2 * D), "mtp.pre_fc_norm_embedding.weight": (D,),
                 "mtp.pre_fc_norm_hidden.weight": (D,), "mtp.norm.weight": (D,)}
    got = {n: tuple(t.shape) for n, t in model.state_dict().items() if n.startswith("mtp.")}
    assert got == expected
    assert not any("embed_tokens" in n or "lm_head" in n for n in got)


def test_mtp_config_validation():
    with pytest.raises(ValueError, match="mtp_num_hidden_layers is 2"):
        HybridForCausalLM(tiny_config(mtp_num_hidden_layers=2))
    with pytest.raises(ValueError, match="num_predict_tokens is 0"):
        HybridForCausalLM(tiny_config(num_predict_tokens=0))
    with pytest.raises(ValueError, match="mtp_loss_decay"):
        HybridForCausalLM(tiny_config(mtp_loss_decay=1.5))
    plain = HybridForCausalLM(tiny_config(mtp_num_hidden_layers=0))
    assert plain.mtp is None and not any(n.startswith("mtp.") for n in plain.state_dict())
    with pytest.raises(HybridizeError, match="no MTP heads"):
        plain.mtp_decoder.generate(torch.ones(1, 3, dtype=torch.long))


def test_export_writes_mtp_and_import_keeps_it(model, tmp_path):
    hybrid, out = tmp_path / "hybrid", tmp_path / "export"
    model.save_pretrained(hybrid)
    export_qwen3_5(hybrid, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mtp_num_hidden_layers"] == 1 and cfg["mtp_use_dedicated_embeddings"] is False
    assert "num_predict_tokens" not in cfg  # a decoding knob: engines pick the number of drafts
    written = load_file(out / "model.safetensors")
    ours = model.state_dict()
    mtp_names = {n for n in ours if n.startswith("mtp.")}
    assert len(mtp_names) == 15 and mtp_names <= set(written)
    assert all(torch.equal(written[n], ours[n]) for n in mtp_names)
    # transformers' own class loads the export (it skips mtp.*), and ours keeps mtp.* on the way back
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    Qwen3_5ForCausalLM.from_pretrained(out, dtype=torch.float32)
    back = HybridForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert back.config.mtp_num_hidden_layers == 1
    assert all(torch.equal(back.state_dict()[n], ours[n]) for n in mtp_names)


def test_convert_of_a_qwen3_5_folder_keeps_mtp(model, tmp_path):
    from hybridize.cli import main

    hybrid, out, again = tmp_path / "hybrid", tmp_path / "export", tmp_path / "again"
    model.save_pretrained(hybrid)
    export_qwen3_5(hybrid, out)
    assert main(["convert", str(out), str(again)]) == 0
    written = load_file(again / "model.safetensors")
    assert all(torch.equal(written[n], t) for n, t in model.state_dict().items() if n.startswith("mtp."))


# ------------------------------------------------------------------------------------------------ loss


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def _reference_head_logprobs(model, ids, mask):
    """Float64, by hand: (k, log-probs of depth k at positions 0..T-k-2) for k = 1..num_predict_tokens; depth k at
    position i reads h^{k-1}_i and embed(x_{i+k}) and predicts x_{i+k+1}."""
    m = copy.deepcopy(model).double()
    mtp, eps = m.mtp, m.config.rms_norm_eps
    h, _ = m.model(ids, mask)
    emb = m.model.embed_tokens(ids)
    T = ids.shape[1]
    pad = mask.bool()
    pos = (pad.long().cumsum(-1) - 1).clamp(min=0)
    for k in range(1, m.config.num_predict_tokens + 1):
        n = T - k
        x = torch.cat([_rms(emb[:, k:], mtp.pre_fc_norm_embedding.weight, eps),
                       _rms(h[:, :n], mtp.pre_fc_norm_hidden.weight, eps)], -1) @ mtp.fc.weight.T
        keys = pad[:, :n]
        allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & (keys[:, None, :] | torch.eye(n, dtype=torch.bool))
        pe = mtp.rotary_emb(x, pos[:, :n])
        h = _rms(mtp.layers[0](x, pe, attn_mask=allowed[:, None], pad_mask=None), mtp.norm.weight, eps)
        yield k, torch.log_softmax(h[:, : n - 1] @ m.lm_head.weight.T, -1)


def _reference_mtp_losses(model, ids, labels, mask):
    """Float64: depth k at position i scored on labels[i+k+1]."""
    losses = []
    for k, logp in _reference_head_logprobs(model, ids, mask):
        target = labels[:, k + 1:]
        valid = target != -100
        nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
        losses.append((nll * valid).sum() / valid.sum())
    return torch.stack(losses)


def test_mtp_loss_equals_float64_reference(model):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, V, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 9] = -100
    out = model(ids, attention_mask=mask, labels=labels)
    ref = _reference_mtp_losses(model, ids, labels, mask)
    assert out["mtp_losses"].shape == (4,)
    assert (out["mtp_losses"].double() - ref).abs().max() < 1e-5
    plain = copy.deepcopy(model)
    plain.mtp = None
    task_loss = plain(ids, attention_mask=mask, labels=labels).loss
    weights = torch.tensor([0.3 * 0.8**k for k in range(4)], dtype=torch.float64)
    assert abs(out.loss.item() - (task_loss.item() + (weights * ref).sum().item())) < 1e-5
    assert model(ids).get("mtp_losses") is None  # no labels: no MTP loss


def test_soft_self_distillation_loss_equals_float64_reference(model):
    """train-mtp --targets soft: depth k at position i against the backbone's distribution at i+k, KL(p ‖ q)."""
    from hybridize.train.mtp import soft_depth_losses

    ids = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    m = copy.deepcopy(model).double()
    backbone = torch.log_softmax(m.lm_head(m.model(ids, mask)[0]), -1)  # (B, T, V)
    ref = torch.stack([(backbone[:, k: k + q.shape[1]].exp() * (backbone[:, k: k + q.shape[1]] - q)).sum(-1).mean()
                       for k, q in _reference_head_logprobs(model, ids, mask)])
    with torch.no_grad():
        got = soft_depth_losses(model, ids)
    assert got.shape == (4,) and (got.double() - ref).abs().max() < 1e-5 and (ref > 0).all()


def test_train_mtp_learning_rate_warms_up_then_decays_to_a_tenth():
    from hybridize.train.mtp import TrainMTPConfig

    lrs = [TrainMTPConfig(steps=100, lr=1e-3).lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[4] == pytest.approx(1e-3)  # 5 warmup steps
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False)) and lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert TrainMTPConfig(steps=10, warmup=0).lr_at(0) == pytest.approx(1e-3)
    with pytest.raises(HybridizeError, match="targets must be one of argmax, soft"):
        TrainMTPConfig(targets="hard")


def test_mtp_loss_trains_only_what_it_should(model):
    m = copy.deepcopy(model).train()
    ids = torch.randint(1, V, (2, 10))
    m(ids, labels=ids).loss.backward()
    assert m.mtp.fc.weight.grad.abs().sum() > 0 and m.mtp.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert m.model.layers[0].linear_attn.in_proj_qkv.weight.grad.abs().sum() > 0  # joint training reaches it


# ------------------------------------------------------------------------------------------------ rollback


def _fresh_cache(model, ids, mask):
    cache = HybridCache(model.config)
    model(ids, attention_mask=mask, cache=cache)
    return cache


@pytest.mark.parametrize("kind", ["dynamic", "static", "static-in-place"])
@torch.no_grad()
def test_rollback_equals_fresh_forward_per_row(model, kind):
    """Verify 5 tokens, keep 2 in row 0 and 4 in row 1: every DeltaNet state, and the next token's logits, equal a
    fresh forward over exactly the kept prefix of that row (max |Δ| < 1e-5); row 1 is left-padded. On the static
    cache the next token runs the fixed-buffer decoding step, whose positions and mask come from `valid`; in place,
    the rollback reads the counts from a tensor it never copies to the host, and `reclaim` then frees the slots
    past the longest row."""
    static = kind != "dynamic"
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(1, V, (2, 9), generator=g)
    mask = torch.ones_like(prefix)
    mask[1, :4] = 0
    new = torch.randint(1, V, (2, 5), generator=g)
    nxt = torch.randint(1, V, (2, 1), generator=g)
    cache = StaticHybridCache(model.config, max_cache_len=16) if static else HybridCache(model.config)
    model(prefix, attention_mask=mask, cache=cache)
    cache.checkpointing = True
    model(new, cache=cache)
    keep = torch.tensor([2, 4])
    if kind == "static-in-place":
        cache.rollback_in_place(keep)
        assert cache.seq_length == 9 + 5  # every verified slot still used ...
        cache.reclaim(9 + 4)  # ... until the host frees those past the longest row
    else:
        cache.rollback(keep)
    cache.checkpointing = False
    worst = 0.0
    for b in range(2):  # the DeltaNet states right after the rollback
        m = torch.cat([mask[b : b + 1], torch.ones(1, int(keep[b]), dtype=torch.long)], 1)
        fresh = _fresh_cache(model, torch.cat([prefix[b : b + 1], new[b : b + 1, : keep[b]]], 1), m)
        for i in fresh.conv_states:
            worst = max(worst, (fresh.conv_states[i][0] - cache.conv_states[i][b]).abs().max().item(),
                        (fresh.recurrent_states[i][0] - cache.recurrent_states[i][b]).abs().max().item())
    after = model(nxt, cache=cache).logits[:, -1]  # and attention over the cropped, holed KV
    for b in range(2):
        ids = torch.cat([prefix[b : b + 1], new[b : b + 1, : keep[b]], nxt[b : b + 1]], 1)
        m = torch.cat([mask[b : b + 1], torch.ones(1, int(keep[b]) + 1, dtype=torch.long)], 1)
        worst = max(worst, (model(ids, attention_mask=m).logits[0, -1] - after[b]).abs().max().item())
    print(f"max |Δ| rollback vs fresh forward: {worst:.3g}")
    assert worst < 1e-5
    assert (getattr(cache, "decode_step", None) is not None) == static


def test_rollback_refuses_misuse(model):
    cache = HybridCache(model.config)
    with torch.no_grad():
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="checkpointing"):
        cache.rollback(1)
    cache.checkpointing = True
    with torch.no_grad():
        model(torch.ones(1, 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"n_keep must lie in \[1, 2\]"):
        cache.rollback(3)


# ------------------------------------------------------------------------------------------------ greedy identity


def _reference(model, ids, mask=None, **kw):
    return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)


def _count_fixed_steps(monkeypatch) -> list[int]:
    """The number of new tokens of every fixed-buffer step (DecodeStep call) from now on."""
    from hybridize.model.decode_step import DecodeStep

    sizes, call = [], DecodeStep.__call__
    monkeypatch.setattr(DecodeStep, "__call__", lambda self, ids: sizes.append(ids.shape[1]) or call(self, ids))
    return sizes


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("heads", ["untrained", "trained"])
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_equals_generate(model, trained, heads, batch, cache, monkeypatch):
    """Token-identical to model.generate(do_sample=False) for 1, 3 and 4 drafts; batch 2 pairs a left-padded row
    with one the trained heads never saw, so its rows accept different numbers of drafts. With the static cache
    every verify forward is the fixed-buffer step (T = drafts + 1 tokens)."""
    m = model if heads == "untrained" else trained
    ids, mask = prompts()
    ids, mask = (ids[:1], None) if batch == 1 else (ids[[2, 6]], mask[[2, 6]])
    ref = _reference(m, ids, mask, max_new_tokens=23)
    steps = _count_fixed_steps(monkeypatch)
    grown, grow = [], StaticHybridCache.grow
    monkeypatch.setattr(StaticHybridCache, "grow", lambda self, n: grown.append(n) or grow(self, n))
    for k in (1, 3, 4):
        got = m.mtp_decoder.generate(ids, max_new_tokens=23, attention_mask=mask, num_draft_tokens=k,
                                     cache_implementation=cache)
        assert torch.equal(got, ref), (heads, batch, k)
    stats = m.mtp_decoder.stats
    if cache == "static":  # the last call (4 drafts): one fixed step per verify, 5 tokens until the budget nears
        verifies = len(stats["accepted"])
        assert len(steps) > verifies and steps[-verifies] == 5 and max(steps) == 5, steps
        if heads == "trained" and batch == 2:  # the rows' holes outran prompt + budget + K + 1 slots: it grew
            assert grown, stats["accepted"]
    else:
        assert not steps
    print(f"{heads} heads, batch {batch}, 4 drafts: {stats['tokens_per_verify']:.2f} tokens per verify")
    if heads == "trained":
        assert stats["tokens_per_verify"] > (2.5 if batch == 1 else 1.5), stats
        if batch == 2:  # rows accepted different numbers of drafts in some step
            assert any(len(set(step)) > 1 for step in stats["accepted"]), stats["accepted"]
    else:
        assert stats["tokens_per_verify"] >= 1.0


def _step_of(accepted: list[list[int]], row: int, index: int) -> tuple[int, int]:
    """(verify step, offset in that step's committed tokens) of new token `index` (token 0 is the prefill's)."""
    done = 1
    for step, acc in enumerate(accepted):
        if index < done + acc[row] + 1:
            return step, index - done
        done += acc[row] + 1
    raise AssertionError("index beyond the generated tokens")


def test_greedy_eos_inside_draft_and_budget_mid_draft(trained):
    ids = prompts()[0][:1]
    ref = _reference(trained, ids, max_new_tokens=30)
    new = ref[0, 6:].tolist()
    eos = next(t for i, t in enumerate(new) if i >= 6 and t not in new[:i])  # a first occurrence, mid-sequence
    at = new.index(eos)
    ref_eos = _reference(trained, ids, max_new_tokens=30, eos_token_id=eos)
    got = trained.mtp_decoder.generate(ids, max_new_tokens=30, num_draft_tokens=4, eos_token_id=eos)
    assert torch.equal(got, ref_eos) and got.shape[1] == 6 + at + 1
    step, offset = _step_of(trained.mtp_decoder.stats["accepted"], 0, at)
    assert offset < trained.mtp_decoder.stats["accepted"][step][0], "EOS was not inside an accepted draft"
    for budget in (1, 2, 5, 7):  # stops exactly at max_new_tokens, wherever the draft ends
        got = trained.mtp_decoder.generate(ids, max_new_tokens=budget, num_draft_tokens=4)
        assert torch.equal(got, ref[:, : 6 + budget])
    # batch: the row that meets EOS stops and is padded, the other runs on
    two = prompts()[0][[0, 3]]
    ref2 = _reference(trained, two, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(trained.mtp_decoder.generate(two, max_new_tokens=30, eos_token_id=eos), ref2)


def test_bad_arguments_are_one_line_errors(model):
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(HybridizeError, match="num_draft_tokens"):
        model.mtp_decoder.generate(ids, num_draft_tokens=-1)
    with pytest.raises(HybridizeError, match="max_new_tokens"):
        model.mtp_decoder.generate(ids, max_new_tokens=0)
    with pytest.raises(HybridizeError, match="temperature"):
        model.mtp_decoder.generate(ids, do_sample=True, temperature=0)
    with pytest.raises(HybridizeError, match="cache_implementation"):
        model.mtp_decoder.generate(ids, cache_implementation="offloaded")


# ------------------------------------------------------------------------------------------------ sampling


def _exact_joint(model, prompt, n, temperature):
    """p(x_1..x_n | prompt) for every continuation (vocab^n), from full forwards of the model itself."""
    vocab = model.config.vocab_size
    seqs = torch.cartesian_prod(*[torch.arange(vocab)] * n).reshape(-1, n)
    ids = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double() / temperature, -1)
    P = prompt.shape[1]
    steps = logp[:, P - 1 : P - 1 + n].gather(-1, seqs[..., None])[..., 0]
    return seqs, steps.sum(-1).exp()


def _chi2(counts, probs, N):
    """Pearson chi-square with cells of expected count < 5 pooled; returns (statistic, degrees of freedom)."""
    expected = probs * N
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    return float(((obs - exp) ** 2 / exp.clamp(min=1e-12)).sum()), len(obs) - 1


def test_sampled_outputs_follow_the_model_distribution():
    """Vocabulary of 4, untrained heads (rejections and residual draws), 4 new tokens with 2 drafts: 24k rows sampled
    in batches (rows accept differently) match the exact joint of the 256 continuations (chi-square), and the same
    test rejects the model's distribution at another temperature (it has power)."""
    model = perturbed_model(seed=2, scale=0.5, vocab_size=4, pad_token_id=None, hidden_size=32, intermediate_size=32,
                            num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                            num_attention_heads=2, num_key_value_heads=1, head_dim=8, linear_num_key_heads=1,
                            linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
    prompt = torch.tensor([[1, 3]])  # 2 tokens: the prefill runs the recurrent path, not a chunk padded to 64
    N, rows, n_new = 24_000, 6_000, 4
    gen = torch.Generator().manual_seed(0)
    out, accepted = [], []
    for _ in range(N // rows):
        out.append(model.mtp_decoder.generate(prompt.expand(rows, -1), max_new_tokens=n_new, do_sample=True,
                                              num_draft_tokens=2, generator=gen))
        accepted += [a for step in model.mtp_decoder.stats["accepted"] for a in step]
    out = torch.cat(out)
    assert {0, 1, 2} <= set(accepted)  # no draft, one, and both accepted (then the bonus token) all occurred
    seqs, p = _exact_joint(model, prompt, n_new, 1.0)
    place = 4 ** torch.arange(n_new - 1, -1, -1)
    assert torch.equal((seqs * place).sum(-1), torch.arange(256))
    counts = torch.bincount((out[:, 2:] * place).sum(-1), minlength=256).double()
    stat, dof = _chi2(counts, p, N)
    threshold = dof + 5 * math.sqrt(2 * dof)  # about p < 1e-5
    _, p_other = _exact_joint(model, prompt, n_new, 1.2)
    stat_other, _ = _chi2(counts, p_other, N)
    tv = 0.5 * (counts / N - p).abs().sum().item()
    print(f"chi2 {stat:.1f} (dof {dof}, threshold {threshold:.1f}); against T=1.2: {stat_other:.1f}; TV {tv:.4f}; "
          f"acceptance histogram {torch.bincount(torch.tensor(accepted)).tolist()}")
    assert stat < threshold
    assert stat_other > 2 * threshold


# ------------------------------------------------------------------------------------------------ train-mtp


@pytest.fixture(scope="module")
def mtp_student(tmp_path_factory):
    """(a converted tiny hybrid without heads, a small JSONL corpus) for the train-mtp tests."""
    import random

    from conftest import build_tiny_source

    from hybridize.cli import main

    root = tmp_path_factory.mktemp("train_mtp")
    build_tiny_source(root / "teacher", family="qwen3")
    assert main(["convert", str(root / "teacher"), str(root / "student")]) == 0
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(100):
            f.write(json.dumps({"text": " ".join(f"w{rng.randint(0, 30)}" for _ in range(40))}) + "\n")
    return root / "student", root / "train.jsonl"


def _train_mtp_args(mtp_student, out, steps: int, *extra: str) -> list[str]:
    student, data = mtp_student
    return ["train-mtp", str(student), "--data", str(data), "--out", str(out), "--steps", str(steps), "--seq-len",
            "32", "--batch-size", "4", "--lr", "3e-3", "--num-predict-tokens", "2", "--no-progress", *extra]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_train_mtp_cli_trains_heads_only(mtp_student, tmp_path, capsys):
    """`hybridize train-mtp` adds heads to a converted hybrid, lowers every depth's self-distillation loss and
    leaves the backbone bit for bit; an existing --out is a one-line error."""
    from hybridize.cli import main

    capsys.readouterr()
    args = _train_mtp_args(mtp_student, tmp_path / "out", 40)
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    first, last = summary["first_losses"], summary["last_losses"]
    print(f"train-mtp depth losses: {first} -> {last}")
    assert len(last) == 2 and all(b < 0.9 * a for a, b in zip(first, last, strict=True))  # measured: 0.81
    before = load_file(mtp_student[0] / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert {n for n in after if n.startswith("mtp.")} and json.loads(
        (tmp_path / "out" / "config.json").read_text())["mtp_num_hidden_layers"] == 1
    assert not (tmp_path / "out.partial").exists()  # the work folder is gone once OUT is in place
    assert main(args) == 2
    assert "already exists" in _one_line_error(capsys)


def test_train_mtp_stopped_and_resumed_equals_uninterrupted(mtp_student, tmp_path, monkeypatch):
    """A run stopped at step 7 (checkpoints at 5 and 7, only the latest kept) and resumed gives the same per-step
    losses and the same trained heads as one uninterrupted run; the work folder is removed at the end."""
    from hybridize.cli import main
    from hybridize.train import mtp as mtp_module

    histories = []
    real = mtp_module.train_mtp

    def recording(*args, **kwargs):
        histories.append(copy.deepcopy(real(*args, **kwargs)))
        return histories[-1]

    monkeypatch.setattr(mtp_module, "train_mtp", recording)
    assert main(_train_mtp_args(mtp_student, tmp_path / "straight", 12, "--save-every", "5")) == 0
    out = tmp_path / "resumed"
    assert main(_train_mtp_args(mtp_student, out, 12, "--save-every", "5", "--stop-at", "7")) == 0
    assert not out.exists()
    assert [p.name for p in (tmp_path / "resumed.partial" / "checkpoints").iterdir()] == ["step_7"]
    assert main(_train_mtp_args(mtp_student, out, 12, "--save-every", "5", "--resume")) == 0
    straight, stopped, resumed = histories
    assert len(straight) == len(resumed) == 12 and len(stopped) == 7
    for a, b in zip(straight, stopped + resumed[7:], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-6
    assert straight[7] != straight[6]  # the steps after the resume are computed, not repeated
    want, got = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    heads = [n for n in want if n.startswith("mtp.")]
    assert heads and set(want) == set(got)
    assert all(torch.allclose(want[n], got[n], rtol=0, atol=1e-6) for n in heads)
    assert not (tmp_path / "resumed.partial").exists()


def test_train_mtp_sigterm_checkpoints_the_last_step_and_resumes_exactly(mtp_student, tmp_path, monkeypatch):
    """SIGTERM during step 4 (a scheduler, `timeout`): the step finishes, a checkpoint of step 4 is written although
    --save-every is far away, the CLI exits 130 with no OUT, and --resume ends with an uninterrupted run's losses."""
    import os
    import signal

    from hybridize.cli import main
    from hybridize.train import mtp as mtp_module

    histories, steps = [], []
    real_train, real_step = mtp_module.train_mtp, mtp_module._mtp_step

    def recording(*args, **kwargs):
        histories.append(copy.deepcopy(real_train(*args, **kwargs)))
        return histories[-1]

    def step_then_maybe_signal(*args):
        steps.append(None)
        if len(steps) == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step: the handler only sets a flag
        return real_step(*args)

    monkeypatch.setattr(mtp_module, "train_mtp", recording)
    assert main(_train_mtp_args(mtp_student, tmp_path / "straight", 8)) == 0
    monkeypatch.setattr(mtp_module, "_mtp_step", step_then_maybe_signal)
    out = tmp_path / "out"
    steps.clear()
    assert main(_train_mtp_args(mtp_student, out, 8, "--save-every", "100")) == 130
    assert not out.exists()
    assert [p.name for p in (tmp_path / "out.partial" / "checkpoints").iterdir()] == ["step_4"]
    assert main(_train_mtp_args(mtp_student, out, 8, "--save-every", "100", "--resume")) == 0
    straight, resumed = histories[0], histories[1]
    assert len(resumed) == 8
    assert max(abs(x - y) for a, b in zip(straight, resumed, strict=True) for x, y in zip(a, b, strict=True)) <= 1e-6


def test_train_mtp_device_flag(mtp_student, tmp_path, capsys):
    """--device cpu trains on the CPU and says so; an unknown device or CUDA on a machine without one is a one-line
    error before any work."""
    from hybridize.cli import main

    assert main(_train_mtp_args(mtp_student, tmp_path / "cpu", 2, "--device", "cpu")) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "cpu"
    assert main(_train_mtp_args(mtp_student, tmp_path / "x", 2, "--device", "tpu")) == 2
    assert "unknown device 'tpu'" in _one_line_error(capsys)
    if not torch.cuda.is_available():
        assert main(_train_mtp_args(mtp_student, tmp_path / "x", 2, "--device", "cuda")) == 2
        assert "no CUDA GPU" in _one_line_error(capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_train_mtp_resume_misuse_is_a_one_line_error(mtp_student, tmp_path, capsys):
    """An existing work folder without --resume, a --resume with other settings and a --resume with nothing to
    resume are one-line errors; --force starts over."""
    from hybridize.cli import main

    out = tmp_path / "out"
    assert main(_train_mtp_args(mtp_student, out, 6, "--resume")) == 2
    assert "nothing to resume" in _one_line_error(capsys)
    assert main(_train_mtp_args(mtp_student, out, 6, "--stop-at", "2")) == 0
    capsys.readouterr()
    assert main(_train_mtp_args(mtp_student, out, 6)) == 2
    line = _one_line_error(capsys)
    assert "out.partial" in line and "--resume" in line and "--force" in line
    assert main(_train_mtp_args(mtp_student, out, 6, "--resume", "--lr", "1e-3")) == 2
    line = _one_line_error(capsys)
    assert "--resume with settings" in line and "lr 0.003 -> 0.001" in line
    assert main(_train_mtp_args(mtp_student, out, 8, "--resume")) == 2
    assert "steps 6 -> 8" in _one_line_error(capsys)
    assert (out.parent / "out.partial" / "checkpoints" / "step_2").is_dir()  # refusals leave the run as it was
    assert main(_train_mtp_args(mtp_student, out, 3, "--force")) == 0
    assert (out / "model.safetensors").is_file() and not (out.parent / "out.partial").exists()


# ------------------------------------------------------------------------------------- bench --speculative


def test_bench_speculative_is_lossless_and_counts_acceptance(mtp_student, tmp_path, capsys):
    """`hybridize bench MODEL --speculative` decodes the same prompts plainly and with the heads' drafts: in float32 on
    the CPU every row is identical, tokens per verify lies in [1, drafts + 1] and equals the decoder's own count;
    a model without heads and a missing --data are one-line errors."""
    from hybridize.cli import main

    model = tmp_path / "with_heads"
    assert main(_train_mtp_args(mtp_student, model, 30)) == 0
    student, data = mtp_student
    report_path = tmp_path / "spec.json"
    capsys.readouterr()
    args = ["bench", str(model), "--speculative", "--data", str(data), "--decode-batches", "1,3", "--draft-tokens",
            "2", "--prompt-tokens", "12", "--new-tokens", "10", "--prompts", "3", "--json", str(report_path)]
    assert main(args) == 0
    assert "tok/verify" in capsys.readouterr().out
    rows = json.loads(report_path.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["identical_rows"] == r["rows"] == 3 and r["first_divergence"] is None
        assert r["verify_cuda_graph"] is False  # a CPU: the dynamic cache, eager
        assert set(r["phase_ms_per_verify"]) == {"draft", "verify", "rollback", "heads"}
        assert all(v > 0 for v in r["phase_ms_per_verify"].values())
        assert 1.0 <= r["tokens_per_verify"] <= 3.0 and r["speedup"] > 0
    assert rows[0]["tokens_per_verify"] == rows[1]["tokens_per_verify"]  # same prompts, same drafts per row
    assert main(["bench", str(student), "--speculative", "--data", str(data)]) == 2
    assert "no MTP heads" in _one_line_error(capsys)
    assert main(["bench", str(model), "--speculative"]) == 2
    assert "--data" in _one_line_error(capsys)


def test_speculative_calls_reuse_the_static_cache(trained):
    """Back-to-back `mtp_decoder.generate` calls with as many rows reuse one StaticHybridCache (reset between
    calls, its verify-step buffers kept) and stay token-identical to `model.generate`."""
    ids, mask = prompts()
    trained.release_static_cache()
    for rows in ([0], [4]):
        got = trained.mtp_decoder.generate(ids[rows], max_new_tokens=15, num_draft_tokens=3,
                                           cache_implementation="static")
        assert torch.equal(got, _reference(trained, ids[rows], None, max_new_tokens=15))
        held = trained._reusable_static_cache[1]
        if rows == [0]:
            first = held
    assert held is first and held.rows == 1
    trained.release_static_cache()


def test_greedy_on_the_static_cache_rolls_back_in_place(trained, monkeypatch):
    """The fixed-buffer path never calls `rollback` (which copies the accepted counts to the host: a sync per
    verify step on a GPU): it rolls back in place and reclaims the free slots after the step's one host copy, and
    stays token-identical to model.generate — batch 1 and batch 2 with a left-padded row."""
    ids, mask = prompts()
    reclaimed, reclaim = [], StaticHybridCache.reclaim
    monkeypatch.setattr(StaticHybridCache, "rollback", lambda self, n: pytest.fail("rollback synced with the host"))
    monkeypatch.setattr(StaticHybridCache, "reclaim", lambda self, n: reclaimed.append(n) or reclaim(self, n))
    for rows, m in (([0], None), ([2, 6], mask[[2, 6]])):
        got = trained.mtp_decoder.generate(ids[rows], max_new_tokens=23, attention_mask=m, num_draft_tokens=3,
                                           cache_implementation="static")
        assert torch.equal(got, _reference(trained, ids[rows], m, max_new_tokens=23)), rows
    assert len(reclaimed) >= 2 * 6


def test_rollback_in_place_refuses_misuse(model):
    cache = StaticHybridCache(model.config, max_cache_len=8)
    with torch.no_grad():
        model(torch.ones(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="checkpointing"):
            cache.rollback_in_place(torch.ones(1, dtype=torch.long))
        with pytest.raises(ValueError, match="cannot reclaim from slot 4"):
            cache.reclaim(4)
        cache.checkpointing = True
        with torch.enable_grad():  # not the fixed-buffer step: an eager forward
            model(torch.ones(1, 2, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="use rollback"):
            cache.rollback_in_place(torch.ones(1, dtype=torch.long))


@pytest.mark.parametrize("k", [1, 3, 4])
def test_fixed_heads_draft_what_the_eager_heads_draft(trained, monkeypatch, k):
    """Greedy on a static cache drafts with the fixed-buffer MTP steps (hybridize.model.mtp_step), on the dynamic
    cache with the eager module and its own cache: the same drafts, so the same acceptance in every verify step —
    batch 2 with a left-padded row, rows accepting different numbers of drafts (holes in both caches)."""
    from hybridize.model import mtp_step

    ids, mask = prompts()
    ids, mask = ids[[2, 6]], mask[[2, 6]]
    calls = []
    draft = mtp_step.FixedMTPHeads.draft
    monkeypatch.setattr(mtp_step.FixedMTPHeads, "draft", lambda self, n: calls.append(n) or draft(self, n))
    runs = {}
    for cache in ("dynamic", "static"):
        out = trained.mtp_decoder.generate(ids, max_new_tokens=23, attention_mask=mask, num_draft_tokens=k,
                                           cache_implementation=cache)
        runs[cache] = (out, trained.mtp_decoder.stats["accepted"])
    assert calls and set(calls) <= set(range(1, k + 1))  # the static run drafted through the fixed heads
    assert torch.equal(runs["static"][0], runs["dynamic"][0])
    assert runs["static"][1] == runs["dynamic"][1]
    if k > 1:
        assert any(len(set(step)) > 1 for step in runs["static"][1])  # holes: rows accepted different counts
