"""Calibrated DeltaNet init (`convert --calibrate`): closer to the teacher, attention untouched, deterministic, safe."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import load_tiny_source
from safetensors.torch import load_file

from hybridize import CrossArchTransferConfig, HybridAttentionConfig, HybridizeError, create_hybrid_from_qwen3
from hybridize.cli import main
from hybridize.transfer.convert import convert_to_folder

# small enough for a fast CPU test, large enough for the fit to matter
CALIBRATE = dict(calibrate_tokens=4096, calibrate_seq_len=64, calibrate_steps=40, calibrate_batch_size=4,
                 calibrate_lr=3e-3)


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """JSONL of documents over the tiny tokenizer's words, with repeats so that attention has something to do."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with path.open("w") as f:
        for _ in range(200):
            motif = [f"w{rng.randrange(120)}" for _ in range(rng.randrange(3, 9))]
            doc = []
            while len(doc) < 80:
                doc += motif if rng.random() < 0.5 else [f"w{rng.randrange(120)}"]
            f.write(json.dumps({"text": " ".join(doc)}) + "\n")
    return path


def _held_out(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 124, (4, 64), generator=g)


@torch.no_grad()
def _distance(teacher, hybrid, ids) -> tuple[float, float]:
    """(mean over layers of the relative MSE of each layer's output, KL(teacher ‖ hybrid) per token)."""
    t = teacher(ids, output_hidden_states=True)
    h = hybrid(ids, output_hidden_states=True)
    mse = [((a - b).pow(2).mean() / b.pow(2).mean()).item()
           for a, b in zip(h.hidden_states[1:], t.hidden_states[1:], strict=True)]
    lt, lh = t.logits.log_softmax(-1), h.logits.log_softmax(-1)
    kl = (lt.exp() * (lt - lh)).sum(-1).mean().item()
    return sum(mse) / len(mse), kl


def test_only_deltanet_mixers_move_and_each_is_fitted(tiny_qwen3_dir, words):
    """Attention layers, MLPs, norms and embeddings are bit-identical to the uncalibrated conversion."""
    plain = create_hybrid_from_qwen3(tiny_qwen3_dir)
    config = CrossArchTransferConfig(calibrate_data=[str(words)], **{**CALIBRATE, "calibrate_steps": 5})
    calibrated = create_hybrid_from_qwen3(tiny_qwen3_dir, config)
    a, b = plain.state_dict(), calibrated.state_dict()
    changed = {n for n in a if not torch.equal(a[n], b[n])}
    assert {n.split(".linear_attn.")[0] for n in changed} == {f"model.layers.{i}" for i in range(3)}
    assert all(".linear_attn." in n for n in changed)  # layer 3 (attention) and every other tensor: bitwise equal
    assert all(torch.isfinite(t).all() for t in b.values())


def test_all_attention_conversion_is_unchanged_by_calibration(tiny_llama_dir, words):
    attention = HybridAttentionConfig(deltanet_layer_pattern=[])
    a = create_hybrid_from_qwen3(tiny_llama_dir, CrossArchTransferConfig(hybrid_attention=attention))
    b = create_hybrid_from_qwen3(tiny_llama_dir, CrossArchTransferConfig(
        hybrid_attention=attention, calibrate_data=[str(words)], **CALIBRATE))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_calibration_is_deterministic_and_the_folder_matches(tiny_qwen3_tied_dir, words, tmp_path):
    config = CrossArchTransferConfig(calibrate_data=[str(words)], **{**CALIBRATE, "calibrate_steps": 10})
    one = create_hybrid_from_qwen3(tiny_qwen3_tied_dir, config).state_dict()
    two = create_hybrid_from_qwen3(tiny_qwen3_tied_dir, config).state_dict()
    assert all(torch.equal(one[n], two[n]) for n in one)
    summary = convert_to_folder(str(tiny_qwen3_tied_dir), tmp_path / "out", config, progress=False)
    cal = summary["calibration"]
    assert cal["windows"] == 64 and cal["seq_len"] == 64 and sorted(cal["layers"]) == [0, 1, 2]
    assert all(r["before"] == 1.0 and r["after"] >= 0 for r in cal["layers"].values())  # the no-op init: error 1
    assert cal["seconds"] > 0 and cal["device"] == "cpu"
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(written[n], one[n]) for n in written)
    other = create_hybrid_from_qwen3(tiny_qwen3_tied_dir, CrossArchTransferConfig(
        calibrate_data=[str(words)], seed=1, **{**CALIBRATE, "calibrate_steps": 10})).state_dict()
    assert not torch.equal(other["model.layers.0.linear_attn.out_proj.weight"],
                           one["model.layers.0.linear_attn.out_proj.weight"])  # another seed: other windows


def test_cli_calibrated_convert(tiny_llama_dir, words, tmp_path, capsys):
    out = tmp_path / "hybrid"
    argv = ["convert", str(tiny_llama_dir), str(out), "--calibrate", str(words), "--calibrate-tokens", "2k",
            "--calibrate-seq-len", "64", "--calibrate-steps", "5", "--calibrate-batch-size", "2",
            "--calibrate-lr", "0.002"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calibration"]["windows"] == 32 and summary["calibration"]["steps_per_layer"] == 5
    assert (out / "config.json").is_file()


@pytest.mark.parametrize("extra, needle", [
    (["--calibrate-steps", "3"], "--calibrate-steps needs --calibrate DATA"),
    (["--calibrate", "{missing}"], "does not exist"),
    (["--calibrate", "{words}", "--calibrate-steps", "-1"], "--calibrate-steps"),
    (["--calibrate", "{words}", "--calibrate-lr", "0"], "--calibrate-lr"),
    (["--calibrate", "{words}", "--calibrate-tokens", "lots"], "--calibrate-tokens"),
    (["--calibrate", "{empty}"], "no text found"),
    (["--calibrate", "{words}", "--calibrate-seq-len", "100000"], "fewer than one window"),
])
def test_bad_calibration_flags_are_one_line_and_write_nothing(tiny_qwen3_dir, words, tmp_path, capsys, extra,
                                                              needle):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    subs = {"{missing}": str(tmp_path / "nope.jsonl"), "{words}": str(words), "{empty}": str(empty)}
    out = tmp_path / "out"
    argv = ["convert", str(tiny_qwen3_dir), str(out), *[subs.get(a, a) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridize: error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_config_validation(words):
    with pytest.raises(HybridizeError, match="calibrate_steps"):
        CrossArchTransferConfig(calibrate_data=[str(words)], calibrate_steps=-1)
    with pytest.raises(HybridizeError, match="calibrate_data is empty"):
        CrossArchTransferConfig(calibrate_data=[])
    assert CrossArchTransferConfig(calibrate_data=str(words)).calibrate_data == [str(words)]


def test_qwen3_5_source_is_refused(tiny_qwen3_dir, words, tmp_path):
    from hybridize.export.qwen3_5 import export_qwen3_5

    convert_to_folder(str(tiny_qwen3_dir), tmp_path / "hybrid", progress=False)
    export_qwen3_5(tmp_path / "hybrid", tmp_path / "q35")
    with pytest.raises(HybridizeError, match="already a hybrid"):
        create_hybrid_from_qwen3(tmp_path / "q35", CrossArchTransferConfig(calibrate_data=[str(words)]))


def test_teacher_layers_reproduce_the_source(tiny_qwen3_dir):
    """The layer-by-layer teacher (transformers' decoder layers built from the source tensors) equals the model."""
    from hybridize.transfer.calibrate import TeacherLayers, run_teacher_layer
    from hybridize.transfer.sources import open_source

    ids = _held_out()
    ref = load_tiny_source(tiny_qwen3_dir)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True).hidden_states
    with open_source(tiny_qwen3_dir) as src:
        teacher = TeacherLayers(src, torch.device("cpu"))
        x = teacher.embed(ids)
        pe = teacher.position_embeddings(x)
        for i in range(4):
            _, _, x = run_teacher_layer(teacher.layer(i), x, pe)
            if i < 3:  # the last hidden state HF returns is after the final norm
                assert F.mse_loss(x, want[i + 1]).item() < 1e-10


def test_attention_distance_matches_a_loop_over_transformers_attention_maps(tiny_llama_dir):
    """Per-head mean / median distance against the probabilities transformers' eager attention returns."""
    from hybridize.transfer.calibrate import TeacherLayers, attention_distance
    from hybridize.transfer.sources import open_source

    ids = _held_out()[:2]
    ref = load_tiny_source(tiny_llama_dir)
    ref.config._attn_implementation = "eager"
    with torch.no_grad():
        probs = ref(ids, output_attentions=True).attentions[0]  # (B, H, T, T) of layer 0
    T = ids.shape[1]
    mean_want, med_want = torch.zeros(probs.shape[1]), torch.zeros(probs.shape[1])
    for t in range(T // 2, T):
        p = probs[:, :, t, : t + 1].flip(-1)  # distance 0, 1, ..., t
        mean_want += (p * torch.arange(t + 1)).sum(-1).mean(0)
        med_want += (p.cumsum(-1) >= 0.5).float().argmax(-1).float().mean(0)
    mean_want, med_want = mean_want / (T - T // 2), med_want / (T - T // 2)
    with open_source(tiny_llama_dir) as src:
        teacher = TeacherLayers(src, torch.device("cpu"))
        layer = teacher.layer(0)
        x = teacher.embed(ids)
        with torch.no_grad():
            mean, med = attention_distance(layer, teacher.config, layer.input_layernorm(x),
                                           teacher.position_embeddings(x))
    torch.testing.assert_close(mean, mean_want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(med, med_want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mean", "median"])
def test_decay_matches_the_attention_distance(kind):
    """The DeltaNet decay exp(−exp(A_log)·softplus(dt_bias)) has the asked memory: mean α/(1−α), half-life."""
    from hybridize.transfer.calibrate import decay_from_distance

    m = torch.tensor([1.0, 4.0, 30.0, 300.0])
    A_log, dt_bias = decay_from_distance(m, kind)
    alpha = torch.exp(-A_log.exp() * F.softplus(dt_bias)).double()
    got = alpha / (1 - alpha) if kind == "mean" else math.log(2) / -alpha.log()
    torch.testing.assert_close(got, m.double(), rtol=1e-3, atol=0)


def test_ridge_is_least_squares():
    from hybridize.transfer.calibrate import ridge

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(500, 12, generator=g), torch.randn(5, 12, generator=g)
    y = x @ w.T + 0.01 * torch.randn(500, 5, generator=g)
    want = torch.linalg.lstsq(x.double(), y.double()).solution.T.float()
    torch.testing.assert_close(ridge(x, y, rel=1e-9), want, atol=1e-4, rtol=1e-4)


def test_windows_come_from_seeded_documents_and_only_those_are_tokenized(tiny_qwen3_dir, words):
    from hybridize.train.models import load_tokenizer
    from hybridize.transfer.calibrate import calibration_windows

    tok = load_tokenizer(str(tiny_qwen3_dir))
    calls = []
    encode = tok.__call__

    def counting(docs, **kw):
        calls.append(len(docs))
        return encode(docs, **kw)

    tok.__call__ = counting
    a = calibration_windows([words], tok, 2, 640, 64, seed=0)
    b = calibration_windows([words], tok, 2, 640, 64, seed=0)
    c = calibration_windows([words], tok, 2, 640, 64, seed=1)
    assert a.shape == (10, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a == 2).sum() >= 5  # EOS between documents: several documents, not one long prefix
    with pytest.raises(HybridizeError, match="fewer than one window"):
        calibration_windows([words], tok, 2, 10**6, 10**5, seed=0)


def test_cli_refuses_calibrating_a_qwen3_5_source(tiny_qwen3_dir, words, tmp_path, capsys):
    from hybridize.export.qwen3_5 import export_qwen3_5

    convert_to_folder(str(tiny_qwen3_dir), tmp_path / "hybrid", progress=False)
    export_qwen3_5(tmp_path / "hybrid", tmp_path / "q35")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "q35"), str(tmp_path / "out"), "--calibrate", str(words)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridize: error: ") and "already a hybrid" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_help_explains_every_calibration_flag(capsys):
    assert main(["convert", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--calibrate DATA", "--calibrate-tokens", "--calibrate-seq-len", "--calibrate-steps",
                 "--calibrate-batch-size", "--calibrate-lr"):
        assert flag in text, flag


@pytest.mark.slow
def test_calibrated_smollm2_is_much_closer_to_its_teacher(tmp_path):
    """The real claim on a real model: a fresh calibrated 3:1 hybrid of SmolLM2 vs the uncalibrated one, KL to the
    teacher on held-out Walden text (calibrated on the first 80% of the book, scored on the last 20%)."""
    pytest.importorskip("gguf")
    from importlib import resources

    from hybridize.assets import fetch_smollm2_gguf
    from hybridize.train.models import load_tokenizer

    try:
        gguf = fetch_smollm2_gguf()
    except Exception as e:
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
    text = resources.files("hybridize.evals").joinpath("data", "walden.txt").read_text(encoding="utf-8")
    cut = int(0.8 * len(text))
    (tmp_path / "train.txt").write_text(text[:cut])
    teacher = create_hybrid_from_qwen3(gguf, HybridAttentionConfig(deltanet_layer_pattern=[]), dtype=torch.float32)
    plain = create_hybrid_from_qwen3(gguf, dtype=torch.float32)
    calibrated = create_hybrid_from_qwen3(gguf, CrossArchTransferConfig(
        calibrate_data=[str(tmp_path / "train.txt")], calibrate_tokens=4096, calibrate_seq_len=256,
        calibrate_steps=0), dtype=torch.float32)
    from hybridize.transfer.sources import open_source

    with open_source(gguf) as src:
        tok = load_tokenizer(*dict.fromkeys(str(f.parent) for f in src.tokenizer_files))
        ids = torch.tensor(tok(text[cut:], add_special_tokens=False).input_ids[: 4 * 256]).view(4, 256)
    with torch.no_grad():
        lt = teacher(ids).logits.log_softmax(-1)
        kl = {name: (lt.exp() * (lt - m(ids).logits.log_softmax(-1))).sum(-1).mean().item()
              for name, m in (("plain", plain), ("calibrated", calibrated))}
    assert kl["calibrated"] < 0.5 * kl["plain"], kl
