"""Source reading: configs, validation of unsupported models, lazy tensor reads, broken folders, GGUF, hub errors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hybridize.errors import HybridizeError
from hybridize.transfer.plan import hybrid_params, layer_stats, source_params
from hybridize.transfer.sources import SUPPORTED, Source, is_hub_id, open_source, read_source_config

FIXTURES = Path(__file__).parent / "fixtures"
GGUF = Path("/root/.cache/hybridize-models/SmolLM2-135M-Instruct.Q4_1.gguf")


def _qwen3_8b() -> dict:
    return json.loads((FIXTURES / "qwen3_8b_config.json").read_text())


def _write_config(folder: Path, cfg: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ------------------------------------------------------------------------------------------------ configs


def test_read_config_file_and_folder(tmp_path):
    from transformers import Qwen3Config

    config, family = read_source_config(str(FIXTURES / "qwen3_8b_config.json"))
    assert family == "qwen3" and isinstance(config, Qwen3Config)
    assert (config.num_hidden_layers, config.hidden_size, config.head_dim) == (36, 4096, 128)
    assert config.rope_parameters["rope_theta"] == 1_000_000
    folder = _write_config(tmp_path / "m", _qwen3_8b())
    config2, family2 = read_source_config(str(folder))
    assert family2 == "qwen3" and config2.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "model_type, extra, family",
    [
        ("llama", {}, "llama"),
        ("mistral", {"sliding_window": None}, "llama"),
        ("qwen3", {"use_sliding_window": False, "sliding_window": 4096}, "qwen3"),
    ],
)
def test_supported_families(tmp_path, model_type, extra, family):
    cfg = {k: v for k, v in _qwen3_8b().items() if k not in ("use_sliding_window", "sliding_window")}
    cfg.update(model_type=model_type, **extra)
    assert read_source_config(str(_write_config(tmp_path / "m", cfg)))[1] == family


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "qwen3_moe", "num_experts": 128}, "mixture-of-experts"),
        ({"model_type": "mixtral", "num_local_experts": 8}, "mixture-of-experts"),
        ({"num_experts": 8}, "mixture-of-experts"),
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ({"model_type": None}, "no model_type"),
        ({"attention_bias": True}, "biases we cannot represent"),
        ({"model_type": "llama", "mlp_bias": True}, "biases we cannot represent"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"model_type": "mistral", "sliding_window": 4096}, "sliding-window"),
    ],
)
def test_unsupported_configs(tmp_path, change, needle):
    cfg = {**_qwen3_8b(), **change}
    if cfg["model_type"] is None:
        del cfg["model_type"]
    with pytest.raises(HybridizeError) as info:
        read_source_config(str(_write_config(tmp_path / "m", cfg)))
    message = str(info.value)
    assert needle in message and "\n" not in message
    if needle != "no model_type":
        assert SUPPORTED in message


def test_mistral_without_sliding_window_key_is_refused(tmp_path):
    cfg = {k: v for k, v in _qwen3_8b().items() if k != "sliding_window"}
    cfg["model_type"] = "mistral"  # MistralConfig defaults sliding_window to 4096
    with pytest.raises(HybridizeError, match="sliding-window"):
        read_source_config(str(_write_config(tmp_path / "m", cfg)))


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HybridizeError, match="is not a model folder: no config.json"):
        read_source_config(str(tmp_path / "empty"))
    with pytest.raises(HybridizeError, match="is not a model folder: no config.json"):
        open_source(tmp_path / "empty")


def test_missing_path_and_bad_json(tmp_path):
    with pytest.raises(HybridizeError, match="does not exist"):
        read_source_config(str(tmp_path / "nope"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(HybridizeError, match="not valid JSON"):
        read_source_config(str(tmp_path / "bad"))


def test_hub_id_detection(tmp_path, monkeypatch):
    assert is_hub_id("Qwen/Qwen3-8B")
    assert not is_hub_id("/abs/path")
    assert not is_hub_id("a/b/c")
    assert not is_hub_id("dir/model.gguf")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id("org/name")  # an existing local folder wins


def test_hub_offline_is_a_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for fn in (read_source_config, open_source):
        with pytest.raises(HybridizeError) as info:
            fn("hybridize-tests-nonexistent/no-such-model-xyz")
        assert "could not reach the Hugging Face hub" in str(info.value)
        assert "local" in str(info.value)


def test_gguf_needs_the_gguf_package(tmp_path, monkeypatch):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(HybridizeError, match=r"pip install 'hybridize\[gguf\]'"):
        read_source_config(str(fake))


# ------------------------------------------------------------------------------------------------ parameter counts


def _meta_count(model_cls, config) -> int:
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


def test_source_params_match_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3ForCausalLM

    config, family = read_source_config(str(FIXTURES / "qwen3_8b_config.json"))
    assert source_params(config, family) == _meta_count(Qwen3ForCausalLM, config) == 8_190_735_360
    smol = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    assert source_params(smol, "llama") == _meta_count(LlamaForCausalLM, smol)


def test_hybrid_params_match_transformers_qwen3_5():
    """Our analytic hybrid count equals transformers' own Qwen3.5 classes built with the same shapes."""
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    from hybridize.transfer.config import HybridAttentionConfig, hybrid_config_from_source

    config, family = read_source_config(str(FIXTURES / "qwen3_8b_config.json"))
    hybrid = hybrid_config_from_source(config, family, HybridAttentionConfig())
    keys = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
        "linear_num_key_heads", "linear_num_value_heads", "layer_types", "tie_word_embeddings",
    ]  # fmt: skip
    reference = Qwen3_5TextConfig(**{k: getattr(hybrid, k) for k in keys})
    assert hybrid_params(hybrid) == _meta_count(Qwen3_5ForCausalLM, reference)
    assert layer_stats(hybrid.layer_types) == {"deltanet_layers": 27, "gated_attention_layers": 9, "total_layers": 36}


# ------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
def test_open_source_reads_every_tensor(make_tiny_source, tmp_path, shard):
    from conftest import load_tiny_source

    for family, tie in [("qwen3", False), ("llama", True)]:
        folder = make_tiny_source(tmp_path / f"{family}-{shard}", family=family, tie=tie, max_shard_size=shard)
        if shard:
            assert (folder / "model.safetensors.index.json").is_file()
            assert len(list(folder.glob("*.safetensors"))) > 3
        reference = load_tiny_source(folder).state_dict()
        with open_source(folder) as src:
            assert isinstance(src, Source) and src.family == family and src.path == folder
            expected = set(reference) - ({"lm_head.weight"} if tie else set())
            assert set(src.names) == expected
            assert src.has("model.norm.weight") and not src.has("nope")
            assert src.has("lm_head.weight") is (not tie)
            for name in src.names:
                t = src.tensor(name)
                assert t.device.type == "cpu" and t.dtype == torch.float32
                torch.testing.assert_close(t, reference[name], rtol=0, atol=0)
            names = {p.name for p in src.tokenizer_files}
            assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
            with pytest.raises(KeyError):
                src.tensor("model.layers.99.mlp.up_proj.weight")


def test_open_source_keeps_stored_dtype(make_tiny_source):
    folder = make_tiny_source(dtype=torch.bfloat16)
    with open_source(str(folder)) as src:
        assert src.tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_config_json_path_opens_its_folder(tiny_qwen3_dir):
    with open_source(tiny_qwen3_dir / "config.json") as src:
        assert src.path == tiny_qwen3_dir and src.has("model.embed_tokens.weight")


def _truncate(path: Path, drop: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - drop])


def test_truncated_single_file(tiny_qwen3_dir):
    _truncate(tiny_qwen3_dir / "model.safetensors")
    with pytest.raises(HybridizeError, match=r"model\.safetensors is truncated"):
        open_source(tiny_qwen3_dir)


def test_truncated_shard_is_named(make_tiny_source):
    folder = make_tiny_source(max_shard_size="20KB")
    shard = sorted(folder.glob("model-*.safetensors"))[2]
    _truncate(shard, drop=10)
    with pytest.raises(HybridizeError, match=shard.name + " is truncated"):
        open_source(folder)


def test_garbage_header(tiny_qwen3_dir):
    (tiny_qwen3_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"0" * 64)
    with pytest.raises(HybridizeError, match="header is not valid JSON"):
        open_source(tiny_qwen3_dir)
    (tiny_qwen3_dir / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(HybridizeError, match="truncated or not a safetensors file"):
        open_source(tiny_qwen3_dir)


def test_index_names_missing_shard_and_tensor(make_tiny_source):
    folder = make_tiny_source(max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(HybridizeError, match="missing weight shard.*" + shard.name):
        open_source(folder)
    folder = make_tiny_source(max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.self_attn.extra.weight"] = first
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HybridizeError, match="lacks tensor 'model.layers.0.self_attn.extra.weight'"):
        open_source(folder)


def test_no_weights_and_pickles_refused(tiny_qwen3_dir):
    (tiny_qwen3_dir / "model.safetensors").unlink()
    with pytest.raises(HybridizeError, match="has no weights"):
        open_source(tiny_qwen3_dir)
    (tiny_qwen3_dir / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(HybridizeError, match="never loads pickles; convert to safetensors"):
        open_source(tiny_qwen3_dir)


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason="SmolLM2 GGUF not downloaded")
def test_gguf_source(tmp_path):
    pytest.importorskip("gguf")
    local = tmp_path / GGUF.name
    shutil.copyfile(GGUF, local)
    config, family = read_source_config(str(local))
    assert family == "llama" and config.num_hidden_layers == 30 and config.tie_word_embeddings
    with open_source(local) as src:
        assert src.family == "llama" and src.path == local
        assert src.config.num_hidden_layers == 30
        assert src.has("model.embed_tokens.weight") and not src.has("lm_head.weight")
        assert len(src.names) == 2 + 30 * 9
        assert src.tensor("model.layers.0.self_attn.k_proj.weight").shape == (3 * 64, 576)
        assert src.tensor("model.norm.weight").dtype == torch.float32
        files = {p.name: p for p in src.tokenizer_files}
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(files)
        assert all(p.is_file() for p in files.values())
        tmp = files["tokenizer.json"].parent
    assert not tmp.exists()  # close() removes the temporary tokenizer folder
