"""The distillation data pipeline: reading every input format, tokenizing into one packed stream, the token cache,
and deterministic, resumable, rank-sharded batches. CPU only, offline (a word-level tokenizer built on the spot).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _write_tokenizer

from hybridize.errors import HybridizeError
from hybridize.train import data
from hybridize.train.data import (
    PackedBatches,
    eval_windows,
    iter_documents,
    load_or_build_tokens,
    tokenize_corpus,
)

EOS = 2  # "</s>" in conftest's word-level tokenizer: <pad> <s> </s> <unk> w0 w1 ...


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real fast tokenizer (word level, 128 tokens): "w5" -> 9."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    _write_tokenizer(folder, 128)
    return AutoTokenizer.from_pretrained(folder)


def ids(text: str) -> list[int]:
    """What the test tokenizer gives for "w3 w7 ..."."""
    return [4 + int(word[1:]) for word in text.split()]


def stream_of(*docs: str) -> list[int]:
    return [t for doc in docs for t in ids(doc) + [EOS]]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    return write(path, "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")


# ----------------------------------------------------------------------------------------------------------- formats


def test_text_folder_sorted_recursive_and_skips_hidden(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    for name, text in [("sub/c.rst", "w3"), ("b.txt", "w2"), ("notes", "w4 w5"), ("a.md", "w1"),
                       (".hidden.txt", "w9"), (".git/x.txt", "w9"), ("empty.txt", "")]:
        write(root / name, text)
    expected = ["w1", "w2", "w4 w5", "w3"]  # a.md, b.txt, notes, sub/ (sub/c.rst); empty and hidden skipped
    assert list(iter_documents([root])) == expected

    listing = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: reversed(list(listing(self))))
    assert list(iter_documents([str(root)])) == expected  # filesystem listing order does not matter


def test_inputs_keep_their_given_order(tmp_path):
    a, b = write(tmp_path / "a.txt", "w1"), write(tmp_path / "b.txt", "w2")
    assert list(iter_documents([b, a])) == ["w2", "w1"]


def test_jsonl_and_json_lines(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2", "id": 1}, "", "   ", {"text": "w3"}])
    g = write_jsonl(tmp_path / "e.json", [{"text": "w4"}])
    assert list(iter_documents([f, g])) == ["w1 w2", "w3", "w4"]


@pytest.mark.parametrize(
    "bad, message",
    [({"content": "w1"}, 'line 3 has no "text" field'), ("{not json", "line 3 is not valid JSON"),
     ({"text": 5}, 'line 3: "text" is a int')],
)
def test_jsonl_errors_name_file_and_line(tmp_path, bad, message):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "w1"}, "", bad])
    with pytest.raises(HybridizeError, match=message) as info:
        list(iter_documents([f]))
    assert str(f) in str(info.value)


def test_parquet_in_row_group_batches(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"w{i} w{i + 1}" for i in range(10)]
    pq.write_table(pa.table({"text": texts, "n": list(range(10))}), tmp_path / "d.parquet", row_group_size=3)
    monkeypatch.setattr(data, "READ_BATCH", 2)
    assert list(iter_documents([tmp_path / "d.parquet"])) == texts

    pq.write_table(pa.table({"body": texts}), tmp_path / "bad.parquet")
    with pytest.raises(HybridizeError, match=r'no "text" column \(columns: body\)'):
        list(iter_documents([tmp_path / "bad.parquet"]))


def test_datasets_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": ["w1", "w2 w3"], "n": [1, 2]}).save_to_disk(tmp_path / "single")
    DatasetDict({"train": Dataset.from_dict({"text": ["w4"]}), "test": Dataset.from_dict({"text": ["w9"]})}
                ).save_to_disk(tmp_path / "dict")
    # a datasets folder is read as a dataset, not walked as files, also when nested in a data folder
    assert list(iter_documents([tmp_path])) == ["w4", "w1", "w2 w3"]  # dict/ then single/

    DatasetDict({"validation": Dataset.from_dict({"text": ["w1"]})}).save_to_disk(tmp_path / "nosplit")
    with pytest.raises(HybridizeError, match='no "train" split .splits: validation'):
        list(iter_documents([tmp_path / "nosplit"]))


def test_missing_path_and_binary_file(tmp_path):
    with pytest.raises(HybridizeError, match=f"data path {tmp_path / 'nope'} does not exist"):
        list(iter_documents([tmp_path / "nope"]))
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(HybridizeError, match="neither UTF-8 text nor a supported data file"):
        list(iter_documents([tmp_path]))


def test_missing_optional_package_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(HybridizeError, match=r"pip install 'hybridize\[data\]'"):
        list(iter_documents([tmp_path / "d.parquet"]))


# ---------------------------------------------------------------------------------------------------------- tokenize


def test_stream_is_documents_separated_by_eos(tmp_path, tokenizer, monkeypatch):
    docs = [f"w{i} w{i + 2} w{(i * 7) % 50}" for i in range(11)]
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    monkeypatch.setattr(data, "TOKENIZE_BATCH", 4)  # several tokenizer calls, one stream
    tokens = tokenize_corpus([f], tokenizer, EOS, progress=False)
    assert tokens.dtype == np.uint32 and tokens.ndim == 1
    assert tokens.tolist() == stream_of(*docs)


def test_max_tokens_reads_only_a_prefix(tmp_path, tokenizer, monkeypatch):
    """`max_tokens` gives the full stream's prefix and stops reading early (a probe of the first N tokens of a big
    corpus), for text and for .npy; `first_windows` cuts it into windows the same way for both."""
    docs = [f"w{i} w{i + 1} w{i + 3}" for i in range(400)]
    text = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    full = tokenize_corpus([text], tokenizer, EOS, progress=False)
    read = []
    real = data._encode
    monkeypatch.setattr(data, "_encode", lambda tok, batch, eos: read.append(len(batch)) or real(tok, batch, eos))
    head = tokenize_corpus([text], tokenizer, EOS, progress=False, max_tokens=50)
    assert head.tolist() == full[:50].tolist() and sum(read) < len(docs) // 4
    np.save(tmp_path / "t.npy", full.astype(np.int64))
    assert tokenize_corpus([tmp_path / "t.npy"], tokenizer, EOS, progress=False, max_tokens=50).tolist() == \
        full[:50].tolist()
    tok_dir = tmp_path / "model"
    tokenizer.save_pretrained(tok_dir)
    from_text = data.first_windows(tok_dir, [text], 64, 16)
    from_npy = data.first_windows(tok_dir, [tmp_path / "t.npy"], 64, 16)
    assert from_text.shape == (4, 16) and torch.equal(from_text, from_npy)
    assert from_text.flatten().tolist() == full[:64].tolist()


def test_npy_appended_as_is_in_input_order(tmp_path, tokenizer):
    write(tmp_path / "in" / "a.txt", "w1 w2")
    np.save(tmp_path / "in" / "b.npy", np.array([7, 8, 9], dtype=np.int64))
    write(tmp_path / "in" / "c.txt", "w3")
    tokens = tokenize_corpus([tmp_path / "in"], tokenizer, EOS, progress=True)
    assert tokens.tolist() == stream_of("w1 w2") + [7, 8, 9] + stream_of("w3")
    assert list(iter_documents([tmp_path / "in"])) == ["w1 w2", "w3"]  # .npy is not a document


@pytest.mark.parametrize(
    "array, message",
    [(np.zeros((2, 3), np.int32), "2-D int32"), (np.ones(3, np.float32), "1-D float32"),
     (np.array([1, 128]), r"\[1, 128\], outside the tokenizer's vocabulary \[0, 128\)"),
     (np.array([-1, 3]), "outside"), (np.array(["a"], dtype=object), "could not read")],
)
def test_bad_npy(tmp_path, tokenizer, array, message):
    np.save(tmp_path / "t.npy", array, allow_pickle=True)
    with pytest.raises(HybridizeError, match=message):
        tokenize_corpus([tmp_path / "t.npy"], tokenizer, EOS, progress=False)


def test_no_text_is_an_error(tmp_path, tokenizer):
    write(tmp_path / "empty" / "a.txt", "")
    write_jsonl(tmp_path / "empty" / "b.jsonl", ["", {"text": ""}])
    (tmp_path / "none").mkdir()
    for folder in ("empty", "none"):
        with pytest.raises(HybridizeError, match=f"no text found in {tmp_path / folder}"):
            tokenize_corpus([tmp_path / folder], tokenizer, EOS, progress=False)


# ------------------------------------------------------------------------------------------------------------- cache


def test_cache_reused_until_inputs_or_tokenizer_change(tmp_path, tokenizer, monkeypatch):
    calls = []
    real = data.tokenize_corpus
    monkeypatch.setattr(data, "tokenize_corpus", lambda *a, **k: calls.append(1) or real(*a, **k))
    f = write(tmp_path / "in" / "a.txt", "w1 w2")
    cache = tmp_path / "cache"

    def load(eos=EOS):
        return load_or_build_tokens([tmp_path / "in"], tokenizer, eos, cache, progress=False)

    assert load().tolist() == stream_of("w1 w2") and len(calls) == 1
    again = load()
    assert len(calls) == 1 and isinstance(again, np.memmap) and again.tolist() == stream_of("w1 w2")
    assert json.loads((cache / "tokens.json").read_text())["eos_token_id"] == EOS
    assert sorted(p.name for p in cache.iterdir()) == ["tokens.json", "tokens.npy"]  # no temporary files left

    write(f, "w3")  # content changes (size too)
    assert load().tolist() == stream_of("w3") and len(calls) == 2
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # same size, newer mtime
    load()
    assert len(calls) == 3
    write(tmp_path / "in" / "b.txt", "w4")  # a new file in the folder
    assert load().tolist() == stream_of("w3", "w4") and len(calls) == 4
    assert load(eos=3).tolist() == [7, 3, 8, 3] and len(calls) == 5  # another EOS
    load(eos=3)
    assert len(calls) == 5


def test_no_cache_dir_builds_every_time(tmp_path, tokenizer):
    write(tmp_path / "a.txt", "w1")
    assert load_or_build_tokens([tmp_path / "a.txt"], tokenizer, EOS, None, progress=False).tolist() == [5, EOS]


# ----------------------------------------------------------------------------------------------------------- batches


def stream(n_windows: int, seq_len: int) -> np.ndarray:
    """Window i holds i*seq_len ... : a row tells which window it is."""
    return np.arange(n_windows * seq_len + 3, dtype=np.uint32)  # a partial window at the end is dropped


def window_ids(batch: torch.Tensor, seq_len: int) -> list[int]:
    return (batch[:, 0] // seq_len).tolist()


def steps(loader: PackedBatches, count: int) -> list[list[torch.Tensor]]:
    return [loader.next_step() for _ in range(count)]


def test_batches_shapes_and_windows():
    loader = PackedBatches(stream(40, 8), seq_len=8, global_batch=8, grad_accum=2)
    assert (loader.num_windows, loader.tokens_per_step, loader.micro_batch) == (40, 64, 4)
    micro = loader.next_step()
    assert len(micro) == 2 and all(m.shape == (4, 8) and m.dtype == torch.long for m in micro)
    for m in micro:  # every row is one whole window of the stream
        assert torch.equal(m, m[:, :1] + torch.arange(8)) and (m[:, 0] % 8 == 0).all()


def test_same_seed_same_batches_other_seed_other_batches():
    tokens = stream(50, 4)
    a, b = steps(PackedBatches(tokens, 4, 5, seed=1), 4), steps(PackedBatches(tokens, 4, 5, seed=1), 4)
    c = steps(PackedBatches(tokens, 4, 5, seed=2), 4)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_world_size_does_not_change_the_global_batch(grad_accum):
    tokens, L, B = stream(100, 4), 4, 12
    single = steps(PackedBatches(tokens, L, B, grad_accum=grad_accum, seed=3), 5)
    ranks = [steps(PackedBatches(tokens, L, B, grad_accum, rank=r, world_size=2, seed=3), 5) for r in range(2)]
    for s in range(5):
        assert all(m.shape == (B // (grad_accum * 2), L) for r in range(2) for m in ranks[r][s])
        joined = torch.cat([ranks[r][s][a] for a in range(grad_accum) for r in range(2)])  # a-major, r-minor
        assert torch.equal(joined, torch.cat(single[s]))


def test_epoch_rollover_drops_the_remainder():
    L = 4
    loader = PackedBatches(stream(10, L), L, global_batch=4, seed=5)  # 2 steps per epoch, 2 windows dropped
    epoch0 = [window_ids(loader.next_step()[0], L) for _ in range(2)]
    assert loader.epoch == 1 and loader.state_dict()["position"] == 0
    assert epoch0 == np.random.default_rng([5, 0]).permutation(10)[:8].reshape(2, 4).tolist()
    assert window_ids(loader.next_step()[0], L) == np.random.default_rng([5, 1]).permutation(10)[:4].tolist()


def test_resume_from_state_dict_continues_identically():
    tokens = stream(30, 4)
    uninterrupted = PackedBatches(tokens, 4, 4, grad_accum=2, seed=7)
    steps(uninterrupted, 3)
    state = uninterrupted.state_dict()
    assert state == {"epoch": 0, "position": 12, "num_windows": 30, "seq_len": 4, "global_batch": 4, "seed": 7}
    assert all(type(v) is int for v in state.values())
    resumed = PackedBatches(tokens, 4, 4, grad_accum=2, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for x, y in zip(steps(uninterrupted, 6), steps(resumed, 6), strict=True):  # crosses into epoch 1
        assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True))
    assert resumed.epoch == uninterrupted.epoch == 1


def test_state_from_other_data_is_refused():
    state = PackedBatches(stream(30, 4), 4, 4, seed=7).state_dict()
    changed = "the data changed since the checkpoint: num_windows 30 -> 29, seed 7 -> 0"
    with pytest.raises(HybridizeError, match=changed):
        PackedBatches(stream(29, 4), 4, 4).load_state_dict(state)
    with pytest.raises(HybridizeError, match="lacks seed"):
        PackedBatches(stream(30, 4), 4, 4).load_state_dict({k: v for k, v in state.items() if k != "seed"})


def test_batch_configuration_errors():
    divisible = r"global batch \(6\) must be divisible by grad accum \(2\) x world size \(2\)"
    with pytest.raises(HybridizeError, match=divisible):
        PackedBatches(stream(30, 4), 4, 6, grad_accum=2, world_size=2)
    with pytest.raises(HybridizeError, match="has 35 tokens but one step needs seq_len x global batch = 4 x 9 = 36"):
        PackedBatches(np.arange(35), 4, 9)


def test_eval_windows_are_the_first_windows_in_order():
    tokens = stream(10, 4)
    assert torch.equal(eval_windows(tokens, 4, None), torch.arange(40).reshape(10, 4))
    assert eval_windows(tokens, 4, 9).shape == (3, 4)  # ceil(9 / 4)
    assert eval_windows(tokens, 4, 10_000).shape == (10, 4)
    with pytest.raises(HybridizeError, match="has 3 tokens, fewer than one sequence of 4"):
        eval_windows(np.arange(3), 4, None)
