"""`hybridize sample`: text sampled from the teacher as a JSONL corpus — the model's own samples, reproducible per
seed, continued exactly after a stop, refused in one line when misused."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from hybridize.cli import main

ARGS = ("--tokens", "150", "--batch-size", "3", "--max-new-tokens", "12", "--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from conftest import build_tiny_source

    return build_tiny_source(tmp_path_factory.mktemp("sample") / "teacher", family="qwen3")


def sample(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["sample", *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_the_token_budget_reproducibly(teacher, tmp_path):
    code, out, err = sample(teacher, tmp_path / "a.jsonl", *ARGS)
    assert code == 0, err
    docs = records(tmp_path / "a.jsonl")
    total = sum(d["new_tokens"] for d in docs)
    assert 150 <= total < 150 + 3 * 12 and json.loads(out)["new_tokens"] == total
    lines = [line for line in err.splitlines() if line.startswith("sample: batch ")]  # --no-progress: one a batch
    assert len(lines) == len(docs) // 3 and f"{total:,} / 150 new tokens" in lines[-1]
    assert json.loads(out)["new_tokens_this_run"] == total and json.loads(out)["tokens_per_second"] > 0
    assert len(docs) % 3 == 0 and len({d["id"] for d in docs}) == len(docs)
    assert all(d["source"] == "samples" and d["text"] for d in docs)
    assert not list(tmp_path.glob("*.partial*"))
    assert sample(teacher, tmp_path / "b.jsonl", *ARGS)[0] == 0
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert sample(teacher, tmp_path / "c.jsonl", *ARGS, "--seed", 1)[0] == 0
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()


def test_rows_are_the_models_own_samples(teacher, tmp_path):
    """Batch 0 equals transformers' generate on the loaded teacher, from its EOS token, with the batch's seed and
    the same sampling settings: the command adds nothing of its own to the distribution."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert sample(teacher, tmp_path / "s.jsonl", *ARGS, "--temperature", 0.7, "--top-p", 0.9)[0] == 0
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(teacher)
    torch.manual_seed(0)
    ids = torch.full((3, 1), tok.eos_token_id)
    new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_p=0.9,
                         top_k=0, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)[:, 1:].tolist()
    want = [tok.decode(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row,
                       skip_special_tokens=True) for row in new]
    assert [d["text"] for d in records(tmp_path / "s.jsonl")[:3]] == want


def test_a_stopped_run_continues_to_the_same_file(teacher, tmp_path, monkeypatch):
    """Stopped in its third batch (Ctrl-C), then a torn line appended as a crash would leave it: the same command
    continues from the two finished batches and writes the uninterrupted run's file."""
    import hybridize.train.samples as samples

    assert sample(teacher, tmp_path / "whole.jsonl", *ARGS)[0] == 0
    calls, draw = [], samples._draw

    def stop_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return draw(*args)

    monkeypatch.setattr(samples, "_draw", stop_third)
    out = tmp_path / "cut.jsonl"
    code, _, err = sample(teacher, out, *ARGS)
    assert code == 130 and "interrupted" in err and not out.exists()
    partial = tmp_path / "cut.jsonl.partial"
    assert [d["id"][:2] for d in records(partial)] == ["b0"] * 3 + ["b1"] * 3
    with open(partial, "a") as f:
        f.write('{"text": "torn')
    monkeypatch.setattr(samples, "_draw", draw)
    code, summary, err = sample(teacher, out, *ARGS)
    assert code == 0, err
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert json.loads(summary)["documents_this_run"] == len(records(out)) - 6
    assert not list(tmp_path.glob("cut.jsonl.partial*"))


def test_prompts_open_the_samples(teacher, tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": f"w{i} w{i + 1} w{i + 2} w{i + 3}"}) + "\n"
                                              for i in (10, 20)))
    code, _, err = sample(teacher, tmp_path / "s.jsonl", *ARGS, "--prompts", tmp_path / "p.jsonl",
                          "--prompt-tokens", 3)
    assert code == 0, err
    texts = [d["text"] for d in records(tmp_path / "s.jsonl")]
    starts = [t.replace(" ", "")[:9] for t in texts[:4]]  # the tokenizer's own spacing aside
    assert starts == ["w10w11w12", "w20w21w22", "w10w11w12", "w20w21w22"], texts[:4]


def test_temperature_zero_is_greedy_decoding_of_the_prompts(teacher, tmp_path):
    """Greedy continuations of the prompt openings (what speculative decoding verifies): model.generate's greedy
    tokens for each opening alone, whatever the seed — openings of different lengths share a batch (left-padded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("w5 w6 w7 w8 w9", "w30")))
    files = []
    for seed in (0, 1):
        files.append(tmp_path / f"g{seed}.jsonl")
        assert sample(teacher, files[-1], *ARGS, "--temperature", 0, "--prompts", tmp_path / "p.jsonl",
                      "--prompt-tokens", 2, "--seed", seed)[0] == 0
    assert files[0].read_text() == files[1].read_text()
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(teacher)
    for row, text in enumerate(("w5 w6 w7", "w30")):
        ids = torch.tensor([[tok.eos_token_id, *tok(text, add_special_tokens=False)["input_ids"][:2]]])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        want = tok.decode(ids[0, 1:].tolist() + new, skip_special_tokens=True)
        assert records(files[0])[row]["text"] == want, row


def test_a_hybrid_samples_on_its_static_cache(teacher, tmp_path):
    """A hybridize model generates on its StaticHybridCache (the fixed-buffer step; CUDA graphs on a GPU): its
    greedy text equals generate's on the dynamic cache."""
    from transformers import AutoTokenizer

    from hybridize.model.modeling import HybridForCausalLM
    from hybridize.model.static_cache import StaticHybridCache
    from hybridize.transfer.convert import convert_to_folder

    convert_to_folder(str(teacher), tmp_path / "hybrid", progress=False)
    (tmp_path / "p.txt").write_text("w5 w6 w7 w8 w9")
    made, init = [], StaticHybridCache.__init__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StaticHybridCache, "__init__", lambda self, *a, **k: made.append(1) or init(self, *a, **k))
        assert sample(tmp_path / "hybrid", tmp_path / "g.jsonl", *ARGS, "--temperature", 0, "--prompts",
                      tmp_path / "p.txt", "--prompt-tokens", 2)[0] == 0
    assert made
    model = HybridForCausalLM.from_pretrained(tmp_path / "hybrid", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hybrid")
    ids = torch.tensor([[tok.eos_token_id, *tok("w5 w6", add_special_tokens=False)["input_ids"][:2]]])
    new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, 3:].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert records(tmp_path / "g.jsonl")[0]["text"] == tok.decode(ids[0, 1:].tolist() + new, skip_special_tokens=True)


def test_distill_reads_the_samples(teacher, tmp_path):
    from hybridize.train.data import iter_documents

    assert sample(teacher, tmp_path / "s.jsonl", *ARGS)[0] == 0
    assert list(iter_documents([tmp_path / "s.jsonl"])) == [d["text"] for d in records(tmp_path / "s.jsonl")]


@pytest.mark.parametrize("case", ["exists", "no-model", "no-prompts", "temperature", "greedy-without-prompts",
                                  "other-settings"])
def test_misuse_is_one_line(teacher, tmp_path, case, monkeypatch):
    out = tmp_path / "s.jsonl"
    args, needle = [teacher, out, *ARGS], ""
    if case == "exists":
        out.write_text("")
        needle = "already exists"
    elif case == "no-model":
        args[0], needle = tmp_path / "missing", "missing"
    elif case == "no-prompts":
        args += ["--prompts", tmp_path / "nope.txt"]
        needle = "does not exist"
    elif case == "temperature":
        args += ["--temperature", "-1"]
        needle = "must be >= 0"
    elif case == "greedy-without-prompts":
        args += ["--temperature", "0"]
        needle = "same document every time"
    else:  # a partial file of another seed is not continued with this one
        (tmp_path / "s.jsonl.partial").write_text("")
        (tmp_path / "s.jsonl.partial.json").write_text(json.dumps({"seed": 5}))
        needle = "other settings"
    code, _, err = sample(*args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
