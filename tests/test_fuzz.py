"""Fuzz: random mutations of tiny valid model folders (config fields, safetensors headers, index entries) through
`convert`, `convert --dry-run` and `export`. Every outcome must be a success whose output is right, or a one-line
HybridizeError; never another exception (a traceback for the user) and never a silently wrong conversion.

Seeded: a failure prints the case number and its mutations; rerun one case with FUZZ_CASE=N. FUZZ_CASES sets the
count (default 300: about 20 s on 2 cores), FUZZ_FIRST the first case.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import torch

from hybridize.cli import main

CASES = int(os.environ.get("FUZZ_CASES", "300"))
FIRST = int(os.environ.get("FUZZ_FIRST", "0"))  # explore other seeds: FUZZ_FIRST=10000 FUZZ_CASES=2000
ONLY = os.environ.get("FUZZ_CASE")

VALUES = [0, -1, 1, 2, 3, 5, 16, 10**12, 2.5, -0.5, "64", "", None, True, False, [], {}, [1, 2], {"a": 1}, 1e400]
MODEL_TYPES = ["qwen3", "llama", "mistral", "qwen3_5_text", "qwen3_moe", "gpt2", "hybridize", ["qwen3"], 3, ""]
DTYPE_CODES = ["F32", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F64", "F8_E4M3", "X", 3, None]


# ------------------------------------------------------------------------------------------------ base folders


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Valid folders the mutations start from: sharded Qwen3, tied Llama, a hybrid, and its qwen3_5_text export."""
    from conftest import build_tiny_source

    from hybridize.export.qwen3_5 import export_qwen3_5
    from hybridize.transfer.convert import convert_to_folder

    root = tmp_path_factory.mktemp("fuzz-bases")
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, head_dim=8, num_hidden_layers=4)
    qwen3 = build_tiny_source(root / "qwen3", family="qwen3", max_shard_size="12KB", **small)
    llama = build_tiny_source(root / "llama", family="llama", tie=True, **{**small, "head_dim": None})
    convert_to_folder(str(qwen3), root / "hybrid", progress=False)
    export_qwen3_5(root / "hybrid", root / "qwen35")
    return {"qwen3": qwen3, "llama": llama, "hybrid": root / "hybrid", "qwen35": root / "qwen35"}


# ------------------------------------------------------------------------------------------------ mutations


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _read(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _value(rng: random.Random, current=None):
    if isinstance(current, int) and not isinstance(current, bool) and rng.random() < 0.5:
        return rng.choice([current + 1, current - 1, current * 2, current // 2, -current, 0])
    return rng.choice(VALUES)


def mutate_config(folder: Path, rng: random.Random) -> str:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except ValueError:
        cfg = None
    kind = rng.choice(["field", "field", "field", "delete", "model_type", "layer_types", "rope", "garbage"])
    if kind == "garbage" or not isinstance(cfg, dict) or not cfg:
        path.write_text(rng.choice(["{", "[]", "", "null", '{"model_type": "qwen3", "a": NaN}', "\ufeff{}"]))
        return "config: garbage"
    if kind == "delete":
        key = rng.choice(sorted(cfg))
        del cfg[key]
        what = f"config: delete {key}"
    elif kind == "model_type":
        cfg["model_type"] = rng.choice(MODEL_TYPES)
        what = f"config: model_type={cfg['model_type']!r}"
    elif kind == "layer_types":
        types = cfg.get("layer_types")
        types = list(types) if isinstance(types, list) else ["full_attention"] * 4
        op = rng.choice(["short", "long", "junk", "none"])
        types = {"short": types[:-1], "long": types + types[:1], "junk": types[:-1] + [rng.choice(["x", 1, None])],
                 "none": None}[op]
        cfg["layer_types"] = types
        what = f"config: layer_types {op}"
    elif kind == "rope":
        rope = cfg.get("rope_parameters")
        rope = dict(rope) if isinstance(rope, dict) else {"rope_type": "default", "rope_theta": 10000.0}
        key = rng.choice(["rope_type", "rope_theta", "partial_rotary_factor", "factor"])
        rope[key] = rng.choice(["default", "linear", "yarn", "llama3", "dynamic", "nope", 0, -1.0, 2.0, "x", None])
        cfg["rope_parameters"] = rope if rng.random() < 0.9 else rng.choice(["x", 3, []])
        what = f"config: rope_parameters[{key}]={rope[key]!r}"
    else:
        key = rng.choice(sorted(k for k in cfg if k not in ("architectures", "transformers_version")))
        cfg[key] = _value(rng, cfg[key])
        what = f"config: {key}={cfg[key]!r}"
    path.write_text(json.dumps(cfg))
    return what


def mutate_header(folder: Path, rng: random.Random) -> str:
    path = rng.choice(_shards(folder))
    try:
        header, data = _read(path)
        names = [k for k in header if k != "__metadata__"]
    except (ValueError, TypeError, AttributeError, struct.error):  # an earlier mutation broke it already
        path.write_bytes(path.read_bytes()[: rng.randrange(0, 64)])
        return f"{path.name}: truncated again"
    name = rng.choice(names)
    entry = header[name]
    kind = rng.choice(["dtype", "shape", "shape", "offsets", "offsets", "offsets", "delete", "rename", "copy",
                       "entry", "metadata", "raw-length", "truncate", "append", "flip"])
    what = f"{path.name}: {kind} of {name}"
    if kind == "dtype":
        entry["dtype"] = rng.choice(DTYPE_CODES)
    elif kind == "shape":
        shape = list(entry["shape"])
        op = rng.choice(["swap", "plus", "minus", "negative", "string", "float", "extra", "empty", "drop"])
        if op == "swap" and len(shape) == 2:
            shape = shape[::-1]  # same size, transposed
        elif op in ("plus", "minus", "negative") and shape:
            i = rng.randrange(len(shape))
            shape[i] = {"plus": shape[i] + 1, "minus": shape[i] - 1, "negative": -shape[i]}[op]
        elif op in ("string", "float") and shape:
            shape[0] = str(shape[0]) if op == "string" else shape[0] + 0.0
        elif op == "extra":
            shape = shape + [1]
        elif op == "drop" and shape:
            shape = shape[1:] + [1] if len(shape) > 1 else shape[:0] + [shape[0]]
        else:
            shape = []
        entry["shape"] = shape
        what += f" -> {shape}"
    elif kind == "offsets":
        b, e = entry["data_offsets"]
        size = e - b
        op = rng.choice(["string", "negative", "swap", "shift", "grow", "zero", "beyond", "into-header", "one"])
        entry["data_offsets"] = {
            "string": [str(b), str(e)], "negative": [-size, 0], "swap": [e, b], "shift": [b + 4, e + 4],
            "grow": [b, e + 4], "zero": [0, 0], "beyond": [b + len(data), e + len(data)],
            "into-header": [b - 64, e - 64], "one": [b],
        }[op]
        what += f" -> {op}"
    elif kind == "delete":
        del header[name]
    elif kind == "rename":
        header[name + ".x"] = header.pop(name)
    elif kind == "copy":
        header[name.replace("weight", "weight2")] = dict(entry)
    elif kind == "entry":
        header[name] = rng.choice([None, 3, "x", [], {"dtype": "F32"}])
    elif kind == "metadata":
        header["__metadata__"] = rng.choice([None, 3, {"format": 1}, ["x"]])
    raw = path.read_bytes()
    if kind == "raw-length":
        n = struct.unpack("<Q", raw[:8])[0]
        new = rng.choice([0, n - 1, n + 1, n + 8, 2**63, len(raw)])
        path.write_bytes(struct.pack("<Q", new) + raw[8:])
        return f"{what} -> header length {new}"
    if kind == "truncate":
        cut = rng.randrange(0, len(raw))
        path.write_bytes(raw[:cut])
        return f"{what} -> {cut} bytes"
    if kind == "append":
        path.write_bytes(raw + bytes(rng.randrange(1, 64)))
        return what
    if kind == "flip":
        n = struct.unpack("<Q", raw[:8])[0]
        i = rng.randrange(8, 8 + n)
        path.write_bytes(raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:])
        return f"{what} at byte {i}"
    _write(path, header, data)
    return what


def mutate_index(folder: Path, rng: random.Random) -> str:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return mutate_header(folder, rng)
    try:
        doc = json.loads(index.read_text())
        name = rng.choice(sorted(doc["weight_map"]))
        shard = doc["weight_map"][name]
        assert isinstance(shard, str) and (folder / shard).is_file()
    except (ValueError, TypeError, KeyError, IndexError, AssertionError):  # an earlier mutation broke the index
        index.write_text("[]")
        return "index: replaced by []"
    kind = rng.choice(["value", "outside", "absolute", "missing", "delete", "map", "garbage"])
    if kind == "outside":  # a real shard placed outside the folder: must not be followed
        shutil.copyfile(folder / shard, folder.parent / f"outside-{shard}")
        doc["weight_map"][name] = f"../outside-{shard}"
    elif kind == "absolute":
        doc["weight_map"][name] = str((folder / shard).absolute())
    elif kind == "value":
        doc["weight_map"][name] = rng.choice([3, None, ["a"], {"a": 1}, "", True])
    elif kind == "missing":
        doc["weight_map"][name] = "model-99999-of-99999.safetensors"
    elif kind == "delete":
        del doc["weight_map"][name]
    elif kind == "map":
        doc["weight_map"] = rng.choice([[], {}, "x", None])
    else:
        index.write_text("{not json")
        return "index: garbage"
    index.write_text(json.dumps(doc))
    return f"index: {kind} for {name}"


def mutate_benignly(folder: Path, rng: random.Random) -> str:
    """A change a correct conversion must accept (and reflect): a constant that shapes nothing, a reordered or
    padded header, extra metadata."""
    kind = rng.choice(["constant", "constant", "header-order", "header-metadata"])
    try:
        return _benign(folder, rng, kind)
    except (ValueError, TypeError, AttributeError, struct.error):  # an earlier mutation broke the file already
        return f"benign: {kind} skipped"


def _benign(folder: Path, rng: random.Random, kind: str) -> str:
    if kind == "constant":
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        key, value = rng.choice([("rms_norm_eps", 1e-5), ("max_position_embeddings", 512), ("hidden_act", "gelu"),
                                 ("bos_token_id", 3), ("dtype", "bfloat16"), ("dtype", "float16"),
                                 ("initializer_range", 0.5), ("unknown_field", [1, "x"])])
        if "rope_parameters" in cfg and rng.random() < 0.3:
            key, value = "rope_parameters", {**cfg["rope_parameters"], "rope_theta": rng.choice([500.0, 1e7])}
        cfg[key] = value
        path.write_text(json.dumps(cfg))
        return f"benign: {key}={value!r}"
    path = rng.choice(_shards(folder))
    header, data = _read(path)
    if kind == "header-order":
        items = list(header.items())
        rng.shuffle(items)
        header = dict(items)
    else:
        header["__metadata__"] = {"format": "pt", "note": "x" * rng.randrange(0, 40)}
    text = json.dumps(header).encode()
    text += b" " * rng.randrange(0, 16)  # trailing spaces in the header are allowed (alignment padding)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return f"benign: {path.name} {kind}"


MUTATORS = [mutate_config, mutate_config, mutate_header, mutate_header, mutate_header, mutate_index,
            mutate_benignly, mutate_benignly]


# ------------------------------------------------------------------------------------------------ oracle


def _reference_tensors(folder: Path) -> dict[str, torch.Tensor] | None:
    """Every tensor as the safetensors library reads it; None when that library refuses a file."""
    from safetensors import safe_open

    out = {}
    try:
        for shard in _shards(folder):
            with safe_open(str(shard), framework="pt") as f:
                for name in f.keys():
                    out[name] = f.get_tensor(name)
    except Exception:  # the reference's verdict
        return None
    return out


def _transformers_config(folder: Path):
    """The source's config as transformers reads it (its defaults fill what config.json leaves out)."""
    from transformers import AutoConfig

    cfg = json.loads((folder / "config.json").read_text())
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _check_conversion(source: Path, out: Path, family: str) -> None:
    """A conversion that succeeded must be right: the reference reader accepts the source, the sizes are the
    config's, and the copied tensors equal the source's as the reference reads them."""
    ref = _reference_tensors(source)
    assert ref is not None, "converted a checkpoint the safetensors library refuses"
    src_cfg = _transformers_config(source)
    out_cfg = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        assert out_cfg[key] == getattr(src_cfg, key), key
    hybrid = _reference_tensors(out)
    dtype = hybrid["model.embed_tokens.weight"].dtype
    assert torch.equal(hybrid["model.embed_tokens.weight"], ref["model.embed_tokens.weight"].to(dtype))
    down = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(hybrid[down], ref[down].to(dtype))
    norm = ref["model.norm.weight"].float()
    expected = norm if family == "qwen3_5_text" else norm - 1  # Qwen3.5 stores x̂·(1+w)
    assert torch.equal(hybrid["model.norm.weight"], expected.to(dtype))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("hybridize: error: ") and err.count("\n") == 1, err
    return err


def _prepare(case: int, bases: dict, work: Path) -> tuple[str, Path, str]:
    """Copy a random base folder and mutate it; returns (base, folder, a label that says what was done)."""
    rng = random.Random(case)
    base = rng.choice(sorted(bases))
    folder = work / f"case{case}"
    shutil.copytree(bases[base], folder)
    steps = [rng.choice(MUTATORS)(folder, rng) for _ in range(rng.choice([1, 1, 2]))]
    return base, folder, f"case {case} ({base}): {'; '.join(steps)}"


def _run(base: str, folder: Path, out: Path, capsys) -> bool:
    """Run the case's commands and check their outcome; True when the main command succeeded."""
    capsys.readouterr()
    if base == "hybrid":
        code = main(["export", str(folder), str(out)])
        if code == 0:
            ref, exported = _reference_tensors(folder), _reference_tensors(out)
            assert ref is not None, "exported a checkpoint the safetensors library refuses"
            assert all(torch.equal(exported[n], ref[n]) for n in exported)
            assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_5_text"
            return True
        assert code == 2
        _one_line_error(capsys)
        assert not out.exists()
        return False
    dry = main(["convert", str(folder), "--dry-run"])
    if dry == 0:
        plan = json.loads(capsys.readouterr().out)
        assert plan["layer_stats"]["total_layers"] == _transformers_config(folder).num_hidden_layers
    else:
        assert dry == 2
        _one_line_error(capsys)
    code = main(["convert", str(folder), str(out)])
    if code == 0:
        capsys.readouterr()
        _check_conversion(folder, out, _transformers_config(folder).model_type)
        return True
    assert code == 2
    _one_line_error(capsys)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary folder left
    return False


def test_fuzz_convert_dry_run_and_export(bases, tmp_path, capsys):
    cases = [int(ONLY)] if ONLY else range(FIRST, FIRST + CASES)
    outcomes = {"ok": 0, "refused": 0}
    for case in cases:
        base, folder, label = _prepare(case, bases, tmp_path)
        out = tmp_path / f"out{case}"
        try:
            ok = _run(base, folder, out, capsys)
        except BaseException as e:  # name the case: FUZZ_CASE=N reruns it
            raise AssertionError(f"fuzz {label}: {type(e).__name__}: {e}") from e
        outcomes["ok" if ok else "refused"] += 1
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    if not ONLY:  # the mutations must exercise both outcomes, not only refusals
        assert outcomes["ok"] >= CASES // 20 and outcomes["refused"] >= CASES // 2, outcomes
