"""Training data for distillation: text inputs -> one packed uint32 token stream -> resumable, rank-sharded batches.

Inputs (files or folders, in the order given) are read in a fixed order so that the same inputs always give the same
token stream: folders are walked in sorted name order, hidden entries skipped. Documents are tokenized without
special tokens and packed back to back, each followed by EOS. `PackedBatches` cuts the stream into fixed windows and
draws whole global batches from a seeded per-epoch permutation, so a run can stop and resume (even on a different
number of ranks) and still see exactly the same sequence of global batches.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import HybridizeError
from ..output import remove_stale_temporaries

PathLike = str | Path

FORMAT_VERSION = 1  # bump when the token stream for the same inputs would change
TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".json")
TOKENIZE_BATCH = 512  # documents per call of the (fast, multi-threaded) tokenizer
READ_BATCH = 1024  # rows per parquet / datasets batch: bounds memory on large tables
SUPPORTED = ".jsonl/.json (one {\"text\": ...} object per line), .parquet, .npy, UTF-8 text, or a datasets folder"


# ----------------------------------------------------------------------------------------------------------- reading


def _optional(module: str):
    """Import an optional dependency of the `data` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise HybridizeError(
            f"reading this data needs the optional package {module.split('.')[0]!r}: pip install 'hybridize[data]'"
        ) from None


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _is_hf_dataset(folder: Path) -> bool:
    """A folder written by `datasets` `save_to_disk` (a Dataset or a DatasetDict)."""
    single = (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()
    return single or (folder / "dataset_dict.json").is_file()


def _check_text(value, where: str) -> str | None:
    """A document's text; None (missing) is skipped, anything but a string is the user's data mistake."""
    if value is None or isinstance(value, str):
        return value
    raise HybridizeError(f"{where}: \"text\" is a {type(value).__name__}, not a string")


def _iter_jsonl(path: Path) -> Iterator[str]:
    """One JSON object per line with a "text" string; blank lines skipped. Streams, so any size fits."""
    try:
        with path.open(encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise HybridizeError(
                        f"{where} is not valid JSON ({e.msg}); {path.suffix} data must be JSON Lines: "
                        "one {\"text\": \"...\"} object per line"
                    ) from None
                if not isinstance(record, dict) or "text" not in record:
                    raise HybridizeError(f"{where} has no \"text\" field; each line must be an object like "
                                         "{\"text\": \"...\"}")
                text = _check_text(record["text"], where)
                if text:
                    yield text
    except UnicodeDecodeError as e:
        raise HybridizeError(f"{path} is not UTF-8 text ({e.reason}); re-encode it as UTF-8") from None


def _iter_parquet(path: Path) -> Iterator[str]:
    """The "text" column, read batch by batch (row group by row group) so memory stays bounded."""
    pq = _optional("pyarrow.parquet")
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
        raise HybridizeError(f"could not read {path} as parquet: {e}") from None
    columns = table.schema_arrow.names
    if "text" not in columns:
        raise HybridizeError(f"{path} has no \"text\" column (columns: {', '.join(columns)}); rename the text column")
    for batch in table.iter_batches(batch_size=READ_BATCH, columns=["text"]):
        for value in batch.column(0).to_pylist():
            text = _check_text(value, f"{path} column \"text\"")
            if text:
                yield text


def _iter_hf_dataset(folder: Path) -> Iterator[str]:
    """The "text" column of a `save_to_disk` folder; a DatasetDict contributes its "train" split."""
    datasets = _optional("datasets")
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # corrupt or incompatible folder
        raise HybridizeError(f"could not load the datasets folder {folder}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise HybridizeError(f"the DatasetDict in {folder} has no \"train\" split (splits: {', '.join(ds)}); "
                                 "save the split to train on with save_to_disk and pass that folder")
        ds = ds["train"]
    if "text" not in ds.column_names:
        raise HybridizeError(f"the dataset in {folder} has no \"text\" column (columns: {', '.join(ds.column_names)})")
    for batch in ds.select_columns(["text"]).iter(batch_size=READ_BATCH):
        for value in batch["text"]:
            text = _check_text(value, f"{folder} column \"text\"")
            if text:
                yield text


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise HybridizeError(
            f"{path} is neither UTF-8 text nor a supported data file ({SUPPORTED}); remove it or pass other paths"
        ) from None


def _iter_file(path: Path) -> Iterator[str | Path]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        yield path  # pre-tokenized: handled by tokenize_corpus
    elif suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    else:
        text = _read_text(path)
        if text:
            yield text


def _children(folder: Path) -> list[Path]:
    """Visible entries sorted by name: the order must not depend on the filesystem's listing order."""
    return sorted((p for p in folder.iterdir() if not _is_hidden(p)), key=lambda p: p.name)


def _iter_path(path: Path) -> Iterator[str | Path]:
    if path.is_dir():
        if _is_hf_dataset(path):
            yield from _iter_hf_dataset(path)
        else:
            for child in _children(path):
                yield from _iter_path(child)
    else:
        yield from _iter_file(path)


def _resolve(paths: Iterable[PathLike]) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise HybridizeError(f"data path {p} does not exist")
        out.append(path)
    return out


def _iter_sources(paths: Iterable[PathLike]) -> Iterator[str | Path]:
    """Documents (str) and pre-tokenized .npy files (Path), in input order."""
    for path in _resolve(paths):
        yield from _iter_path(path)


def _holds_text(path: Path) -> bool:
    if path.is_dir():
        return _is_hf_dataset(path) or any(_holds_text(child) for child in _children(path))
    return path.suffix.lower() != ".npy"


def needs_tokenizer(paths: Iterable[PathLike]) -> bool:
    """Whether any input is text (anything but pre-tokenized .npy arrays, which need no tokenizer at all)."""
    return any(_holds_text(path) for path in _resolve(paths))


def iter_documents(paths: list[PathLike]) -> Iterator[str]:
    """The non-empty text documents of `paths`, in a deterministic order (.npy token files are not documents)."""
    for item in _iter_sources(paths):
        if isinstance(item, str):
            yield item


# ---------------------------------------------------------------------------------------------------------- tokenize


def _load_npy_tokens(path: Path, vocab: int, whose: str = "tokenizer's") -> np.ndarray:
    """A pre-tokenized 1-D integer array, checked against the vocabulary (the model's when known)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise HybridizeError(f"could not read {path} as a numpy token array: {e}") from None
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise HybridizeError(f"{path} holds a {array.ndim}-D {array.dtype} array; .npy data must be a 1-D integer "
                             "array of token ids")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= vocab):
        raise HybridizeError(f"{path} holds token ids in [{int(array.min())}, {int(array.max())}], outside the "
                             f"{whose} vocabulary [0, {vocab}); was it tokenized with another tokenizer?")
    return np.asarray(array, dtype=np.uint32)


def _encode(tokenizer, docs: list[str], eos_token_id: int) -> np.ndarray:
    """Token ids of `docs`, each followed by EOS; a document that yields no tokens contributes nothing."""
    encoded = tokenizer(docs, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    flat: list[int] = []
    for ids in encoded:
        if ids:
            flat.extend(ids)
            flat.append(eos_token_id)
    return np.asarray(flat, dtype=np.uint32)


def tokenize_corpus(paths: list[PathLike], tokenizer, eos_token_id: int | None, progress: bool = True,
                    vocab_size: int | None = None, max_tokens: int | None = None) -> np.ndarray:
    """The 1-D uint32 token stream of `paths`: documents packed back to back, each followed by EOS; .npy as is.

    `vocab_size` (the model's) bounds every token id; None uses the tokenizer's size. `tokenizer` may be None when
    every input is a pre-tokenized .npy array. `max_tokens`: stop reading once the stream holds that many (the
    stream is cut to it), so a probe of the first N tokens does not tokenize a whole corpus.
    """
    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    whose = "model's" if vocab_size is not None else "tokenizer's"
    assert vocab <= 2**32, "token ids must fit uint32"
    if tokenizer is not None and not (isinstance(eos_token_id, int) and 0 <= eos_token_id < vocab):
        raise HybridizeError(f"the EOS token id {eos_token_id} is outside the vocabulary [0, {vocab})")
    chunks: list[np.ndarray] = []
    batch: list[str] = []
    total = 0
    with tqdm(desc="tokenize", unit=" docs", disable=not progress) as bar:

        def add(chunk: np.ndarray, docs: int) -> None:
            nonlocal total
            chunks.append(chunk)
            total += len(chunk)
            bar.update(docs)
            bar.set_postfix(tokens=f"{total:,}", refresh=False)

        for item in _iter_sources(paths):
            if max_tokens is not None and total >= max_tokens:
                break
            if isinstance(item, str):
                if tokenizer is None:
                    raise HybridizeError(f"the data includes text (e.g. {item[:40]!r}) but no tokenizer was given; "
                                         f"pass only pre-tokenized .npy arrays, or a model folder with a tokenizer")
                batch.append(item)
                if len(batch) >= (TOKENIZE_BATCH if max_tokens is None else 32):  # a probe reads little
                    add(_encode(tokenizer, batch, eos_token_id), len(batch))
                    batch = []
            else:  # flush first: the stream keeps input order
                if batch:
                    add(_encode(tokenizer, batch, eos_token_id), len(batch))
                    batch = []
                add(_load_npy_tokens(item, vocab, whose), 0)
        if batch:
            add(_encode(tokenizer, batch, eos_token_id), len(batch))
    if total == 0:
        names = ", ".join(str(p) for p in paths)
        raise HybridizeError(f"no text found in {names}: expected {SUPPORTED} with non-empty documents")
    stream = np.concatenate(chunks)[:max_tokens]
    if int(stream.max()) >= vocab:  # a tokenizer larger than the model's embedding table
        raise HybridizeError(f"the tokenizer produces token id {int(stream.max())}, outside the {whose} vocabulary "
                             f"[0, {vocab}); use the tokenizer of the model being trained")
    return stream


# ------------------------------------------------------------------------------------------------------------- cache


def _files_under(path: Path) -> list[Path]:
    """Every visible file that can feed the stream, in the reading order."""
    if not path.is_dir():
        return [path]
    return [f for child in _children(path) for f in _files_under(child)]


def _tokenizer_digest(tokenizer) -> str | None:
    """Hash of a fast tokenizer's full definition: a tokenizer edited in place must not reuse a stale cache."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def _fingerprint(paths: list[PathLike], tokenizer, eos_token_id: int | None, vocab_size: int | None = None) -> dict:
    """What the cached stream depends on: input files (size, mtime), tokenizer and EOS, and this code's format."""
    inputs = []
    for path in _resolve(paths):
        path = path.resolve()
        files = [[str(f.relative_to(path)) if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                 for f in _files_under(path)]
        inputs.append({"path": str(path), "files": files})
    return {
        "format_version": FORMAT_VERSION,
        "inputs": inputs,
        "tokenizer": None if tokenizer is None else str(getattr(tokenizer, "name_or_path", "")),
        "tokenizer_sha256": None if tokenizer is None else _tokenizer_digest(tokenizer),
        "vocab_size": vocab_size if vocab_size is not None else len(tokenizer),
        "eos_token_id": None if eos_token_id is None else int(eos_token_id),
    }


def _replace_atomically(target: Path, write) -> None:
    """Write through `write(file)` into a temporary sibling, then rename it over `target` (never half-written)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_cached(cache_dir: Path, fingerprint: dict) -> np.ndarray | None:
    try:
        if json.loads((cache_dir / "tokens.json").read_text()) != fingerprint:
            return None
        return np.load(cache_dir / "tokens.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):  # absent, unreadable or corrupt: rebuild
        return None


def load_or_build_tokens(paths: list[PathLike], tokenizer, eos_token_id: int | None, cache_dir: Path | None,
                         progress: bool = True, vocab_size: int | None = None) -> np.ndarray:
    """`tokenize_corpus`, cached in `cache_dir` (tokens.npy + tokens.json) and reused while nothing changed."""
    if cache_dir is None:
        return tokenize_corpus(paths, tokenizer, eos_token_id, progress, vocab_size)
    cache_dir = Path(cache_dir).expanduser()
    remove_stale_temporaries(cache_dir, files=True)  # `.tokens.npy.tmp-PID` of a killed run
    fingerprint = _fingerprint(paths, tokenizer, eos_token_id, vocab_size)
    cached = _load_cached(cache_dir, fingerprint)
    if cached is not None:
        return cached
    tokens = tokenize_corpus(paths, tokenizer, eos_token_id, progress, vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "tokens.json").unlink(missing_ok=True)  # first invalidate: a crash must not pair old json, new npy
    _replace_atomically(cache_dir / "tokens.npy", lambda f: np.save(f, tokens, allow_pickle=False))
    _replace_atomically(cache_dir / "tokens.json", lambda f: f.write(json.dumps(fingerprint, indent=1).encode()))
    return tokens


# ----------------------------------------------------------------------------------------------------------- batches


def _windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """The stream as (n, seq_len) non-overlapping windows, a view (works on memory-mapped streams)."""
    if tokens.ndim != 1:
        raise ValueError(f"the token stream must be 1-D, got shape {tokens.shape}")
    if seq_len < 1:
        raise HybridizeError(f"the sequence length must be >= 1, got {seq_len}")
    n = len(tokens) // seq_len
    return tokens[: n * seq_len].reshape(n, seq_len)


class PackedBatches:
    """Deterministic, resumable, rank-sharded training batches of fixed windows of a packed token stream.

    Each step draws the next `global_batch` window indices of epoch e's permutation (`default_rng([seed, e])`); an
    epoch's remainder smaller than a step is dropped. Micro-step a of rank r gets slice
    `[a*B/A + r*micro, a*B/A + (r+1)*micro)` of those B indices, so the global batch depends only on
    (data, seq_len, global_batch, seed): the world size and gradient accumulation may change across a resume.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        for name, value in (("global batch", global_batch), ("grad accum", grad_accum), ("world size", world_size)):
            if value < 1:
                raise HybridizeError(f"the {name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        if seed < 0:
            raise HybridizeError(f"the data seed must be >= 0, got {seed}")
        if global_batch % (grad_accum * world_size):
            raise HybridizeError(
                f"the global batch ({global_batch}) must be divisible by grad accum ({grad_accum}) x world size "
                f"({world_size}) = {grad_accum * world_size}; change one of them"
            )
        self._windows = _windows(tokens, seq_len)
        if len(self._windows) < global_batch:
            raise HybridizeError(
                f"the data has {len(tokens):,} tokens but one step needs seq_len x global batch = {seq_len} x "
                f"{global_batch} = {seq_len * global_batch:,}; give more data or a smaller batch / sequence length"
            )
        self.seq_len, self.global_batch, self.grad_accum = seq_len, global_batch, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.micro_batch = global_batch // (grad_accum * world_size)  # sequences per rank per micro-step
        self._epoch, self._position = 0, 0
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, permutation), only the current one

    @property
    def num_windows(self) -> int:
        return len(self._windows)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def epoch(self) -> int:
        """The epoch the next step is drawn from (starts at 0)."""
        return self._epoch

    def _permutation(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self._epoch:
            self._perm = (self._epoch, np.random.default_rng([self.seed, self._epoch]).permutation(self.num_windows))
        return self._perm[1]

    def _roll_over(self) -> None:
        """Move to the next epoch when what is left of this one cannot fill a step."""
        if self._position + self.global_batch > self.num_windows:
            self._epoch, self._position = self._epoch + 1, 0

    def next_step(self) -> list[torch.Tensor]:
        """This rank's `grad_accum` micro-batches, each (micro_batch, seq_len) long, of the next global step."""
        self._roll_over()
        step = self._permutation()[self._position : self._position + self.global_batch]
        self._position += self.global_batch
        self._roll_over()
        per_micro_step = self.global_batch // self.grad_accum
        out = []
        for a in range(self.grad_accum):
            start = a * per_micro_step + self.rank * self.micro_batch
            rows = self._windows[step[start : start + self.micro_batch]]
            out.append(torch.from_numpy(rows.astype(np.int64)))
        return out

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "position": self._position, "num_windows": self.num_windows,
                "seq_len": self.seq_len, "global_batch": self.global_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` stopped; refuses a state from other data or another batch layout."""
        mine = self.state_dict()
        missing = [k for k in mine if k not in state]
        if missing:
            raise HybridizeError(f"the checkpoint's data state lacks {', '.join(missing)}; it is not from this trainer")
        changed = [f"{k} {state[k]} -> {mine[k]}" for k in ("num_windows", "seq_len", "global_batch", "seed")
                   if int(state[k]) != mine[k]]
        if changed:
            raise HybridizeError(f"the data changed since the checkpoint: {', '.join(changed)}; resume with the same "
                                 "data, sequence length, global batch and seed")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_windows:
            raise HybridizeError(f"the checkpoint's data state is invalid (epoch {epoch}, position {position})")
        self._epoch, self._position = epoch, position
        self._roll_over()


def first_windows(source: PathLike, paths: list[PathLike], tokens: int, seq_len: int) -> torch.Tensor:
    """The first `tokens` tokens of `paths` (documents EOS-separated in order, .npy token arrays as they are) as
    (N, seq_len) windows, with `source`'s tokenizer; only as many documents are tokenized as that takes. What
    select-layers, analyze-layers and train-etd probe the model on."""
    from .models import load_tokenizer

    tokenizer = load_tokenizer(source)
    stream = tokenize_corpus(paths, tokenizer, tokenizer.eos_token_id, progress=False, max_tokens=tokens)
    return eval_windows(stream, seq_len, tokens)


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """The first windows of the stream in order (k, seq_len) long: a fixed evaluation set; max_tokens falsy = all."""
    if max_tokens is not None and max_tokens < 0:
        raise HybridizeError(f"the evaluation token budget must be >= 0, got {max_tokens}")
    windows = _windows(tokens, seq_len)
    k = min(len(windows), math.ceil(max_tokens / seq_len)) if max_tokens else len(windows)
    if k == 0:
        raise HybridizeError(f"the evaluation data has {len(tokens):,} tokens, fewer than one sequence of {seq_len}; "
                             "give more data or a shorter sequence length")
    return torch.from_numpy(windows[:k].astype(np.int64))
