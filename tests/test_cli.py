"""The `hybridize` command line: --dry-run plans, one-line errors for user mistakes, a real conversion."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hybridize.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
SRC = Path(__file__).resolve().parents[1] / "src"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hybridize", *args], capture_output=True, text=True, env=_env(), timeout=300
    )


def _qwen3_8b_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "Qwen3-8B"
    folder.mkdir()
    shutil.copyfile(FIXTURES / "qwen3_8b_config.json", folder / "config.json")
    return folder


def _have_convert() -> bool:
    try:
        from hybridize.transfer.convert import convert_to_folder  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ dry run


def test_dry_run_qwen3_8b(tmp_path, capsys):
    from transformers import Qwen3_5TextConfig, Qwen3ForCausalLM
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    from hybridize.transfer.sources import read_source_config

    folder = _qwen3_8b_folder(tmp_path)
    assert main(["convert", str(folder), str(tmp_path / "out"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "out").exists()
    assert plan["layer_stats"] == {"deltanet_layers": 27, "gated_attention_layers": 9, "total_layers": 36}
    assert plan["attention_layers"] == [3, 7, 11, 15, 19, 23, 27, 31, 35]
    assert plan["dtype"] == "bfloat16"

    config, _ = read_source_config(str(folder))
    with torch.device("meta"):
        source = Qwen3ForCausalLM(config)
    assert plan["parameters"]["source"] == sum(p.numel() for p in source.parameters()) == 8_190_735_360

    # hybrid, independently: transformers' Qwen3.5 classes with the converted shapes (32 DeltaNet heads of 128)
    layer_types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(36)]
    reference = Qwen3_5TextConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, linear_num_key_heads=32, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, layer_types=layer_types,
        tie_word_embeddings=False,
    )  # fmt: skip
    with torch.device("meta"):
        hybrid = Qwen3_5ForCausalLM(reference)
    expected = sum(p.numel() for p in hybrid.parameters())
    # and by hand: per DeltaNet layer 3·4096² (qkv) + 4096² (z) + 2·32·4096 (a, b) + 3·4096·4 (conv) + 64 + 128
    # + 4096² (out); per attention layer the source's plus 32·128·4096 gate rows
    h = 4096
    deltanet = 4 * h * h + h * h + 2 * 32 * h + 3 * h * 4 + 2 * 32 + 128
    src_attn = h * h + 2 * 1024 * h + h * h + 2 * 128
    delta = 27 * (deltanet - src_attn) + 9 * (32 * 128 * h)
    assert plan["parameters"]["hybrid"] == expected == plan["parameters"]["source"] + delta
    assert plan["weight_bytes"]["source"] == 2 * plan["parameters"]["source"]

    kv_per_token_layer = 2 * 8 * 128 * 2
    state = 32 * 128 * 128 * 4 + 3 * (3 * 4096) * 2
    for key, tokens in (("4k", 4096), ("32k", 32768), ("128k", 131072)):
        cache = plan["cache_bytes_batch1"][key]
        assert cache["source"] == 36 * kv_per_token_layer * tokens
        assert cache["hybrid"] == 9 * kv_per_token_layer * tokens + 27 * state
        assert cache["ratio"] == round(cache["hybrid"] / cache["source"], 4)


def test_dry_run_without_output_and_flags(tmp_path, capsys):
    folder = _qwen3_8b_folder(tmp_path)
    assert main(["convert", str(folder / "config.json"), "--dry-run", "--pattern", "0", "--period", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layer_stats"]["deltanet_layers"] == 18
    assert main(["convert", str(folder), "--dry-run", "--attention-layers", "0,35", "--dtype", "float32"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["attention_layers"] == [0, 35] and plan["dtype"] == "float32"
    assert plan["weight_bytes"]["hybrid"] == 4 * plan["parameters"]["hybrid"]
    assert main(["convert", str(folder), "--dry-run", "--pattern", ""]) == 0  # all attention
    plan = json.loads(capsys.readouterr().out)
    assert plan["layer_stats"]["gated_attention_layers"] == 36
    assert plan["parameters"]["hybrid"] == plan["parameters"]["source"] + 36 * 32 * 128 * 4096


def test_dry_run_tiny_llama_tied(tiny_llama_dir, capsys):
    from conftest import load_tiny_source
    from transformers import LlamaForCausalLM

    assert main(["convert", str(tiny_llama_dir), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["family"] == "llama" and plan["dtype"] == "float32"
    model = load_tiny_source(tiny_llama_dir)
    assert isinstance(model, LlamaForCausalLM)
    assert plan["parameters"]["source"] == sum(p.numel() for p in model.parameters())


def test_help_explains_every_flag(capsys):
    assert main(["convert", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--pattern", "--period", "--attention-layers", "--gate-init", "--dtype", "--dry-run", "--force",
                 "--seed", "SOURCE", "OUTPUT", "default"):  # fmt: skip
        assert flag in text
    assert main(["--help"]) == 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["convert", "{cfg}", "--dry-run", "--pattern", "0,x"], "--pattern"),
        (["convert", "{cfg}", "--dry-run", "--attention-layers", "3,,7"], "--attention-layers"),
        (["convert", "{cfg}", "--dry-run", "--period", "0"], "--period"),
        (["convert", "{cfg}", "--dry-run", "--pattern", "5"], "pattern entries [5]"),
        (["convert", "{cfg}", "--dry-run", "--attention-layers", "40"], "out of range"),
        (["convert", "{cfg}", "--dry-run", "--attention-layers", "3", "--period", "2"], "not both"),
        (["convert", "{cfg}", "--dry-run", "--gate-init", "half"], "invalid choice"),
        (["convert", "{cfg}", "--dry-run", "--dtype", "int8"], "invalid choice"),
        (["convert", "{cfg}"], "needs an OUTPUT"),
        (["convert"], "required"),
        ([], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_flag_errors_are_one_line(tmp_path, capsys, argv, needle):
    folder = _qwen3_8b_folder(tmp_path)
    argv = [a.replace("{cfg}", str(folder)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridize: error: ") and err.count("\n") == 1 and needle in err


# ------------------------------------------------------------------------------------------------ errors (subprocess)


def _case_dirs(root: Path, make_tiny_source) -> dict[str, Path]:
    base = json.loads((FIXTURES / "qwen3_8b_config.json").read_text())

    def config_only(name: str, **change) -> Path:
        folder = root / name
        folder.mkdir()
        cfg = {**base, **change}
        (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v != "DELETE"}))
        return folder

    cases = {
        "moe": config_only("moe", model_type="qwen3_moe", num_experts=128, num_experts_per_tok=8),
        "unknown": config_only("unknown", model_type="gpt_neox"),
        "bias": config_only("bias", attention_bias=True),
        "qwen3-sliding": config_only("qwen3-sliding", use_sliding_window=True, sliding_window=4096),
        "mistral-sliding": config_only("mistral-sliding", model_type="mistral", sliding_window=4096),
        "no-config": root / "no-config",
        "missing-weights": config_only("missing-weights"),
        "missing-path": root / "does-not-exist",
    }
    cases["no-config"].mkdir()
    (cases["no-config"] / "model.safetensors").write_bytes(b"")
    truncated = make_tiny_source(root / "truncated", family="qwen3")
    _data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(_data[: len(_data) // 2])
    cases["truncated"] = truncated
    sharded = make_tiny_source(root / "truncated-shard", family="llama", max_shard_size="20KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1])
    cases["truncated-shard"] = sharded
    pickles = make_tiny_source(root / "pickles", family="llama")
    (pickles / "model.safetensors").unlink()
    (pickles / "pytorch_model.bin").write_bytes(b"not really a pickle")
    cases["pickles"] = pickles
    return cases


NEEDLES = {
    "moe": "mixture-of-experts",
    "unknown": "unsupported model_type 'gpt_neox'",
    "bias": "biases we cannot represent",
    "qwen3-sliding": "sliding-window",
    "mistral-sliding": "sliding-window",
    "no-config": "is not a model folder: no config.json",
    "missing-weights": "has no weights",
    "missing-path": "does not exist",
    "truncated": "model.safetensors is truncated",
    "truncated-shard": "is truncated",
    "pickles": "never loads pickles",
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """Run every broken source through `python -m hybridize convert SRC OUT` (in parallel: each start imports torch)."""
    from conftest import build_tiny_source

    root = tmp_path_factory.mktemp("errors")
    cases = _case_dirs(root, lambda folder, **kw: build_tiny_source(folder, **kw))

    def one(item):
        name, folder = item
        out = root / f"out-{name}"
        return name, out, run_cli("convert", str(folder), str(out))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        return {name: (out, proc) for name, out, proc in pool.map(one, cases.items())}


@pytest.mark.parametrize("case", sorted(NEEDLES))
def test_broken_sources_fail_in_one_line(error_runs, case):
    out, proc = error_runs[case]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hybridize: error: ") and NEEDLES[case] in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists()


def test_hub_offline_one_line():
    proc = run_cli("convert", "hybridize-tests-nonexistent/no-such-model-xyz", "--dry-run")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "could not reach the Hugging Face hub" in proc.stderr


# ------------------------------------------------------------------------------------------------ real conversion


@pytest.mark.skipif(not _have_convert(), reason="hybridize.transfer.convert not written yet")
def test_convert_tiny_qwen3(tiny_qwen3_dir, tmp_path):
    out = tmp_path / "hybrid"
    proc = run_cli("convert", str(tiny_qwen3_dir), str(out), "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert "seconds" in summary
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"].count("linear_attention") == 3
    assert list(out.glob("*.safetensors"))

    again = run_cli("convert", str(tiny_qwen3_dir), str(out))  # exists, no --force
    assert again.returncode == 2 and again.stderr.startswith("hybridize: error:") and "--force" in again.stderr
    assert run_cli("convert", str(tiny_qwen3_dir), str(out), "--force", "--dtype", "bfloat16").returncode == 0


def test_commands_keep_triton_autotuning_on_disk_unless_the_user_says(monkeypatch, capsys):
    """fla's kernels autotune on first use; every command keeps the winners in Triton's disk cache (so a resumed
    run does not tune again), and leaves a user's own TRITON_CACHE_AUTOTUNING alone."""
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    assert main(["--help"]) == 0
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "1"
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "0")
    assert main(["--help"]) == 0
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "0"


def test_convert_refuses_a_missing_parent_folder_before_reading_the_source(tiny_qwen3_dir, tmp_path, monkeypatch,
                                                                         capsys):
    import hybridize.transfer.convert as convert

    monkeypatch.setattr(convert, "open_source", lambda *a, **k: pytest.fail("the source was read"))
    assert main(["convert", str(tiny_qwen3_dir), str(tmp_path / "no" / "such" / "out")]) == 2
    assert "the parent folder of" in capsys.readouterr().err


def test_convert_no_progress_draws_no_bars(tiny_qwen3_dir, tmp_path, capsys):
    assert main(["convert", str(tiny_qwen3_dir), str(tmp_path / "out"), "--no-progress"]) == 0
    assert "convert:" not in capsys.readouterr().err  # tqdm's "convert: 100%|..." bar
    assert main(["convert", str(tiny_qwen3_dir), str(tmp_path / "out2")]) == 0
    assert "convert:" in capsys.readouterr().err


@pytest.mark.parametrize("joined", [False, True])
def test_the_script_skips_interpreter_teardown_after_a_process_group(monkeypatch, joined):
    """A gloo worker thread still dropping its last collective's tensors during interpreter teardown aborts a
    finished 2-process run (SIGABRT, seen in CI): after a command that joined a process group the script leaves
    with os._exit (same exit code, streams flushed); other commands exit normally."""
    import hybridize.cli as cli
    import hybridize.train.parallelize as parallelize

    class Left(Exception):
        pass

    def leave(how):
        def record(code):
            raise Left(how, code)
        return record

    monkeypatch.setattr(parallelize, "_started", joined)
    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(os, "_exit", leave("os._exit"))
    monkeypatch.setattr(sys, "exit", leave("sys.exit"))
    with pytest.raises(Left) as left:
        cli.run()
    assert left.value.args == ("os._exit" if joined else "sys.exit", 3)


def test_init_distributed_records_that_a_process_group_ran(monkeypatch):
    import hybridize.train.parallelize as parallelize

    monkeypatch.setattr(parallelize, "_started", False)
    parallelize.init_distributed("cpu")
    try:
        assert parallelize.started_process_group()
    finally:
        parallelize.shutdown_distributed()
