"""MTP heads and lossless speculative decoding: layout, loss, per-position DeltaNet rollback, token identity with
`model.generate`, and the sampled distribution."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hybridize import HybridCache, HybridConfig, HybridForCausalLM
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


def self_distill(model: HybridForCausalLM, steps: int = 150, seed: int = 1) -> HybridForCausalLM:
    """Train a copy's MTP heads alone (backbone frozen) on the backbone's own greedy continuations."""
    trained = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(1, V, (32, 4), generator=g)
    with torch.no_grad():
        data = trained.generate(prompts, max_new_tokens=24, do_sample=False, pad_token_id=0)
    for n, p in trained.named_parameters():
        p.requires_grad_(n.startswith("mtp."))
    opt = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=3e-3)
    trained.train()
    for _ in range(steps):
        opt.zero_grad()
        trained(data, labels=data).loss.backward()  # the task loss has no gradient here: the backbone is frozen
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


def _reference_mtp_losses(model, ids, labels, mask):
    """Float64, by hand: depth k at position i reads h^{k-1}_i and embed(x_{i+k}), scored on labels[i+k+1]."""
    m = copy.deepcopy(model).double()
    mtp, eps = m.mtp, m.config.rms_norm_eps
    h, _ = m.model(ids, mask)
    emb = m.model.embed_tokens(ids)
    T, losses = ids.shape[1], []
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
        logp = torch.log_softmax(h[:, : n - 1] @ m.lm_head.weight.T, -1)
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


@torch.no_grad()
def test_rollback_equals_fresh_forward_per_row(model):
    """Verify 5 tokens, keep 2 in row 0 and 4 in row 1: every DeltaNet state, and the next token's logits, equal a
    fresh forward over exactly the kept prefix of that row (max |Δ| < 1e-5); row 1 is left-padded."""
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(1, V, (2, 9), generator=g)
    mask = torch.ones_like(prefix)
    mask[1, :4] = 0
    new = torch.randint(1, V, (2, 5), generator=g)
    nxt = torch.randint(1, V, (2, 1), generator=g)
    cache = HybridCache(model.config)
    model(prefix, attention_mask=mask, cache=cache)
    cache.checkpointing = True
    model(new, cache=cache)
    keep = torch.tensor([2, 4])
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


@pytest.mark.parametrize("heads", ["untrained", "trained"])
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_equals_generate(model, trained, heads, batch):
    m = model if heads == "untrained" else trained
    g = torch.Generator().manual_seed(7 + batch)
    ids = torch.randint(1, V, (batch, 6), generator=g)
    mask = None
    if batch == 2:
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        ids[1, :3] = 0
    ref = _reference(m, ids, mask, max_new_tokens=23)
    for k in (1, 3, 4):
        got = m.mtp_decoder.generate(ids, max_new_tokens=23, attention_mask=mask, num_draft_tokens=k)
        assert torch.equal(got, ref), (heads, batch, k)
    stats = m.mtp_decoder.stats
    if heads == "trained":
        assert stats["tokens_per_verify"] > 1.5, stats
    else:
        assert stats["tokens_per_verify"] >= 1.0
    print(f"{heads} heads, batch {batch}: {stats}")


def test_greedy_eos_inside_draft_and_budget_mid_draft(model, trained):
    ids = torch.tensor([[5, 17, 33, 2]])
    ref = _reference(trained, ids, max_new_tokens=30)
    new = ref[0, 4:].tolist()
    eos = new[9]  # a token the trained heads reach inside an accepted draft (asserted below)
    ref_eos = _reference(trained, ids, max_new_tokens=30, eos_token_id=eos)
    got = trained.mtp_decoder.generate(ids, max_new_tokens=30, num_draft_tokens=4, eos_token_id=eos)
    assert torch.equal(got, ref_eos) and got[0, -1] == eos and got.shape[1] < ref.shape[1]
    for budget in (1, 2, 5, 7):  # stops exactly at max_new_tokens, wherever the draft ends
        got = trained.mtp_decoder.generate(ids, max_new_tokens=budget, num_draft_tokens=4)
        assert torch.equal(got, ref[:, : 4 + budget])
    # batch: one row stops at its EOS and is padded, the other runs on
    two = torch.cat([ids, torch.tensor([[9, 8, 7, 6]])])
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
    """Tiny vocabulary (6), untrained heads (many rejections, residual draws), 3 new tokens with 2 drafts: 40k rows
    sampled in one batch (rows accept differently) match the exact joint of 216 continuations (chi-square), and
    the same test rejects the model's distribution at another temperature (it has power)."""
    model = perturbed_model(seed=2, scale=0.5, vocab_size=6, pad_token_id=None)
    prompt = torch.tensor([[1, 4, 2, 5]])
    N = 40_000
    gen = torch.Generator().manual_seed(0)
    out = model.mtp_decoder.generate(prompt.expand(N, -1), max_new_tokens=3, do_sample=True, num_draft_tokens=2,
                                     generator=gen)
    stats = model.mtp_decoder.stats
    assert 0.05 < stats["mean_accepted_drafts"] < 1.95, stats  # both accept and reject paths ran
    seqs, p = _exact_joint(model, prompt, 3, 1.0)
    code = (out[:, 4:] * torch.tensor([36, 6, 1])).sum(-1)
    counts = torch.bincount(code, minlength=216).double()
    assert torch.equal((seqs * torch.tensor([36, 6, 1])).sum(-1), torch.arange(216))
    stat, dof = _chi2(counts, p, N)
    threshold = dof + 5 * math.sqrt(2 * dof)  # ~ p < 1e-5
    _, p_other = _exact_joint(model, prompt, 3, 1.3)
    stat_other, _ = _chi2(counts, p_other, N)
    tv = 0.5 * (counts / N - p).abs().sum().item()
    print(f"chi2 {stat:.1f} (dof {dof}, threshold {threshold:.1f}); at T=1.3: {stat_other:.1f}; TV {tv:.4f}")
    assert stat < threshold
    assert stat_other > 2 * threshold
