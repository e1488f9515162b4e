"""Streaming safetensors I/O: read one tensor with plain file reads, write shards tensor by tensor.

The `safetensors` library (checked: 0.4–0.8) reads through mmap, whose touched pages stay in the process's RSS
while the file is open, and `save_file` serialises a whole shard in memory before writing it. Converting an 8B
model inside a few GB of RAM needs neither, so this module implements the (simple, documented) file format
directly: 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, raw bytes.
Files written here are read back by `safetensors` in the tests.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: str | Path) -> dict[str, TensorEntry]:
    """Parse a safetensors header; ValueError (a predicate: "is truncated …") when the file is not one or is short."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("is truncated or not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100_000_000):
            raise ValueError("is truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, absurd nesting or numbers
            raise ValueError("is corrupt: its safetensors header is not valid JSON") from e
    if not isinstance(header, dict):
        raise ValueError("is corrupt: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("is corrupt: its __metadata__ is not an object of strings")
    entries, data_len = {}, size - 8 - n
    for name, info in header.items():
        dtype, shape, (b, e) = _check_entry(name, info)
        if e - b != _nbytes(shape, dtype):
            raise ValueError(f"is corrupt: tensor {name!r} has {e - b} bytes for shape {list(shape)}")
        if e > data_len:
            raise ValueError(f"is truncated: {size} bytes, tensor {name!r} needs {8 + n + e}")
        entries[name] = TensorEntry(path, dtype, shape, 8 + n + b, 8 + n + e)
    # As the format requires (and the safetensors library checks): the tensors tile the data exactly, with no gap,
    # overlap or trailing bytes, so no two names read the same bytes and every byte belongs to one tensor.
    end = 8 + n
    for entry in sorted(entries.values(), key=lambda t: (t.start, t.end)):
        if entry.start != end:
            raise ValueError("is corrupt: its tensors' data_offsets overlap or leave gaps")
        end = entry.end
    if end != size:
        raise ValueError(f"is corrupt or truncated: its tensors cover {end} of its {size} bytes")
    return entries


def _is_count(value) -> bool:
    """A JSON integer >= 0 (not a bool, a float or a string that looks like one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(name: str, info) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, data_offsets) of one header entry, or ValueError: a crafted header must not steer the reads
    (negative or string offsets could point into the header, negative shapes could fake a byte count)."""
    bad = f"is corrupt: bad header entry for tensor {name!r}"
    if not isinstance(info, dict):
        raise ValueError(f"{bad} (not an object)")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"{bad} (dtype {dtype!r} is not one of {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise ValueError(f"{bad} (shape {shape!r} is not a list of integers >= 0)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise ValueError(f"{bad} (data_offsets {offsets!r} are not two increasing integers >= 0)")
    return DTYPES[dtype], tuple(shape), (offsets[0], offsets[1])


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into fresh memory (no mmap kept alive)."""
    buf = bytearray(entry.end - entry.start)
    with open(entry.path, "rb") as f:
        f.seek(entry.start)
        if f.readinto(buf) != len(buf):
            raise ValueError(f"{entry.path.name} ended early while reading a tensor")
    if not buf:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(entry.dtype).reshape(entry.shape)


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Write a known set of tensors as HF-style sharded safetensors, in any order, one tensor at a time.

    The shard layout is fixed up front from (name, shape, dtype) specs, so each shard's header is written first
    and every tensor goes straight to its offset: memory holds only the tensor being written.
    """

    def __init__(self, folder: str | Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 2 * 1024**3):
        self.folder = Path(folder)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for spec in specs:
            n = _nbytes(spec[1], spec[2])
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += n
        count = len(shards)
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in specs)
        self.locations: dict[str, tuple[Path, int, tuple[int, ...], torch.dtype]] = {}
        self.weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            self._create_shard(self.folder / fname, shard)
        self.pending = set(self.locations)

    def _create_shard(self, path: Path, shard) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
        for name, shape, dtype in shard:
            begin = header[name]["data_offsets"][0]
            self.locations[name] = (path, 8 + len(raw) + begin, tuple(shape), dtype)
            self.weight_map[name] = path.name

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.locations:
            raise KeyError(f"{name} is not part of this checkpoint's layout")
        path, offset, shape, dtype = self.locations[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, layout says {shape} {dtype}")
        data = tensor.detach().cpu().contiguous().view(torch.uint8).numpy()
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(memoryview(data))
        self.pending.discard(name)

    def finish(self) -> None:
        """Check every tensor was written and write the index (for more than one shard)."""
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} tensors never written, e.g. {sorted(self.pending)[:3]}")
        if len(set(self.weight_map.values())) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
