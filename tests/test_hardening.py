"""Issue 13, hardening: every bad input gets one line and a non-zero exit, nothing is destroyed or left behind,
crafted files run no code. One test (or a parametrised family) per class of the issue; the fuzz test is
test_fuzz.py.

Commands run in-process through `hybridize.cli.main` (what the `hybridize` script runs), which is fast; a few run
as real processes where a signal or a separate interpreter matters.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybridize.cli import main
from hybridize.errors import HybridizeError

SRC = Path(__file__).resolve().parents[1] / "src"
ALL_ATTENTION = ["--pattern", ""]


def cli(*args) -> tuple[int, str, str]:
    """`hybridize ARGS` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def refused(result: tuple[int, str, str], needle: str) -> str:
    """Assert a refusal: exit 2, exactly one line on stderr starting `hybridize: error:`, containing `needle`."""
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridize: error: "), err
    assert "Traceback" not in err and needle in lines[0], lines[0]
    return lines[0]


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> sha256: an input must be byte-for-byte unchanged after a refusal."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Payload:
    """A pickle that creates `sentinel` when unpickled: proof that code from a crafted file ran."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def dead_pid() -> int:
    """The id of a process that has just exited (so no process has it)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A teacher, its converted 3:1 student, and a small JSONL corpus."""
    import random

    from conftest import build_tiny_source

    from hybridize.transfer.convert import convert_to_folder

    root = tmp_path_factory.mktemp("harden")
    build_tiny_source(root / "teacher", family="qwen3")
    convert_to_folder(str(root / "teacher"), root / "student", progress=False)
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(120):
            f.write(json.dumps({"text": " ".join(f"w{rng.randint(0, 60)}" for _ in range(rng.randint(5, 60)))}) + "\n")
    return root


def distill_args(ws: Path, out: Path, *extra) -> list:
    return ["distill", "--teacher", ws / "teacher", "--student", ws / "student", "--data", ws / "train.jsonl",
            "--out", out, "--seq-len", 32, "--batch-size", 4, "--lr", 3e-3, "--warmup", 2, "--no-progress", *extra]


@pytest.fixture(scope="module")
def stopped_run(ws):
    """A run of 4 steps stopped by --stop-at 2 with a checkpoint at step 2 (copy it before changing it)."""
    run = ws / "stopped"
    code, _, err = cli(*distill_args(ws, run, "--steps", 4, "--save-every", 2, "--stop-at", 2))
    assert code == 0, err
    assert (run / "checkpoints" / "step_00000002" / "trainer_state.json").is_file()
    return run


@pytest.fixture(scope="module")
def finished_run(ws):
    """A run of 3 steps that ran to its end (its checkpoint at step 3, RUN/final written)."""
    run = ws / "finished"
    code, out, err = cli(*distill_args(ws, run, "--steps", 3, "--save-every", 0))
    assert code == 0, err
    assert json.loads(out)["steps"] == 3
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ================================================================================================ security


def test_resume_reads_no_pickle_and_the_checkpoint_holds_none(ws, stopped_run, tmp_path, monkeypatch):
    """Item 1: a checkpoint is safetensors + JSON only, and resuming never calls an unpickler on a file."""
    files = [p for p in (stopped_run / "checkpoints").rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".safetensors", ".json"}
    assert not any(p.name == ".metadata" for p in files)

    def forbidden(*args, **kwargs):
        raise AssertionError("resume unpickled a file")

    monkeypatch.setattr(pickle, "load", forbidden)  # DCP's FileSystemReader reads .metadata with this
    monkeypatch.setattr(torch, "load", forbidden)  # and non-tensor values / torch_save tensors with this
    run = _copy(stopped_run, tmp_path / "run")
    code, out, err = cli(*distill_args(ws, run, "--steps", 4, "--save-every", 2, "--resume"))
    assert code == 0, err
    assert json.loads(out)["steps"] == 4
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_pickle_free_checkpoints_reshard_across_world_sizes(ws, stopped_run, tmp_path):
    """Item 1: the safetensors layout keeps what DCP gave: a checkpoint of 2 processes (gloo) resumes in 1 and
    continues the same run as a 1-process checkpoint does."""
    args = ("--steps", 4, "--save-every", 2)
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541",
           "-m", "hybridize", *map(str, distill_args(ws, two, *args, "--stop-at", 2))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[:4000]  # the ranks' own lines come before torchrun's summary
    shards = sorted(p.name for p in (two / "checkpoints" / "step_00000002" / "state").iterdir())
    assert len(shards) == 2  # one file per rank
    one = _copy(stopped_run, tmp_path / "one")
    for run in (two, one):
        code, _, err = cli(*distill_args(ws, run, *args, "--resume"))
        assert code == 0, err
    a, b = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two))
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "kd_loss", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4), (x["step"], key)


@pytest.mark.parametrize("craft", ["old-format", "extra-pickles", "shard-is-a-pickle"])
def test_a_crafted_checkpoint_runs_no_code(ws, stopped_run, tmp_path, craft, caplog):
    """Item 1: a `__reduce__` payload anywhere in a run folder is never executed; the folder is refused (in one
    line: no library traceback logged either, which a user without pytest's log capture would see on stderr)."""
    run = _copy(stopped_run, tmp_path / "run")
    step = run / "checkpoints" / "step_00000002"
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(Payload(sentinel))
    state = json.loads((step / "trainer_state.json").read_text())
    if craft == "old-format":  # what DCP's default layout looks like: a pickled .metadata
        del state["format"]
        (step / ".metadata").write_bytes(payload)
        needle = "format read with pickle"
    elif craft == "extra-pickles":
        (step / ".metadata").write_bytes(payload)
        (step / "state" / "__0_0.distcp").write_bytes(payload)
        needle = "is damaged"
    else:
        shard = next((step / "state").glob("*.safetensors"))
        shard.write_bytes(payload)
        state["files"][str(shard.relative_to(step))] = len(payload)
        needle = "cannot load checkpoint"
    (step / "trainer_state.json").write_text(json.dumps(state))
    refused(cli(*distill_args(ws, run, "--steps", 4, "--save-every", 2, "--resume")), needle)
    assert not sentinel.exists()
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def _sharded_source(make_tiny_source, tmp_path: Path) -> Path:
    folder = make_tiny_source(tmp_path / "src", family="qwen3", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _point_index_outside(folder: Path, absolute: bool) -> None:
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    name, shard = sorted(doc["weight_map"].items())[0]
    outside = folder.parent / "outside.safetensors"
    shutil.copyfile(folder / shard, outside)  # a valid file: following the path would silently succeed
    doc["weight_map"][name] = str(outside) if absolute else "../outside.safetensors"
    index.write_text(json.dumps(doc))


@pytest.mark.parametrize("absolute", [False, True], ids=["dotdot", "absolute"])
def test_index_shard_paths_stay_inside_the_folder(make_tiny_source, tmp_path, absolute):
    """Item 2: convert, export and loading for eval refuse an index entry outside the model folder."""
    from hybridize.transfer.convert import convert_to_folder

    source = _sharded_source(make_tiny_source, tmp_path)
    hybrid = tmp_path / "hybrid"
    convert_to_folder(str(source), hybrid, progress=False, max_shard_bytes=20_000)
    _point_index_outside(source, absolute)
    refused(cli("convert", source, tmp_path / "out"), "outside the model folder")
    assert not (tmp_path / "out").exists()
    _point_index_outside(hybrid, absolute)
    refused(cli("export", hybrid, tmp_path / "exported"), "outside the model folder")
    assert not (tmp_path / "exported").exists()
    (tmp_path / "d.txt").write_text("w1 w2 w3 " * 50)
    refused(cli("eval", hybrid, "--data", tmp_path / "d.txt", "--seq-len", 8, "--no-progress"),
            "outside the model folder")


def test_pickle_only_models_are_refused_by_eval_and_distill(ws, tmp_path):
    """Item 3: a `pytorch_model.bin`-only hybrid is never loaded (the file holds a payload here)."""
    hybrid = shutil.copytree(ws / "student", tmp_path / "bin-only")
    (hybrid / "model.safetensors").unlink()
    sentinel = tmp_path / "pwned"
    (hybrid / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(sentinel)))
    refused(cli("eval", hybrid, "--data", ws / "train.jsonl", "--seq-len", 16, "--no-progress"),
            "never loads pickles")
    args = distill_args(ws, tmp_path / "run", "--steps", 1)
    args[args.index("--student") + 1] = hybrid
    refused(cli(*args), "never loads pickles")
    assert not sentinel.exists() and not (tmp_path / "run").exists()


# ================================================================================================ data loss


def test_an_output_never_replaces_an_input(make_tiny_source, ws, tmp_path):
    """Item 4: OUTPUT equal to, holding, or inside an input is refused, also through `..` and symlinks."""
    from hybridize.transfer.convert import convert_to_folder

    source = make_tiny_source(tmp_path / "models" / "src", family="llama", tie=True)
    hybrid = tmp_path / "models" / "hybrid"
    convert_to_folder(str(source), hybrid, progress=False)
    (tmp_path / "link").symlink_to(hybrid)
    before = digest(tmp_path / "models")
    refused(cli("convert", source, source, "--force"), "is the input")
    refused(cli("convert", source, source / "sub" / "..", "--force"), "is the input")
    refused(cli("convert", source, tmp_path / "models", "--force"), "is the input")  # would delete it
    refused(cli("convert", source, source / "inside"), "is the input")
    refused(cli("export", hybrid, hybrid / "sub" / "..", "--force"), "is the input")
    refused(cli("export", hybrid, tmp_path / "link", "--force"), "is the input")
    args = distill_args(ws, tmp_path / "models", "--steps", 1)
    args[args.index("--student") + 1] = tmp_path / "models" / "final"
    shutil.copytree(ws / "student", tmp_path / "models" / "final")
    refused(cli(*args), "RUN_DIR/final")  # the run's final model would replace its student
    shutil.rmtree(tmp_path / "models" / "final")
    assert digest(tmp_path / "models") == before
    assert not list((tmp_path / "models").glob(".*"))


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--min-lr", "inf"), ("--clip", "nan"),
                                         ("--temperature", "inf"), ("--alpha", "nan"), ("--tokens", "inf"),
                                         ("--eval-tokens", "inf")])
def test_non_finite_flags_are_refused_up_front(ws, tmp_path, flag, value):
    """Item 5 / 10: a non-finite flag is refused before anything is read or written."""
    refused(cli(*distill_args(ws, tmp_path / "run", flag, value)), flag)  # the last --lr given wins
    assert not (tmp_path / "run").exists()


def test_library_config_refuses_non_finite_values():
    """Item 5: the Python API validates too (inf passes `lr > 0`)."""
    from hybridize.train.config import DistillConfig

    for bad in ({"lr": math.inf}, {"min_lr": math.nan}, {"clip": math.inf}, {"weight_decay": math.nan}):
        with pytest.raises(HybridizeError, match="finite"):
            DistillConfig(**bad)


def test_a_final_model_is_never_written_with_non_finite_weights(ws, tmp_path):
    """Item 5: save_final refuses NaN / inf weights and writes nothing."""
    from hybridize.model.modeling import HybridForCausalLM
    from hybridize.train.models import load_language_model
    from hybridize.train.trainer import DistillationTrainer

    student = HybridForCausalLM.from_pretrained(ws / "student", dtype=torch.float32)
    with torch.no_grad():
        student.model.layers[1].mlp.up_proj.weight[3, 3] = math.inf
    trainer = DistillationTrainer(load_language_model(ws / "teacher", torch.float32), student)
    with pytest.raises(HybridizeError, match="non-finite weights .*model.layers.1.mlp.up_proj.weight"):
        trainer.save_final(tmp_path / "final", torch.float32)
    assert not (tmp_path / "final").exists() and not list(tmp_path.iterdir())


# ================================================================================================ one line


def _config_folder(tmp_path: Path, make_tiny_source, family: str, **change) -> Path:
    folder = make_tiny_source(tmp_path / "src", family=family)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


CONFIG_CASES = {
    "layers-edited": ({"num_hidden_layers": 6, "layer_types": ["full_attention"] * 4}, "num_hidden_layers"),
    "hidden-as-string": ({"hidden_size": "64"}, "hidden_size"),
    "zero-heads": ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    "kv-not-dividing": ({"num_key_value_heads": 3}, "num_key_value_heads is 3"),
    "model-type-list": ({"model_type": ["qwen3"]}, "model_type must be a string"),
    "zero-layers": ({"num_hidden_layers": 0, "layer_types": []}, "num_hidden_layers is 0"),
    "bad-eps": ({"rms_norm_eps": -1}, "rms_norm_eps"),
    "pad-out-of-range": ({"pad_token_id": 500}, "pad_token_id is 500"),
    "bad-rope": ({"rope_parameters": {"rope_type": "default", "rope_theta": -5.0}}, "rope_theta"),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "convert"])
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_invalid_configs_are_one_line(make_tiny_source, tmp_path, case, dry_run):
    """Item 6 (and 17: num_hidden_layers 0): invalid or inconsistent configs, with and without --dry-run."""
    change, needle = CONFIG_CASES[case]
    folder = _config_folder(tmp_path, make_tiny_source, "qwen3", **change)
    before = digest(folder)
    out = tmp_path / "out"
    refused(cli("convert", folder, *(["--dry-run"] if dry_run else [out])), needle)
    assert not out.exists() and digest(folder) == before


def test_invalid_qwen3_5_text_config_is_one_line(ws, tmp_path):
    """Item 6: the same for an imported qwen3_5_text folder (its layer schedule must match its depth)."""
    from hybridize.export.qwen3_5 import export_qwen3_5

    exported = tmp_path / "qwen35"
    export_qwen3_5(ws / "student", exported)
    cfg = json.loads((exported / "config.json").read_text())
    cfg["layer_types"] = cfg["layer_types"][:-1]
    (exported / "config.json").write_text(json.dumps(cfg))
    refused(cli("convert", exported, "--dry-run"), "layer_types")
    refused(cli("convert", exported, tmp_path / "out"), "layer_types")


def _resave(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


SHAPE_CASES = {
    "intermediate-size": ({"intermediate_size": 96}, None, "mlp.gate_proj.weight is stored with shape [128, 64]"),
    "vocab-size": ({"vocab_size": 100}, None, "embed_tokens.weight is stored with shape [128, 64]"),
    "heads": ({"num_attention_heads": 2, "num_key_value_heads": 2}, None, "q_proj.weight is stored"),
    "transposed": ({}, lambda t: t.update({"model.layers.2.mlp.up_proj.weight":
                                           t["model.layers.2.mlp.up_proj.weight"].T.contiguous()}),
                   "model.layers.2.mlp.up_proj.weight is stored with shape [64, 128] but the config implies [128, 64]"),
    "integer-tensor": ({}, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].long()}),
                       "model.norm.weight is stored as int64"),
}


@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_config_and_stored_shapes_must_agree(make_tiny_source, tmp_path, case):
    """Item 7: every source tensor's shape is checked against the config before anything is written; a
    same-size transposed tensor is refused, not reinterpreted."""
    change, tensors, needle = SHAPE_CASES[case]
    folder = _config_folder(tmp_path, make_tiny_source, "qwen3", **change)
    if tensors is not None:
        _resave(folder, tensors)
    refused(cli("convert", folder, tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_distill_from_an_unconverted_student_says_convert_first(ws, tmp_path):
    """Item 8."""
    args = distill_args(ws, tmp_path / "run", "--steps", 1)
    args[args.index("--student") + 1] = ws / "teacher"
    line = refused(cli(*args), "is a qwen3 model, not a hybrid: convert it first")
    assert "hybridize convert" in line and not (tmp_path / "run").exists()


def _rewrite_header(path: Path, change) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _first_entry(header: dict) -> dict:
    return header[sorted(k for k in header if k != "__metadata__")[0]]


HEADER_CASES = {
    "string-offsets": (lambda h: _first_entry(h).update(data_offsets=["0", "64"]), "data_offsets"),
    "negative-offsets": (lambda h: _first_entry(h).update(data_offsets=[-64, 0]), "data_offsets"),
    "negative-shape": (lambda h: _first_entry(h).update(shape=[-16, -1]), "shape"),
    "string-shape": (lambda h: _first_entry(h).update(shape=["16"]), "shape"),
    "into-the-header": (lambda h: [e.update(data_offsets=[e["data_offsets"][0] - 8, e["data_offsets"][1] - 8])
                                   for k, e in h.items() if k != "__metadata__"], "data_offsets"),
    "overlapping": (lambda h: _first_entry(h).update(
        data_offsets=[o + 4 for o in _first_entry(h)["data_offsets"]]), "overlap or leave gaps"),
    "bad-metadata": (lambda h: h.update({"__metadata__": ["x"]}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_crafted_safetensors_headers_are_refused(make_tiny_source, tmp_path, case):
    """Item 9: string / negative offsets, negative shapes, offsets into the header, overlaps: refused, not read."""
    change, needle = HEADER_CASES[case]
    folder = make_tiny_source(tmp_path / "src", family="qwen3")
    _rewrite_header(folder / "model.safetensors", change)
    refused(cli("convert", folder, tmp_path / "out"), needle)
    assert not (tmp_path / "out").exists()


def test_non_string_weight_map_value_is_refused(make_tiny_source, tmp_path):
    """Item 9: an index value that is not a file name."""
    folder = _sharded_source(make_tiny_source, tmp_path)
    doc = json.loads((folder / "model.safetensors.index.json").read_text())
    doc["weight_map"][sorted(doc["weight_map"])[0]] = ["model-00001-of-00002.safetensors"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
    refused(cli("convert", folder, tmp_path / "out"), "not a file name")


def _tiny_gguf(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_description("a description long enough that 1 KB ends inside the header " * 40)
    writer.add_tensor("token_embd.weight", np.zeros((8, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("size", [24, 1024])
def test_truncated_gguf_is_one_line(tmp_path, size):
    """Item 10: a GGUF file cut inside its header."""
    whole = _tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    assert len(whole) > 2048
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:size])
    refused(cli("convert", cut, "--dry-run"), "cannot read GGUF file")
    refused(cli("convert", cut, tmp_path / "out"), "cannot read GGUF file")
    assert not (tmp_path / "out").exists()


def test_truncated_checkpoint_shard_on_resume(ws, stopped_run, tmp_path):
    """Item 10: a shard cut short is reported (and names the fix), not loaded as stale values."""
    run = _copy(stopped_run, tmp_path / "run")
    shard = next((run / "checkpoints" / "step_00000002" / "state").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    line = refused(cli(*distill_args(ws, run, "--steps", 4, "--save-every", 2, "--resume")), "is damaged")
    assert "delete it" in line


def test_disk_full_while_checkpointing(tmp_path, monkeypatch):
    """Item 11: ENOSPC during a checkpoint says "no space left on ..." and removes the partial step_N.tmp; the
    previous checkpoint stays complete and loadable."""
    import safetensors.torch

    from hybridize.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from hybridize.train.parallelize import init_distributed, shutdown_distributed

    env = init_distributed("cpu")
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        state = {"step": 1, "tokens": 8, "bad_steps": 0, "data": {"epoch": 0}, "scheduler": {}, "config": {}}
        save_checkpoint(tmp_path, 1, model, optimizer, state, env.rank, env.device)

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        for target, name in ((safetensors.torch, "save"), (safetensors.torch, "save_file")):
            with monkeypatch.context() as m:
                m.setattr(target, name, full)
                if name == "save_file":  # the RNG files: imported by name into the checkpoint module
                    m.setattr("hybridize.train.checkpoint.save_file", full)
                with pytest.raises(HybridizeError, match="no space left on the device holding .*step_00000002"):
                    save_checkpoint(tmp_path, 2, model, optimizer, {**state, "step": 2}, env.rank, env.device)
            assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
        assert latest_checkpoint(tmp_path).name == "step_00000001"
        loaded = load_checkpoint(tmp_path / "checkpoints" / "step_00000001", model, optimizer, env.rank, env.device)
        assert loaded["step"] == 1
    finally:
        shutdown_distributed()


# ================================================================================================ runs that stop


def test_resume_restarts_a_run_that_has_no_checkpoint(ws, finished_run, tmp_path):
    """Item 12: no complete checkpoint (a failed save, kill -9 before the first save): a fresh start says to pass
    --resume, and --resume restarts from step 0, saying so, and reproduces the run exactly."""
    run = _copy(finished_run, tmp_path / "run")
    shutil.rmtree(run / "final")
    for step in (run / "checkpoints").iterdir():
        shutil.rmtree(step)
    (run / "checkpoints" / "step_00000002.tmp" / "state").mkdir(parents=True)  # a save that failed
    expected = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    args = distill_args(ws, run, "--steps", 3, "--save-every", 0)
    refused(cli(*args), "pass --resume to continue it (it has no complete checkpoint, so it restarts from step 0)")
    code, out, err = cli(*args, "--resume")
    assert code == 0, err
    assert err.strip().splitlines() == [f"hybridize: note: {run} has no complete checkpoint; starting it again "
                                        f"from step 0"]
    keys = ("step", "loss", "kd_loss", "task_loss", "lr", "grad_norm", "tokens")
    got = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [[m[k] for k in keys] for m in got] == [[m[k] for k in keys] for m in expected]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]


def test_resume_with_nothing_at_all_still_says_so(ws, tmp_path):
    refused(cli(*distill_args(ws, tmp_path / "none", "--steps", 2, "--resume")), "nothing to resume")


def test_resume_refuses_schedule_changes_unless_overridden(ws, stopped_run, tmp_path):
    """Item 13: --steps / --lr / --warmup that differ from the checkpoint are listed and refused; --override
    accepts them; the data layout and --train can never change."""
    run = _copy(stopped_run, tmp_path / "run")
    base = distill_args(ws, run, "--steps", 4, "--save-every", 2, "--resume")
    changed = [*base, "--steps", 6, "--lr", 5e-3, "--warmup", 3]  # the last value of a flag wins
    line = refused(cli(*changed), "--resume with settings that change the run")
    for difference in ("--steps 4 -> 6", "--lr 0.003 -> 0.005", "--warmup 2 -> 3", "--override"):
        assert difference in line
    refused(cli(*base, "--seq-len", 16, "--override"), "--resume cannot change --seq-len 32 -> 16")
    refused(cli(*base, "--train", "linear", "--override"), "--train all -> linear")
    code, out, err = cli(*changed, "--override")
    assert code == 0, err
    assert json.loads(out)["steps"] == 6


# ================================================================================================ leftovers


def test_sigterm_during_convert_leaves_nothing(make_tiny_source, tmp_path):
    """Item 14: SIGTERM is handled like Ctrl-C: the temporary output is removed, exit 130."""
    source = make_tiny_source(tmp_path / "src", family="qwen3")
    out = tmp_path / "out"
    script = (
        "import sys, time\n"
        "from hybridize.transfer import safetensors_io\n"
        "write = safetensors_io.ShardedWriter.write\n"
        "def slow(self, name, tensor):\n"
        "    time.sleep(0.2)\n"
        "    write(self, name, tensor)\n"
        "safetensors_io.ShardedWriter.write = slow\n"
        "from hybridize.cli import main\n"
        f"sys.exit(main(['convert', {str(source)!r}, {str(out)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    tmp = tmp_path / f".out.tmp-{proc.pid}"
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp.glob("*.safetensors")):
        time.sleep(0.05)
    assert tmp.is_dir(), "the conversion never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().endswith("hybridize: interrupted"), err
    assert "Traceback" not in err
    assert not tmp.exists() and not out.exists()


def test_stale_temporaries_of_dead_processes_are_cleaned(make_tiny_source, tmp_path):
    """Item 14: what kill -9 left (`.NAME.tmp-PID`, `.NAME.old-PID`) is cleaned on the next run into the same
    parent; a replacement cut between its two renames is undone; live processes' folders are left alone; --force
    onto a file leaves no `.OUTPUT.old-PID`."""
    source = make_tiny_source(tmp_path / "src", family="llama", tie=True)
    parent = tmp_path / "outs"
    parent.mkdir()
    dead, live = dead_pid(), os.getpid()
    (parent / f".a.tmp-{dead}").mkdir()
    (parent / f".a.tmp-{dead}" / "model.safetensors").write_bytes(b"x" * 1000)
    (parent / f".kept.old-{dead}").mkdir()  # a replacement killed between renames: kept/ is missing
    (parent / f".kept.old-{dead}" / "config.json").write_text("{}")
    (parent / "done").mkdir()
    (parent / f".done.old-{dead}").mkdir()  # the replacement finished: only the old copy is left over
    (parent / f".busy.tmp-{live}").mkdir()
    (parent / f".notes.old-{dead}").write_text("another program's file")  # not ours: left alone
    (parent / f".cache.tmp-{dead}" / "sub").mkdir(parents=True)  # holds a folder: not what hybridize writes
    (parent / "file.txt").write_text("an existing file")
    code, _, err = cli("convert", source, parent / "file.txt", "--force")
    assert code == 0, err
    assert sorted(p.name for p in parent.iterdir()) == [f".busy.tmp-{live}", f".cache.tmp-{dead}",
                                                        f".notes.old-{dead}", "done", "file.txt", "kept"]
    assert (parent / "file.txt" / "config.json").is_file() and (parent / "kept" / "config.json").is_file()


def test_stale_gguf_and_token_temporaries_are_cleaned(tmp_path):
    """Item 14: a killed GGUF conversion's unpacked tokenizer folder, and a killed tokenization's partial file."""
    from hybridize.output import GGUF_TMP_PREFIX, remove_stale_temporaries
    from hybridize.train.data import load_or_build_tokens

    dead, live = dead_pid(), os.getpid()
    (tmp_path / f"{GGUF_TMP_PREFIX}{dead}-abc").mkdir()
    (tmp_path / f"{GGUF_TMP_PREFIX}{live}-def").mkdir()
    (tmp_path / "hybridize-gguf-legacy").mkdir()  # no PID: cannot be judged, left alone
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [f"{GGUF_TMP_PREFIX}{dead}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{GGUF_TMP_PREFIX}{live}-def", "hybridize-gguf-legacy"]
    import numpy as np

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f".tokens.npy.tmp-{dead}").write_bytes(b"partial")
    np.save(tmp_path / "ids.npy", np.arange(10, dtype=np.int32))
    tokens = load_or_build_tokens([tmp_path / "ids.npy"], None, None, cache, progress=False, vocab_size=16)
    assert tokens.tolist() == list(range(10))
    assert sorted(p.name for p in cache.iterdir()) == ["tokens.json", "tokens.npy"]


def test_missing_tokenizer_is_named_and_npy_data_needs_none(ws, tmp_path):
    """Item 15: a folder without tokenizer files is said to lack one (not "no text found"); pre-tokenized .npy
    data needs no tokenizer, its ids checked against the model's vocabulary."""
    import numpy as np

    bare = shutil.copytree(ws / "student", tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    assert not (bare / "tokenizer.json").exists()
    refused(cli("eval", bare, "--data", ws / "train.jsonl", "--seq-len", 16, "--no-progress"), "no tokenizer found")
    code, out, err = cli("eval", bare, "--data", ws / "train.jsonl", "--teacher", ws / "teacher", "--seq-len", 16,
                         "--max-tokens", 64, "--no-progress")  # the teacher's tokenizer serves
    assert code == 0, err
    ids = np.random.default_rng(0).integers(0, 128, 200).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    code, out, err = cli("eval", bare, "--data", tmp_path / "ids.npy", "--seq-len", 20, "--no-progress")
    assert code == 0, err
    assert json.loads(out)["tokens"] == 10 * 19
    np.save(tmp_path / "big.npy", np.array([5, 128, 7], dtype=np.int32))  # the model has 128 tokens: 0..127
    refused(cli("eval", bare, "--data", tmp_path / "big.npy", "--seq-len", 2, "--no-progress"),
            "outside the model's vocabulary [0, 128)")


def _strict(text: str):
    """json.loads that rejects NaN / Infinity, as strict parsers (JavaScript, jq, Go) do."""
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def test_non_finite_results_are_written_as_null(ws, tmp_path):
    """Item 16 (and 17: the max-bad-steps message when no checkpoint exists): metrics.jsonl and eval output are
    strict JSON; a non-finite value is null and listed under "non_finite"."""
    from hybridize.model.modeling import HybridForCausalLM

    broken = tmp_path / "nan-student"
    student = HybridForCausalLM.from_pretrained(ws / "student", dtype=torch.float32)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight[0, 0] = math.nan
    student.save_pretrained(broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ws / "student" / name, broken / name)
    code, out, err = cli("eval", broken, "--data", ws / "train.jsonl", "--seq-len", 16, "--max-tokens", 64,
                         "--no-progress")
    assert code == 0, err
    result = _strict(out)
    assert result["loss"] is None and result["perplexity"] is None
    assert set(result["non_finite"]) == {"loss", "perplexity"}
    args = distill_args(ws, tmp_path / "run", "--steps", 5, "--save-every", 0, "--max-bad-steps", 2)
    args[args.index("--student") + 1] = broken
    code, _, err = cli(*args)
    lines = err.strip().splitlines()  # a note per skipped step, then the one-line error
    assert code == 2 and len(lines) == 3 and lines[-1].startswith("hybridize: error: stopped: 2 steps"), err
    assert "intact" not in lines[-1] and "no checkpoint was written yet" in lines[-1]
    records = [_strict(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["loss"] is None and r["skipped"] for r in records)


def test_json_safe_replaces_every_non_finite_number():
    from hybridize.output import json_safe

    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": "x", "e": 2}
    assert json_safe(value) == {"a": None, "b": [1.0, None, {"c": None, "non_finite": ["c"]}], "d": "x", "e": 2,
                                "non_finite": ["a"]}


def test_gguf_progress_bars_follow_no_progress():
    """Item 17: transformers' GGUF de-quantizing bar is plain tqdm; --no-progress must reach it."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from hybridize.train.models import gguf_progress

    original = gguf_utils.tqdm
    with gguf_progress(False):
        assert gguf_utils.tqdm(range(3)).disable is True
    with gguf_progress(True):
        assert gguf_utils.tqdm is original
    assert gguf_utils.tqdm is original


def test_resuming_a_finished_run_reports_its_steps(ws, finished_run, tmp_path):
    """Item 17: `"steps": null` no more."""
    run = _copy(finished_run, tmp_path / "run")
    code, out, err = cli(*distill_args(ws, run, "--steps", 3, "--save-every", 0, "--resume"))
    assert code == 0, err
    summary = _strict(out)
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 4 * 32


def test_plot_into_a_missing_folder_names_the_output(finished_run, tmp_path):
    """Item 17: the error names OUT, not a temporary file, and nothing is left."""
    line = refused(cli("plot", finished_run, "--out", tmp_path / "nodir" / "x.png"), "nodir/x.png")
    assert ".tmp" not in line and not (tmp_path / "nodir").exists()


def test_sequences_beyond_the_trained_positions_are_noted(ws, tmp_path):
    """Item 17: --seq-len above max_position_embeddings (256 here) runs, with one line saying so."""
    text = tmp_path / "long.txt"
    text.write_text(" ".join(f"w{i % 60}" for i in range(700)))
    code, out, err = cli("eval", ws / "student", "--data", text, "--seq-len", 300, "--no-progress")
    assert code == 0, err
    assert err.strip().splitlines() == ["hybridize: note: --seq-len 300 exceeds the model's max_position_embeddings "
                                        "(256); positions beyond it were never trained"]
