"""`hybridize analyze-layers` (angular distances against an independent float64 computation, the knee split) and
`hybridize export` refusing an ETD model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_etd import etd, tiny_hybrid

from hybridize import ETDForCausalLM, HybridForCausalLM
from hybridize.cli import main
from hybridize.train.data import first_windows
from hybridize.transfer.analyze import AnalyzeConfig, analyze_layers, knee, propose_split
from hybridize.transfer.convert import convert_to_folder

LAYERS = 6


@pytest.fixture(scope="module")
def hybrid_and_text(tmp_path_factory):
    from conftest import build_tiny_source

    root = tmp_path_factory.mktemp("analyze")
    source = build_tiny_source(root / "qwen3", family="qwen3", num_hidden_layers=LAYERS)
    convert_to_folder(str(source), root / "hybrid", progress=False)
    gen = torch.Generator().manual_seed(0)
    text = root / "text.txt"
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (800,), generator=gen)))
    return root / "hybrid", text


def test_knee_and_split_on_known_curves():
    assert knee([0.5, 0.2, 0.1, 0.1, 0.1, 0.1]) == 2  # chord distances 0, .55, .6, .4, .2, 0
    assert knee([0.1, 0.1, 0.1]) is None and knee([0.1, 0.2, 0.3, 0.4]) is None
    curve = [0.5, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.15, 0.4]
    assert propose_split(curve) == {"n_encoder_layers": 2, "n_think_layers": 9, "n_decoder_layers": 1,
                                    "method": "knee"}
    assert propose_split([0.2] * 12) == {"n_encoder_layers": 3, "n_think_layers": 6, "n_decoder_layers": 3,
                                         "method": "default 25/50/25%"}


def test_distances_equal_an_independent_computation(hybrid_and_text):
    folder, text = hybrid_and_text
    cfg = AnalyzeConfig(tokens=96, seq_len=32, batch_size=2, data=[str(text)])
    report = analyze_layers(str(folder), cfg, progress=False)
    ids = first_windows(str(folder), cfg.data, cfg.tokens, cfg.seq_len)
    model = HybridForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        states = [h.double().reshape(-1, h.shape[-1]).numpy() for h in model(ids, output_hidden_states=True)
                  .hidden_states]  # embedding + every layer's output, before the final norm
    expected = []
    for a, b in zip(states[:-1], states[1:], strict=True):
        per_token = [math.acos(max(-1.0, min(1.0, float(x @ y) / math.sqrt(float(x @ x) * float(y @ y)))))
                     / math.pi for x, y in zip(a, b, strict=True)]
        expected.append(sum(per_token) / len(per_token))
    assert report["tokens"] == ids.numel() == 96
    assert report["angular_distance"] == pytest.approx(expected, abs=2e-6)
    split = report["split"]
    assert split["n_encoder_layers"] + split["n_think_layers"] + split["n_decoder_layers"] == LAYERS


def test_cli_prints_json_and_refuses_without_data(hybrid_and_text, tmp_path, capsys):
    folder, text = hybrid_and_text
    out = tmp_path / "layers.json"
    assert main(["analyze-layers", str(folder), "--data", str(text), "--tokens", "64", "--seq-len", "32",
                 "--json", str(out), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) and len(printed["angular_distance"]) == LAYERS
    assert main(["analyze-layers", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0], err


def test_export_refuses_an_etd_model(tmp_path, capsys):
    model = etd(tiny_hybrid(), n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1)
    model.save_pretrained(tmp_path / "etd")
    assert main(["export", str(tmp_path / "etd"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Encode-Think-Decode" in err[0] and "no serving engine" in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("part, steps, extra", [("experts", 4, ["--teacher", "BASE"]),
                                               ("routers", 2, ["--iterations", "1"])])
def test_train_etd_resumes_exactly(hybrid_and_text, tmp_path, capsys, part, steps, extra):
    """N steps in one run == N/2 steps, then --resume for the rest: same weights and losses, base untouched."""
    folder, text = hybrid_and_text
    extra = [str(folder) if a == "BASE" else a for a in extra]  # experts: KD from the base hybrid itself
    common = ["--data", str(text), "--tokens", "128", "--seq-len", "16", "--batch-size", "2", "--lr", "0.01",
              "--save-every", str(steps // 2), "--part", part, "--no-progress", *extra]
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert main(["train-etd", str(folder), str(once), "--steps", str(steps), *common]) == 0
    assert main(["train-etd", str(folder), str(twice), "--steps", str(steps // 2), *common]) == 0
    assert main(["train-etd", str(folder), str(twice), "--steps", str(steps), "--resume", *common]) == 0
    a = ETDForCausalLM.from_pretrained(once / "model").state_dict()
    b = ETDForCausalLM.from_pretrained(twice / "model").state_dict()
    base = HybridForCausalLM.from_pretrained(folder).state_dict()
    trained = [n for n in a if part[:-1] in n or (part == "experts" and "lora" in n)]
    assert trained and all(torch.equal(p, b[n]) for n, p in a.items())
    assert all(torch.equal(p, a[n]) for n, p in base.items())  # the base stays frozen
    state = torch.load(once / "model" / "trainer_state.pt", weights_only=True)
    assert state["step"] == steps and len(state["losses"]) == steps
    assert state["losses"] == torch.load(twice / "model" / "trainer_state.pt", weights_only=True)["losses"]
    capsys.readouterr()
    assert main(["train-etd", str(folder), str(once), *common]) == 2
    assert "already exists" in capsys.readouterr().err
