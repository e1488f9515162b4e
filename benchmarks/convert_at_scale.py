"""Convert a Qwen3-8B-shaped checkpoint at full scale and compare with copying the bytes and with transformers.

Writes random bf16 weights with Qwen3-8B's exact shapes as sharded safetensors (~16 GB; tensor by tensor, never the
whole model in memory) plus its config.json into --workdir (reused when already complete), then measures, each in a
fresh process (peak RSS from getrusage(RUSAGE_CHILDREN) of a per-measurement wrapper process):

  (a) copy       shutil.copyfile of the shards (the floor: reading + writing the same bytes)
  (b) transformers  AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16) (lazily mapped), and the same
      followed by a read of every weight (what loading the source before converting it costs)
  (c) hybridize  `hybridize convert src out --dtype bfloat16`

and prints a table (wall seconds, peak RSS GB, wall ratio to the copy) and writes JSON to --output.
The page cache is whatever the previous step left (warm if RAM allows); all three steps see the same state.

Quick smoke test (a few hundred MB):  python benchmarks/convert_at_scale.py --layers 2 --output /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "convert_at_scale.json"
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "hybridize-bench-qwen3-8b"

QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Runs one command as its child and reports wall time and that child's peak RSS (RUSAGE_CHILDREN of a fresh
# process covers exactly one command).
WRAPPER = r"""
import json, resource, subprocess, sys, time
cmd = json.loads(sys.argv[1])
t = time.perf_counter()
proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
out = {"wall_s": wall, "peak_rss_kb": rss_kb, "returncode": proc.returncode, "stdout": proc.stdout}
print(json.dumps(out))
"""


def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every Qwen3ForCausalLM tensor, in checkpoint order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        specs += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q * d, h)),
            (p + "self_attn.k_proj.weight", (kv * d, h)),
            (p + "self_attn.v_proj.weight", (kv * d, h)),
            (p + "self_attn.o_proj.weight", (h, q * d)),
            (p + "self_attn.q_norm.weight", (d,)),
            (p + "self_attn.k_norm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    specs += [("model.norm.weight", (h,))]
    if not cfg["tie_word_embeddings"]:
        specs += [("lm_head.weight", (v, h))]
    return specs


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_tensor(f, name: str, shape, gen: torch.Generator, chunk: int = 1 << 26) -> None:
    """Write one bf16 tensor in row chunks (bounded memory): norms ~1, matrices N(0, 0.02²)."""
    if len(shape) == 1:
        data = (1 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
        f.write(data.view(torch.int16).numpy().tobytes())
        return
    rows, cols = shape
    step = max(1, chunk // cols)
    for r in range(0, rows, step):
        block = torch.randn((min(step, rows - r), cols), generator=gen).mul_(0.02).to(torch.bfloat16)
        f.write(block.view(torch.int16).numpy().tobytes())


def write_source(folder: Path, layers: int, shard_bytes: int, seed: int = 0) -> Path:
    """Write a random Qwen3-8B-shaped bf16 checkpoint (reused when folder/.complete matches)."""
    cfg = {**QWEN3_8B, "num_hidden_layers": layers, "max_window_layers": layers}
    marker = folder / ".complete"
    key = json.dumps({"layers": layers, "shard_bytes": shard_bytes, "seed": seed})
    if marker.is_file() and marker.read_text() == key:
        print(f"reusing {folder}", file=sys.stderr)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    specs = tensor_specs(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    start = time.perf_counter()
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            nbytes = 2 * _numel(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape in shard:
                _write_tensor(f, name, shape, gen)
        total += offset
        print(f"wrote {fname} ({offset / 1e9:.2f} GB, {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]})
    )
    marker.write_text(key)
    return folder


def measure(name: str, cmd: list[str], env: dict) -> dict:
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, json.dumps(cmd)], stdout=subprocess.PIPE, text=True, env=env, check=True
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["name"] = name
    result["peak_rss_gb"] = result.pop("peak_rss_kb") * 1024 / 1e9
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help=f"where the source, the copy and the converted model go; the source is reused when complete "
        f"[default: {DEFAULT_WORKDIR}]",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=36,
        help="number of decoder layers (36 = real Qwen3-8B, ~16 GB; use 2 for a quick smoke test) [default: 36]",
    )
    parser.add_argument(
        "--shard-gb", type=float, default=4.0, help="maximum shard size of the written source, in GB [default: 4]"
    )
    parser.add_argument(
        "--skip-transformers", action="store_true", help="skip (b), transformers' from_pretrained of the source"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"where to write the JSON results [default: {DEFAULT_OUTPUT}]",
    )
    parser.add_argument("--keep", action="store_true", help="keep the copy and the converted model afterwards")
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    src = write_source(args.workdir / "source", args.layers, int(args.shard_gb * 1e9))
    shards = sorted(str(p) for p in src.glob("*.safetensors"))
    source_bytes = sum(os.path.getsize(p) for p in shards)
    copy_dir, out_dir = args.workdir / "copy", args.workdir / "converted"
    for d in (copy_dir, out_dir):
        if d.exists():
            shutil.rmtree(d)
    copy_dir.mkdir()

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [env.get("PYTHONPATH")])])
    py = sys.executable
    copy_code = (
        "import shutil, sys, os\n"
        "for s in sys.argv[2:]: shutil.copyfile(s, os.path.join(sys.argv[1], os.path.basename(s)))"
    )
    steps = [("copy", [py, "-c", copy_code, str(copy_dir), *shards])]
    if not args.skip_transformers:
        load = (
            "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            "AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)"
        )
        steps.append(("transformers from_pretrained", [py, "-c", load, str(src)]))
        # from_pretrained maps the files lazily; touching every weight is what a load-then-convert path pays
        touch = load.replace("AutoModelForCausalLM.from_pretrained", "m = AutoModelForCausalLM.from_pretrained")
        touch += "\nprint(sum(float(p.float().sum()) for p in m.parameters()))"
        steps.append(("transformers from_pretrained + read all", [py, "-c", touch, str(src)]))
    steps.append(
        ("hybridize convert", [py, "-m", "hybridize", "convert", str(src), str(out_dir), "--dtype", "bfloat16"])
    )

    results = []
    for name, cmd in steps:
        results.append(measure(name, cmd, env))
    copy_wall = results[0]["wall_s"]
    for r in results:
        r["ratio_to_copy"] = r["wall_s"] / copy_wall if copy_wall > 0 else None

    summary = None
    convert = results[-1]
    if convert["returncode"] == 0:
        try:
            summary = json.loads(convert["stdout"])
        except json.JSONDecodeError:
            summary = None
    output_bytes = sum(p.stat().st_size for p in out_dir.glob("*.safetensors")) if out_dir.exists() else 0

    print(f"\nsource: {args.layers} layers, {source_bytes / 1e9:.2f} GB bf16 in {len(shards)} shards")
    print(f"{'step':<30} {'wall s':>9} {'peak RSS GB':>12} {'x copy':>8} {'rc':>4}")
    for r in results:
        ratio = f"{r['ratio_to_copy']:.2f}" if r["ratio_to_copy"] is not None else "-"
        print(f"{r['name']:<30} {r['wall_s']:>9.1f} {r['peak_rss_gb']:>12.2f} {ratio:>8} {r['returncode']:>4}")
    if convert["returncode"] != 0:
        print("hybridize convert failed; see its stderr above", file=sys.stderr)

    mem_total = None
    try:
        mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        pass
    report = {
        "source": {"layers": args.layers, "bytes": source_bytes, "shards": len(shards), "path": str(src)},
        "output_bytes": output_bytes,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "memory_gb": mem_total,
        },
        "page_cache": "as left by the previous step (source just written or reused); not dropped",
        "results": [{k: v for k, v in r.items() if k != "stdout"} for r in results],
        "convert_summary": summary,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {args.output}")
    if not args.keep:
        shutil.rmtree(copy_dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
