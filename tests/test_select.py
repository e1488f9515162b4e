"""`hybridize select-layers`: layer scores against independent computations, the choice, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from hybridize import create_hybrid_from_qwen3
from hybridize.cli import main
from hybridize.errors import HybridizeError
from hybridize.train.data import first_windows
from hybridize.train.evaluate import evaluate
from hybridize.train.models import load_language_model
from hybridize.train.objective import DistillationObjective
from hybridize.transfer.config import HybridAttentionConfig
from hybridize.transfer.select import SelectConfig, select_attention_layers

LAYERS = 6


@pytest.fixture(scope="module")
def source_and_text(tmp_path_factory):
    from conftest import build_tiny_source

    folder = build_tiny_source(tmp_path_factory.mktemp("sel") / "qwen3", family="qwen3", num_hidden_layers=LAYERS)
    gen = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(60)]  # the tiny tokenizer's word-level vocabulary
    text = folder.parent / "text.txt"
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, 60, (3000,), generator=gen)))
    return folder, text


def test_kl_scores_equal_real_single_layer_conversions(source_and_text):
    folder, text = source_and_text
    cfg = SelectConfig(keep=2, method="kl", tokens=256, seq_len=64, batch_size=2, data=[str(text)])
    report = select_attention_layers(str(folder), cfg, progress=False)
    scores = report["scores"]
    assert len(scores) == LAYERS and all(s >= 0 for s in scores) and max(scores) > 1e-4
    # an independent check of two layers: convert with only that layer as DeltaNet, then evaluate KL
    teacher = load_language_model(folder, torch.float32)
    windows = first_windows(str(folder), cfg.data, cfg.tokens, cfg.seq_len)
    for j in (0, LAYERS - 1):
        attention = [i for i in range(LAYERS) if i != j]
        hybrid = create_hybrid_from_qwen3(folder, HybridAttentionConfig(attention_layers=attention),
                                          dtype=torch.float32)
        kl = evaluate(DistillationObjective(hybrid, teacher), windows, batch_size=2)["kl"]
        assert scores[j] == pytest.approx(kl, rel=1e-4, abs=1e-6)
    ranked = sorted(range(LAYERS), key=lambda i: -scores[i])
    assert report["attention_layers"] == sorted(ranked[:2])
    assert report["flag"] == "--attention-layers " + ",".join(map(str, report["attention_layers"]))
    assert report["uniform_attention_layers"] == [3]


def test_proxy_scores_are_the_far_attention_share(source_and_text):
    folder, text = source_and_text
    cfg = SelectConfig(method="proxy", tokens=128, seq_len=64, batch_size=2, window=8, data=[str(text)])
    report = select_attention_layers(str(folder), cfg, progress=False)
    assert report["keep"] == 1  # the 3:1 pattern keeps one of 6 layers
    teacher = load_language_model(folder, torch.float32)
    teacher.set_attn_implementation("eager")
    windows = first_windows(str(folder), cfg.data, cfg.tokens, cfg.seq_len)
    with torch.no_grad():
        probs = teacher(windows, output_attentions=True).attentions[2]  # (B, H, T, T)
    T = windows.shape[1]
    far = torch.tensor([[q - k > 8 for k in range(T)] for q in range(T)])
    expected = (probs * far).sum(-1).mean().item()
    assert report["scores"][2] == pytest.approx(expected, rel=1e-5)
    everything_near = select_attention_layers(str(folder), SelectConfig(
        method="proxy", tokens=128, seq_len=64, window=1000, data=[str(text)]), progress=False)
    assert everything_near["scores"] == [0.0] * LAYERS


def test_cli_writes_json_and_refuses_bad_input(source_and_text, tmp_path, capsys):
    folder, text = source_and_text
    out = tmp_path / "sel.json"
    assert main(["select-layers", str(folder), "--data", str(text), "--method", "proxy", "--tokens", "128",
                 "--seq-len", "64", "--keep", "2", "--json", str(out), "--no-progress"]) == 0
    assert len(json.loads(out.read_text())["attention_layers"]) == 2
    for argv, needle in ([["--keep", "9"], "more than"], [["--method", "x"], "invalid choice"]):
        capsys.readouterr()
        assert main(["select-layers", str(folder), "--data", str(text), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    with pytest.raises(HybridizeError, match="does not exist"):
        select_attention_layers(str(folder), SelectConfig(data=[str(tmp_path / "nope.txt")]), progress=False)


def test_passkey_scores_are_kl_at_the_answer_tokens(source_and_text):
    """--method passkey: per layer, KL(teacher ‖ that single-layer conversion) averaged over the key's tokens of
    the passkey prompts only, checked against full forwards of a real conversion for two layers."""
    from hybridize.transfer.select import _passkey_batches

    folder, text = source_and_text
    cfg = SelectConfig(keep=2, method="passkey", tokens=3 * 96, seq_len=96, data=[str(text)])
    report = select_attention_layers(str(folder), cfg, progress=False)
    scores = report["scores"]
    assert len(scores) == LAYERS and max(scores) > 1e-4
    batches = _passkey_batches(str(folder), cfg)
    assert len(batches) == 3 and all(ids.shape[1] <= 96 + 8 for ids, _ in batches)
    assert all(int((t != -100).sum()) >= 1 for _, t in batches)
    teacher = load_language_model(folder, torch.float32)
    for j in (1, LAYERS - 2):
        hybrid = create_hybrid_from_qwen3(folder, HybridAttentionConfig(
            attention_layers=[i for i in range(LAYERS) if i != j]), dtype=torch.float32).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for ids, targets in batches:
                at = targets[0] != -100
                lt = torch.log_softmax(teacher(ids).logits[0, at].double(), -1)
                ls = torch.log_softmax(hybrid(ids).logits[0, at].double(), -1)
                total += float((lt.exp() * (lt - ls)).sum())
                count += int(at.sum())
        assert scores[j] == pytest.approx(total / count, rel=1e-4, abs=1e-6)
    assert report["attention_layers"] == sorted(sorted(range(LAYERS), key=lambda i: -scores[i])[:2])


def test_scores_from_npy_tokens_equal_scores_from_the_text(source_and_text, tmp_path):
    """The GPU host keeps its training split as a .npy of token ids: selecting on it scores the same windows as
    on the text it was made from."""
    import numpy as np

    folder, text = source_and_text
    stream = first_windows(str(folder), [str(text)], 10_000, 1).flatten().numpy()
    np.save(tmp_path / "tokens.npy", stream.astype(np.int64))
    on_text, on_npy = (select_attention_layers(str(folder), SelectConfig(
        method="proxy", tokens=128, seq_len=64, window=8, data=[str(d)]), progress=False)
        for d in (text, tmp_path / "tokens.npy"))
    assert on_npy["scores"] == on_text["scores"] and on_npy["tokens"] == on_text["tokens"] == 128


def test_kl_plus_passkey_sums_each_layers_share_of_both_scans(source_and_text):
    """--method kl+passkey: both scans run as their own methods would, and a layer's score is its share of the
    kl total plus its share of the passkey total; the top-K of that sum keep attention."""
    folder, text = source_and_text
    common = dict(keep=2, tokens=3 * 96, seq_len=96, batch_size=2, data=[str(text)])
    both = select_attention_layers(str(folder), SelectConfig(method="kl+passkey", **common), progress=False)
    alone = {m: select_attention_layers(str(folder), SelectConfig(method=m, **common), progress=False)["scores"]
             for m in ("kl", "passkey")}
    assert both["scores_by_method"] == alone
    want = [sum(s[i] / sum(s) for s in alone.values()) for i in range(LAYERS)]
    assert both["scores"] == pytest.approx(want, rel=2e-3)  # the report rounds every score to 6 decimals
    assert both["attention_layers"] == sorted(sorted(range(LAYERS), key=lambda i: -want[i])[:2])
    assert both["tokens"] > max(3 * 96, 1)
