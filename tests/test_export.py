"""Export to / import from the stock Qwen3.5 format (`hybridize export`, `qwen3_5_text` folders as sources).

The strongest check runs the export in a separate Python process that imports only torch and transformers
(AutoModelForCausalLM -> Qwen3_5ForCausalLM) and compares its logits and greedy tokens with ours.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridize import HybridConfig, HybridForCausalLM, HybridizeError
from hybridize.cli import main
from hybridize.export.qwen3_5 import export_qwen3_5, qwen3_5_config_dict, qwen3_5_to_hybrid_config
from hybridize.transfer.convert import convert_to_folder

TOL = 1e-4
GEN = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)

REFERENCE_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, ids_file, out_file = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
AutoTokenizer.from_pretrained(folder)  # the tokenizer files came along
ids = torch.tensor(json.load(open(ids_file)))
gen = json.loads(sys.argv[4])
with torch.no_grad():
    logits = model(ids).logits
    tokens = model.generate(ids[:1, :8], **gen)
torch.save({"cls": type(model).__name__, "model_type": model.config.model_type, "logits": logits,
            "tokens": tokens, "modules": sorted(m for m in sys.modules if m.split(".")[0] == "hybridize")}, out_file)
"""


def _ids(vocab: int = 128, batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=g)


def _perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Move every parameter off its init (DeltaNet z, A_log, dt_bias, conv, gate rows, norms…) so tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def _perturbed_hybrid(source: Path, folder: Path, rope_parameters: dict | None = None) -> Path:
    """Convert `source` into `folder`, then overwrite it with a perturbed copy (tokenizer files stay)."""
    convert_to_folder(str(source), folder, dtype=torch.float32, progress=False)
    config = HybridConfig.from_pretrained(folder)
    if rope_parameters is not None:
        config.rope_parameters = rope_parameters
    model = HybridForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32)
    _perturb(model)
    model.save_pretrained(folder)
    return folder


def _ours(folder: Path) -> HybridForCausalLM:
    return HybridForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary folder was left behind"


# ------------------------------------------------------------------------------------------ export -> transformers


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_runs_in_plain_transformers(make_tiny_source, tmp_path, tie):
    source = make_tiny_source(tmp_path / "src", family="qwen3", tie=tie, num_hidden_layers=6)
    hybrid = _perturbed_hybrid(source, tmp_path / "hybrid")
    out = tmp_path / "export"
    summary = export_qwen3_5(hybrid, out)
    assert summary["layer_stats"] == {"deltanet_layers": 5, "gated_attention_layers": 1, "total_layers": 6}

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_5_text" and cfg["architectures"] == ["Qwen3_5ForCausalLM"]
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 2
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 1.0}
    assert cfg["head_dim"] == 16 and cfg["linear_num_key_heads"] == cfg["linear_num_value_heads"] == 4
    assert cfg["linear_key_head_dim"] == cfg["linear_value_head_dim"] == 16
    assert cfg["tie_word_embeddings"] is tie and (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (
        1, 2, 0)  # fmt: skip
    assert "attention_qk_norm" not in cfg and "source_model_type" not in cfg
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file()
    # the tensors are the hybrid's, bit for bit
    ours_sd = load_file(hybrid / "model.safetensors")
    theirs_sd = load_file(out / "model.safetensors")
    assert set(ours_sd) == set(theirs_sd) and ("lm_head.weight" in theirs_sd) is (not tie)
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)

    ids = _ids()
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    script = tmp_path / "reference.py"
    script.write_text(REFERENCE_SCRIPT)
    result_file = tmp_path / "reference.pt"
    run = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path / "ids.json"), str(result_file), json.dumps(GEN)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ref = torch.load(result_file)
    assert ref["cls"] == "Qwen3_5ForCausalLM" and ref["model_type"] == "qwen3_5_text"
    assert ref["modules"] == []  # the reference process never imported hybridize

    model = _ours(hybrid)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(ids[:1, :8], **GEN)
    assert logits.abs().max() > 0.1  # not a degenerate model
    # the perturbation reached the DeltaNet layers: zeroing their output gate changes the logits
    assert model.model.layers[0].linear_attn.in_proj_z.weight.abs().max() > 0
    delta = (logits - ref["logits"]).abs().max().item()
    print(f"max |Δ logits| export vs transformers ({'tied' if tie else 'untied'}): {delta:.3g}")
    assert delta <= TOL
    assert torch.equal(tokens, ref["tokens"])


ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}  # fmt: skip


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rope_scaling_exports_match_transformers(tiny_qwen3_dir, tmp_path, rope):
    """Qwen3_5TextRotaryEmbedding's mrope recomposition is a no-op for text positions: scaled RoPE still matches."""
    from transformers import AutoModelForCausalLM

    rope_parameters = {**ROPES[rope], "rope_theta": 10_000.0, "partial_rotary_factor": 1.0}
    hybrid = _perturbed_hybrid(tiny_qwen3_dir, tmp_path / "hybrid", rope_parameters)
    out = tmp_path / "export"
    export_qwen3_5(hybrid, out)
    assert json.loads((out / "config.json").read_text())["rope_parameters"] == rope_parameters
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen3_5ForCausalLM"
    ids = _ids(length=96)  # well past original_max_position_embeddings
    with torch.no_grad():
        ours, ref = _ours(hybrid)(ids).logits, theirs(ids).logits
        # the scaling matters: the same weights with default RoPE give other logits
        plain = _ours(_perturbed_hybrid(tiny_qwen3_dir, tmp_path / "plain", {"rope_type": "default",
                                                                              "rope_theta": 10_000.0}))(ids).logits
    assert (ours - plain).abs().max() > 1e-3
    delta = (ours - ref).abs().max().item()
    print(f"max |Δ logits| export vs transformers, {rope} RoPE: {delta:.3g}")
    assert delta <= TOL


# ------------------------------------------------------------------------------------------------- refusals


def _write_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "case, message",
    [
        ("llama", "no q/k-norm"),
        ("dynamic", "rope_type 'dynamic'"),
        ("longrope", "rope_type 'longrope'"),
        ("yarn-attention-factor", "attention_factor"),
        ("mtp", "no field for mtp_num_modules"),
    ],
)
def test_inexpressible_exports_are_refused(make_tiny_source, tmp_path, capsys, case, message):
    family = "llama" if case == "llama" else "qwen3"
    hybrid = tmp_path / "hybrid"
    convert_to_folder(str(make_tiny_source(tmp_path / "src", family=family)), hybrid, progress=False)
    if case == "dynamic":
        _write_config(hybrid, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6})
    elif case == "longrope":
        _write_config(hybrid, rope_parameters={"rope_type": "longrope", "rope_theta": 1e6, "short_factor": [1.0] * 8,
                                               "long_factor": [2.0] * 8, "original_max_position_embeddings": 64})
    elif case == "yarn-attention-factor":
        _write_config(hybrid, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                               "original_max_position_embeddings": 64, "attention_factor": 0.5})
    elif case == "mtp":  # a later feature qwen3_5_text has no field for
        _write_config(hybrid, mtp_num_modules=2)
    out = tmp_path / "export"
    with pytest.raises(HybridizeError, match=message) as err:
        export_qwen3_5(hybrid, out)
    assert "\n" not in str(err.value)
    _no_output(out)
    # the same through the CLI: one line, exit 2, nothing written
    capsys.readouterr()
    assert main(["export", str(hybrid), str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridize: error: cannot export to qwen3_5:")
    assert message in lines[0]
    _no_output(out)


def test_export_user_errors(tiny_qwen3_dir, tmp_path, capsys):
    hybrid = tmp_path / "hybrid"
    convert_to_folder(str(tiny_qwen3_dir), hybrid, progress=False)
    out = tmp_path / "export"
    cases = [
        ([str(tmp_path / "nope"), str(out)], "does not exist"),
        ([str(tiny_qwen3_dir), str(out)], "is not a hybridize model (model_type 'qwen3'"),
        ([str(hybrid), str(tmp_path / "no" / "such" / "parent")], "parent folder"),
        ([str(hybrid), str(out), "--format", "gguf"], "invalid choice"),
    ]
    capsys.readouterr()
    for argv, message in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hybridize: error:") and message in err[0], (argv, err)
    _no_output(out)

    assert main(["export", str(hybrid), str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["architecture"] == "Qwen3_5ForCausalLM"
    assert main(["export", str(hybrid), str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(hybrid), str(out), "--force"]) == 0
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".export.*"))

    # a weight file that lacks a tensor: refused before anything is written
    sd = load_file(hybrid / "model.safetensors")
    sd.pop("model.layers.0.linear_attn.A_log")
    save_file(sd, hybrid / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HybridizeError, match="lacks 1 tensor"):
        export_qwen3_5(hybrid, tmp_path / "export2")
    _no_output(tmp_path / "export2")


# --------------------------------------------------------------------------------------------------- import


def test_import_of_export_is_exact(make_tiny_source, tmp_path, capsys):
    source = make_tiny_source(tmp_path / "src", family="qwen3", tie=True, num_hidden_layers=8)
    hybrid = _perturbed_hybrid(source, tmp_path / "hybrid")
    out = tmp_path / "export"
    export_qwen3_5(hybrid, out)
    original = _ours(hybrid)

    back = HybridForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert back.config.model_type == "hybridize" and back.config.layer_types == original.config.layer_types
    assert back.config.rope_parameters == original.config.rope_parameters
    a, b = original.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(original(ids).logits, back(ids).logits)

    # `hybridize convert EXPORT OUT` writes a hybridize folder with the same tensors
    again = tmp_path / "again"
    assert main(["convert", str(out), str(again)]) == 0
    capsys.readouterr()
    cfg = json.loads((again / "config.json").read_text())
    assert cfg["model_type"] == "hybridize" and cfg["attention_qk_norm"] is True
    assert cfg["layer_types"] == original.config.layer_types
    assert load_file(again / "model.safetensors").keys() == load_file(hybrid / "model.safetensors").keys()
    c = _ours(again).state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    # and exporting that again gives the same checkpoint
    export_qwen3_5(again, tmp_path / "export2")
    assert json.loads((tmp_path / "export2" / "config.json").read_text()) == json.loads(
        (out / "config.json").read_text())  # fmt: skip


def _native_qwen3_5(folder: Path, **overrides) -> torch.nn.Module:
    """A random transformers Qwen3_5ForCausalLM (default partial rotary 0.25, GVA heads) saved with an MTP tensor."""
    from conftest import _write_tokenizer
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    kwargs = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
        linear_value_head_dim=8, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        **overrides,
    )  # fmt: skip
    config = Qwen3_5TextConfig(**kwargs)
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(config).float().eval()
    _perturb(model, scale=0.1)
    folder.mkdir()
    config.architectures = ["Qwen3_5ForCausalLM"]
    config.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    sd["mtp.fc.weight"] = torch.randn(64, 128)  # Qwen3.5 checkpoints carry an MTP module: ignored on import
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    _write_tokenizer(folder, 128)
    return model


def test_native_qwen3_5_imports_exactly(tmp_path, capsys):
    native = tmp_path / "qwen35"
    reference = _native_qwen3_5(native)
    raw = json.loads((native / "config.json").read_text())
    cfg = qwen3_5_to_hybrid_config(raw)
    assert cfg.rope_parameters["partial_rotary_factor"] == 0.25  # transformers' default, honoured
    assert cfg.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_value_head_dim) == (2, 4, 8)

    ours = HybridForCausalLM.from_pretrained(native, dtype=torch.float32).eval()
    ids = _ids()
    with torch.no_grad():
        delta = (ours(ids).logits - reference(ids).logits).abs().max().item()
    with capsys.disabled():
        print(f"max |Δ logits| native Qwen3.5 vs HybridForCausalLM: {delta:.3g}")
    assert delta <= TOL

    out = tmp_path / "imported"
    assert main(["convert", str(native), str(out)]) == 0
    capsys.readouterr()
    written = load_file(out / "model.safetensors")
    expected = {k: v for k, v in reference.state_dict().items()}
    assert set(written) == set(expected)  # mtp.* left out
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert (out / "tokenizer.json").is_file()
    # and exported back: the stock config says the same things (partial factor now explicit)
    back = tmp_path / "back"
    export_qwen3_5(out, back)
    cfg_back = json.loads((back / "config.json").read_text())
    assert cfg_back["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert cfg_back["linear_num_value_heads"] == 4 and cfg_back["layer_types"] == cfg.layer_types


def test_config_dict_round_trip():
    cfg = HybridConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    qdict = qwen3_5_config_dict(cfg)
    assert qdict["rope_parameters"]["partial_rotary_factor"] == 1.0  # written explicitly: qwen3_5_text's is 0.25
    back = qwen3_5_to_hybrid_config(qdict)
    for k in ("layer_types", "num_hidden_layers", "head_dim", "linear_num_value_heads", "rope_parameters"):
        assert getattr(back, k) == (qdict[k] if k != "rope_parameters" else qdict["rope_parameters"])
    with pytest.raises(HybridizeError, match="expected a 'qwen3_5_text' config"):
        qwen3_5_to_hybrid_config({"model_type": "qwen3"})
