"""Distillation: the loss against full-logit float64 references, the trainer, and `hybridize distill/eval/plot`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridize import create_hybrid_from_qwen3
from hybridize.errors import HybridizeError
from hybridize.train.config import DistillConfig
from hybridize.train.evaluate import evaluate
from hybridize.train.models import load_language_model, select_trainable
from hybridize.train.objective import DistillationObjective
from hybridize.train.trainer import DistillationTrainer, lr_at
from hybridize.transfer.config import HybridAttentionConfig

ALL_ATTENTION = HybridAttentionConfig(deltanet_layer_pattern=[], pattern_period=1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(teacher: transformers Qwen3ForCausalLM, exact all-attention copy, fresh 3:1 hybrid), float32."""
    from conftest import build_tiny_source

    folder = build_tiny_source(tmp_path_factory.mktemp("teacher") / "qwen3", family="qwen3")
    teacher = load_language_model(folder, torch.float32)
    copy = create_hybrid_from_qwen3(folder, ALL_ATTENTION, dtype=torch.float32)
    hybrid = create_hybrid_from_qwen3(folder, dtype=torch.float32)
    with torch.no_grad():  # DeltaNet layers start as no-ops; make them matter for gradients and KD
        for layer in hybrid.model.layers:
            if hasattr(layer, "linear_attn"):
                layer.linear_attn.in_proj_z.weight.normal_(0, 0.2)
    return teacher, copy, hybrid


def _reference(teacher, student, ids, mask, temperature):
    """KD and CE per target token from full float64 logits (no chunking, no selection)."""
    with torch.no_grad():
        t = teacher(ids, attention_mask=mask).logits.double()
        s = student(ids, attention_mask=mask).logits.double()
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    target_ok = valid[:, 1:] & valid[:, :-1]
    t, s, y = t[:, :-1][target_ok], s[:, :-1][target_ok], ids[:, 1:][target_ok]
    kd = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="sum") * temperature**2 / y.numel()
    ce = F.cross_entropy(s, y, reduction="mean")
    return kd.item(), ce.item()


def _ids(batch=3, length=24, seed=0):
    return torch.randint(4, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_kd_of_exact_copy_is_zero(pair):
    teacher, copy, _ = pair
    trainer = DistillationTrainer(teacher, copy, DistillConfig(alpha=0.5, temperature=2.0))
    ids = _ids()
    out = trainer.compute_loss(ids, ids)
    assert abs(out["kd_loss"].item()) < 1e-6
    assert out["task_loss"].item() == pytest.approx(teacher(ids, labels=ids).loss.item(), rel=1e-5)


@pytest.mark.parametrize("temperature,alpha,chunk", [(1.0, 1.0, 1024), (2.0, 0.3, 7), (0.5, 0.0, 1)])
def test_loss_matches_float64_reference(pair, temperature, alpha, chunk):
    teacher, _, hybrid = pair
    cfg = DistillConfig(alpha=alpha, temperature=temperature, chunk_tokens=chunk)
    ids = _ids()
    out = DistillationTrainer(teacher, hybrid, cfg).compute_loss(ids, ids)
    kd, ce = _reference(teacher, hybrid, ids, None, temperature)
    assert kd > 1e-3  # the fresh hybrid differs from its teacher
    assert out["kd_loss"].item() == pytest.approx(kd, rel=1e-4)
    assert out["task_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-4)


def test_kd_is_per_token_not_per_batch_and_ignores_padding(pair):
    teacher, _, hybrid = pair
    trainer = DistillationTrainer(teacher, hybrid, DistillConfig(temperature=2.0))
    long, short = _ids(1, 24, seed=1), _ids(1, 10, seed=2)
    sums = [trainer.objective(x, x) for x in (long, short)]
    per_token = sum(s["kd_sum"].item() for s in sums) / sum(s["count"].item() for s in sums)
    for side in ("right", "left"):
        pad = torch.zeros(1, 14, dtype=torch.long)
        padded = torch.cat([short, pad], 1) if side == "right" else torch.cat([pad, short], 1)
        mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 14)], 1) if side == "right" else \
            torch.cat([torch.zeros(1, 14), torch.ones(1, 10)], 1)
        batch = torch.cat([long, padded])
        attention = torch.cat([torch.ones(1, 24), mask]).long()
        labels = batch.masked_fill(attention == 0, -100)
        out = trainer.compute_loss(batch, labels, attention)
        assert out["kd_loss"].item() == pytest.approx(per_token, rel=1e-4), side
        kd_ref, _ = _reference(teacher, hybrid, batch, attention, 2.0)
        assert out["kd_loss"].item() == pytest.approx(kd_ref, rel=1e-4), side


def test_gradients_reach_the_trainable_student_only(pair):
    teacher, _, hybrid = pair
    for which in ("all", "linear"):
        hybrid.zero_grad(set_to_none=True)
        select_trainable(hybrid, which)
        trainer = DistillationTrainer(teacher, hybrid, DistillConfig(alpha=0.5, align_weight=0.1))
        ids = _ids()
        trainer.compute_loss(ids, ids)["loss"].backward()
        for name, p in hybrid.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and p.grad.abs().sum() > 0, (which, name)
            else:
                assert p.grad is None, (which, name)
            if which == "linear":
                assert p.requires_grad == (".linear_attn." in name), name
        assert all(p.grad is None for p in teacher.parameters())
    select_trainable(hybrid, "all")
    hybrid.zero_grad(set_to_none=True)


def test_alignment_loss(pair):
    teacher, copy, hybrid = pair
    ids = _ids()
    exact = DistillationTrainer(teacher, copy, DistillConfig(align_weight=1.0)).compute_loss(ids, ids)
    assert exact["align_loss"].item() < 1e-10
    moved = DistillationTrainer(teacher, hybrid, DistillConfig(align_weight=1.0)).compute_loss(ids, ids)
    with torch.no_grad():  # independent: per-layer MSE over all but the last position, last layer after the norm
        t = teacher(ids, output_hidden_states=True).hidden_states
        s = hybrid.model(ids, output_hidden_states=True)[1]
        s = list(s[1:-1]) + [hybrid.model.norm(s[-1])]
        ref = sum(((a - b)[:, :-1] ** 2).mean() for a, b in zip(s, t[1:], strict=True)) / len(s)
    assert moved["align_loss"].item() == pytest.approx(ref.item(), rel=1e-4)


def test_the_specified_api_takes_a_cross_arch_transfer_config(pair):
    from hybridize import CrossArchTransferConfig
    from hybridize import DistillationTrainer as Exported

    teacher, _, hybrid = pair
    ids = _ids()
    spec = Exported(teacher, hybrid, CrossArchTransferConfig()).compute_loss(ids, ids)  # T 2.0, alpha 0.5
    kd, ce = _reference(teacher, hybrid, ids, None, 2.0)
    assert spec["loss"].item() == pytest.approx(0.5 * kd + 0.5 * ce, rel=1e-4)
    off = Exported(teacher, hybrid, CrossArchTransferConfig(use_distillation=False)).compute_loss(ids, ids)
    assert off["loss"].item() == pytest.approx(ce, rel=1e-5)
    with pytest.raises(TypeError):
        Exported(teacher, hybrid, {"alpha": 0.5})


def test_align_only_trains_on_the_alignment_alone(pair):
    teacher, _, hybrid = pair
    ids = _ids()
    out = DistillationTrainer(teacher, hybrid, DistillConfig(align_only=True)).compute_loss(ids, ids)
    assert out["loss"].item() == out["align_loss"].item() > 0
    assert out["kd_loss"].item() > 1e-3  # still computed, for the log


def test_evaluate_reports_perplexity_kl_and_agreement(pair):
    teacher, copy, hybrid = pair
    windows = _ids(4, 16, seed=3)
    same = evaluate(DistillationObjective(copy, teacher), windows, batch_size=3)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["agreement"] == 1.0
    assert same["perplexity"] == pytest.approx(same["teacher_perplexity"], rel=1e-5)
    assert same["tokens"] == 4 * 15
    fresh = evaluate(DistillationObjective(hybrid, teacher), windows, batch_size=4)
    kd, ce = _reference(teacher, hybrid, windows, None, 1.0)
    assert fresh["kl"] == pytest.approx(kd, rel=1e-4)
    assert fresh["perplexity"] == pytest.approx(torch.tensor(ce).exp().item(), rel=1e-4)


def test_learning_rate_schedule():
    cfg = DistillConfig(lr=1e-3, min_lr=1e-4, warmup=10)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(100, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(55, cfg, 100) == pytest.approx(5.5e-4)


def test_config_refuses_bad_values():
    for bad in ({"alpha": 1.5}, {"temperature": 0}, {"steps": 5, "tokens": 10}, {"train": "mlp"}, {"lr": 0}):
        with pytest.raises(HybridizeError):
            DistillConfig(**bad)


def test_vocabulary_mismatch_is_refused(pair, tmp_path):
    from conftest import build_tiny_source

    teacher, _, hybrid = pair
    other = load_language_model(build_tiny_source(tmp_path / "big", vocab_size=256), torch.float32)
    with pytest.raises(HybridizeError, match="vocabularies differ"):
        DistillationTrainer(other, hybrid)


# ------------------------------------------------------------------------------------------------ CLI runs

def _hybridize(*args, cwd=None, timeout=240):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "hybridize", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _curve(run: Path) -> list[list]:
    """What must repeat exactly when a run is resumed: every step's losses, lr, gradient norm and tokens."""
    keys = ("step", "loss", "kd_loss", "task_loss", "lr", "grad_norm", "tokens")
    return [[m[k] for k in keys] for m in _metrics(run)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A teacher folder, its converted 3:1 student and a small JSONL corpus."""
    import random

    from conftest import build_tiny_source

    root = tmp_path_factory.mktemp("distill")
    build_tiny_source(root / "teacher", family="qwen3")
    assert _hybridize("convert", root / "teacher", root / "student").returncode == 0
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(200):
            words = " ".join(f"w{rng.randint(0, 60)}" for _ in range(rng.randint(5, 80)))
            f.write(json.dumps({"text": words}) + "\n")
    return root


def _distill_args(ws: Path, out: Path, *extra):
    return ["distill", "--teacher", ws / "teacher", "--student", ws / "student", "--data", ws / "train.jsonl",
            "--out", out, "--seq-len", 32, "--batch-size", 4, "--lr", 3e-3, "--warmup", 2, "--no-progress", *extra]


def test_cli_distill_lowers_kd_and_writes_everything(workspace, tmp_path):
    run = tmp_path / "run"
    result = _hybridize(*_distill_args(workspace, run, "--steps", 24, "--save-every", 10, "--keep", 2,
                                       "--eval-data", workspace / "train.jsonl", "--eval-every", 12,
                                       "--eval-tokens", 512))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps"] == 24 and summary["tokens"] == 24 * 4 * 32
    metrics = _metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, 25))
    assert set(metrics[0]) >= {"step", "loss", "kd_loss", "task_loss", "lr", "grad_norm", "tokens", "tok_per_s"}
    first, last = sum(m["kd_loss"] for m in metrics[:4]) / 4, sum(m["kd_loss"] for m in metrics[-4:]) / 4
    assert last < 0.85 * first, (first, last)
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [12, 24] and evals[1]["kl"] < evals[0]["kl"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000020", "step_00000024"]
    final = load_language_model(run / "final", torch.float32)
    assert (run / "final" / "tokenizer.json").is_file()
    assert final.config.layer_types == json.loads((workspace / "student" / "config.json").read_text())["layer_types"]
    report = _hybridize("eval", run / "final", "--data", workspace / "train.jsonl", "--teacher", workspace / "teacher",
                        "--seq-len", 32, "--max-tokens", 512, "--no-progress")
    assert report.returncode == 0, report.stderr
    scores = json.loads(report.stdout)
    assert scores["kl"] == pytest.approx(evals[1]["kl"], rel=1e-3)
    assert 0 < scores["agreement"] <= 1 and scores["perplexity"] > 1
    plot = _hybridize("plot", run)
    assert plot.returncode == 0, plot.stderr
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kill_9_then_resume_reproduces_the_run(workspace, tmp_path):
    args = ("--steps", 40, "--save-every", 5)
    whole = tmp_path / "whole"
    assert _hybridize(*_distill_args(workspace, whole, *args)).returncode == 0
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "hybridize", *map(str, _distill_args(workspace, cut, *args))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not (cut / "checkpoints" / "step_00000010").is_dir():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_metrics(cut))
    assert done < 40, "the run finished before it could be killed"
    resumed = _hybridize(*_distill_args(workspace, cut, *args, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert _curve(cut) == _curve(whole)


@pytest.mark.parametrize("mtp", [(), ("--mtp", "--mtp-depths", 2)])
def test_two_processes_equal_one(workspace, tmp_path, mtp):
    """Also with fresh MTP heads: rank 1 builds them on the meta device and receives rank 0's by broadcast."""
    args = ("--steps", 6, "--save-every", 0, *mtp)
    one, two = tmp_path / "one", tmp_path / "two"
    assert _hybridize(*_distill_args(workspace, one, *args)).returncode == 0
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
           "-m", "hybridize", *map(str, _distill_args(workspace, two, *args))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[:4000]  # the ranks' own lines come before torchrun's summary
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        for key in ("loss", "kd_loss", "task_loss", "grad_norm", *(("mtp_loss",) if mtp else ())):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


def _student(ws: Path):
    from hybridize.model.modeling import HybridForCausalLM

    return HybridForCausalLM.from_pretrained(ws / "student", dtype=torch.float32)


def _fit(ws: Path, run: Path, config: DistillConfig, student=None, resume: bool = False) -> DistillationTrainer:
    """`DistillationTrainer.fit` in this process on the workspace's corpus, with fresh models (training changes
    them in place); a finished run also writes RUN/final."""
    from hybridize.train.data import PackedBatches, load_or_build_tokens
    from hybridize.train.models import load_tokenizer
    from hybridize.train.parallelize import shutdown_distributed

    tokenizer = load_tokenizer(ws / "student")
    tokens = load_or_build_tokens([ws / "train.jsonl"], tokenizer, tokenizer.eos_token_id, None, False)
    teacher = load_language_model(ws / "teacher", torch.float32)
    trainer = DistillationTrainer(teacher, _student(ws) if student is None else student, config)
    batches = PackedBatches(tokens, config.seq_len, config.batch_size, config.grad_accum, seed=config.seed)
    try:
        trainer.fit(batches, run, resume=resume, progress=False)
        if trainer.finished:
            trainer.save_final(run / "final", torch.float32)
    finally:
        shutdown_distributed()
    return trainer


def test_nan_steps_are_skipped_then_the_run_stops(workspace, tmp_path):
    student = _student(workspace)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    config = DistillConfig(seq_len=32, batch_size=4, steps=10, max_bad_steps=3, save_every=0)
    with pytest.raises(HybridizeError, match="3 steps had a non-finite loss"):
        _fit(workspace, tmp_path / "nan", config, student)
    metrics = _metrics(tmp_path / "nan")
    assert len(metrics) == 3 and all(m["skipped"] and m["loss"] is None for m in metrics)


# ------------------------------------------------------------------------------------------------ one process, no FSDP

SHORT_RUN = dict(seq_len=32, batch_size=4, steps=6, lr=3e-3, warmup=2, alpha=0.5, save_every=0)


@pytest.mark.parametrize("grad_accum,dtype", [(1, "float32"), (2, "float32"), (2, "bfloat16")])
def test_unsharded_steps_equal_fsdp_steps(workspace, tmp_path, grad_accum, dtype):
    """`--sharding none` (plain modules) trains the same model as FSDP2 in a world of one: the same losses and
    gradient norms step after step, with gradient accumulation, and in bf16 compute too (the same mixed precision:
    bf16 weights in the step, float32 gradients, master weights and optimizer state)."""
    runs = {}
    for sharding in ("fsdp", "none"):
        config = DistillConfig(**SHORT_RUN, grad_accum=grad_accum, dtype=dtype, sharding=sharding)
        trainer = _fit(workspace, tmp_path / sharding, config)
        assert trainer.parallel.sharding == sharding
        runs[sharding] = _metrics(tmp_path / sharding)
    assert {p.dtype for p in trainer.student.parameters()} == {torch.float32}  # masters
    assert {p.dtype for p in trainer.teacher.parameters()} == {getattr(torch, dtype)}  # stored for compute
    assert {s["grad_norm"] > 0 and "skipped" not in s for s in runs["none"]} == {True}
    for a, b in zip(runs["fsdp"], runs["none"], strict=True):
        for key in ("loss", "kd_loss", "task_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def _whole_and_resumed(workspace, tmp_path, config: DistillConfig, first: str):
    """An uninterrupted run, and the same run stopped at step 3 under sharding `first` and resumed under config's."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _fit(workspace, whole, config)
    assert not _fit(workspace, cut, replace(config, sharding=first, stop_at=3)).finished
    _fit(workspace, cut, config, resume=True)
    return whole, cut


@pytest.mark.parametrize("first", ["none", "fsdp"])
def test_unsharded_stop_and_resume_reproduce_the_run(workspace, tmp_path, first):
    """Stopped at step 3 (under `first`) and resumed without FSDP: the same run, bit for bit, as an uninterrupted
    one without FSDP, and the same final model file. A checkpoint written under FSDP2 resumes without it."""
    whole, cut = _whole_and_resumed(workspace, tmp_path, DistillConfig(**SHORT_RUN, grad_accum=2, sharding="none"),
                                    first)
    assert len(_metrics(cut)) == 6 and _curve(cut) == _curve(whole)
    files = sorted(p.name for p in (whole / "final").iterdir())
    assert files == sorted(p.name for p in (cut / "final").iterdir()) and "model.safetensors" in files
    assert (cut / "final" / "model.safetensors").read_bytes() == (whole / "final" / "model.safetensors").read_bytes()


def test_sharding_none_needs_one_process_and_known_values(pair, workspace, tmp_path):
    from hybridize.heal import HealConfig, HealJob, check_job
    from hybridize.train.parallelize import DistEnv, parallelize
    from hybridize.transfer.config import CrossArchTransferConfig

    teacher, _, hybrid = pair
    fake_world = DistEnv(rank=0, world_size=2, device=torch.device("cpu"), mesh=None)
    with pytest.raises(HybridizeError, match=r"^--sharding none trains in one process, but this run has 2: use "):
        parallelize(DistillationObjective(hybrid, teacher), fake_world, torch.float32, sharding="none")
    job = HealJob(source="S", out=tmp_path / "heal", data=[str(workspace / "train.jsonl")],
                  transfer=CrossArchTransferConfig(), distill=DistillConfig(sharding="none"), heal=HealConfig(gpus=2))
    with pytest.raises(HybridizeError, match="--sharding none trains in one process"):
        check_job(job)
    with pytest.raises(HybridizeError, match="sharding must be one of auto, fsdp, none"):
        DistillConfig(sharding="zero3")
    result = _hybridize(*_distill_args(workspace, tmp_path / "run", "--steps", 2, "--sharding", "zero3"))
    assert result.returncode == 2 and not (tmp_path / "run").exists()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--sharding: invalid choice: 'zero3'" in lines[0], result.stderr


@pytest.mark.parametrize("case", ["missing", "empty", "vocab", "resume", "again"])
def test_cli_user_mistakes_are_one_line(workspace, tmp_path, case):
    from conftest import build_tiny_source

    out = tmp_path / "run"
    args = _distill_args(workspace, out, "--steps", 2)
    if case == "missing":
        args[args.index("--data") + 1] = tmp_path / "nope.jsonl"
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("\n")
        args[args.index("--data") + 1] = tmp_path / "empty.jsonl"
    elif case == "vocab":
        args[args.index("--teacher") + 1] = build_tiny_source(tmp_path / "big", vocab_size=256)
    elif case == "resume":
        args.append("--resume")
    elif case == "again":
        assert _hybridize(*args).returncode == 0
    result = _hybridize(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridize: error: "), result.stderr
    assert "Traceback" not in result.stderr
    expected = {"missing": "does not exist", "empty": "no text", "vocab": "vocabularies differ",
                "resume": "nothing to resume", "again": "already holds a run"}[case]
    assert expected in lines[0]
    if case != "again":
        assert not (out / "metrics.jsonl").exists()


def test_activation_checkpointing_gives_the_same_run_and_train_selects(workspace, tmp_path):
    from hybridize.model.modeling import HybridForCausalLM

    args = ("--steps", 4, "--save-every", 0)
    plain, ckpt, mixers = tmp_path / "plain", tmp_path / "ckpt", tmp_path / "mixers"
    assert _hybridize(*_distill_args(workspace, plain, *args)).returncode == 0
    assert _hybridize(*_distill_args(workspace, ckpt, *args, "--grad-checkpointing")).returncode == 0
    for a, b in zip(_metrics(plain), _metrics(ckpt), strict=True):  # recomputation changes memory, not math
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["step"], key)
    result = _hybridize(*_distill_args(workspace, mixers, *args, "--train", "mixers"))
    assert result.returncode == 0, result.stderr
    student = HybridForCausalLM.from_pretrained(workspace / "student")
    expected = sum(p.numel() for n, p in student.named_parameters() if ".linear_attn." in n or ".self_attn." in n)
    assert json.loads(result.stdout)["trainable_parameters"] == expected
    final = HybridForCausalLM.from_pretrained(mixers / "final")
    for (name, before), after in zip(student.state_dict().items(), final.state_dict().values(), strict=True):
        moved = not torch.equal(before, after)
        assert moved == (".linear_attn." in name or ".self_attn." in name), name


@pytest.mark.parametrize("case", ["missing", "vocab", "plot"])
def test_eval_and_plot_user_mistakes_are_one_line(workspace, tmp_path, case):
    from conftest import build_tiny_source

    if case == "plot":
        result = _hybridize("plot", tmp_path)
        expected = "no metrics.jsonl"
    else:
        teacher = workspace / "teacher" if case == "missing" else build_tiny_source(tmp_path / "big", vocab_size=256)
        data = tmp_path / "nope.jsonl" if case == "missing" else workspace / "train.jsonl"
        result = _hybridize("eval", workspace / "student", "--data", data, "--teacher", teacher, "--seq-len", 16)
        expected = "does not exist" if case == "missing" else "vocabularies differ"
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridize: error: ") and expected in lines[0], result.stderr


def test_grad_checkpointing_flag_engages_per_block_recomputation(workspace):
    from hybridize.model.modeling import HybridForCausalLM
    from hybridize.train.parallelize import init_distributed, parallelize, shutdown_distributed

    student = HybridForCausalLM.from_pretrained(workspace / "student", dtype=torch.float32)
    teacher = load_language_model(workspace / "teacher", torch.float32)
    objective = DistillationObjective(student, teacher)
    try:
        parallelize(objective, init_distributed("cpu"), torch.float32, grad_checkpointing=True)
    finally:
        shutdown_distributed()
    assert all(layer.gradient_checkpointing for layer in student.model.layers)
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in teacher.model.layers)


@pytest.mark.parametrize("temperature,kd_weight,ce_weight,chunk,teacher", [
    (1.0, 1.0, 0.0, 1024, True), (2.0, 0.3, 0.7, 7, True), (0.5, 0.0, 1.0, 1, True), (1.0, 0.0, 1.0, 5, False)])
def test_fused_head_gradients_equal_autograd_on_full_logits(temperature, kd_weight, ce_weight, chunk, teacher):
    """The fused head's closed-form gradients (hidden states and head weight) equal autograd through float64
    full logits, with -100 targets skipped."""
    from hybridize.train.losses import distillation_sums

    gen = torch.Generator().manual_seed(0)
    B, T, D, V = 2, 9, 16, 40
    hs = torch.randn(B, T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(V, D, generator=gen, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(B, T, D, generator=gen, dtype=torch.float64) if teacher else None
    wt = torch.randn(V, D, generator=gen, dtype=torch.float64) if teacher else None
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets[0, 3] = targets[1, -1] = -100
    out = distillation_sums(hs, ws, targets, ht, wt, temperature, chunk, kd_weight=kd_weight, ce_weight=ce_weight)
    out["loss_sum"].backward()
    fused = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None

    keep = targets.reshape(-1) != -100
    s = (hs.reshape(-1, D) @ ws.T)[keep]
    y = targets.reshape(-1)[keep]
    ce = F.cross_entropy(s, y, reduction="sum")
    kd = torch.zeros((), dtype=torch.float64)
    if teacher:
        t = (ht.reshape(-1, D) @ wt.T)[keep]
        kd = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                      reduction="sum") * temperature**2
    (kd_weight * kd + ce_weight * ce).backward()
    assert out["kd_sum"].item() == pytest.approx(kd.item(), rel=1e-10, abs=1e-12)
    assert out["ce_sum"].item() == pytest.approx(ce.item(), rel=1e-10)
    for got, ref in zip(fused, (hs.grad, ws.grad), strict=True):
        assert ref.abs().max() > 1e-3
        assert (got - ref).abs().max().item() < 1e-10


# ------------------------------------------------------------------------------------------------ distill --mtp


@pytest.mark.parametrize("alpha,chunk,padded", [(1.0, 1024, False), (0.3, 7, True)])
def test_mtp_loss_is_the_distillation_loss_plus_the_weighted_depth_mean(pair, alpha, chunk, padded):
    """With MTP heads the loss is KD/CE + mtp_weight · mean over depths of each depth's cross-entropy on the data
    token k+1 ahead: checked in float64 against `mtp_depth_losses` (full logits, no chunking), with right padding
    too. The student gets fresh heads with the asked depth count, and they receive gradients."""
    import copy

    from hybridize.model.mtp import mtp_depth_losses

    teacher, _, hybrid = pair
    teacher, student = copy.deepcopy(teacher).double(), copy.deepcopy(hybrid).double()
    ids = _ids()
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -7:] = 0
        mask[2, -2:] = 0
    plain = DistillationTrainer(teacher, student, DistillConfig(alpha=alpha, chunk_tokens=chunk))
    without = plain.compute_loss(ids, ids, mask)["loss"].item()
    assert student.mtp is None and "mtp_loss" not in plain.compute_loss(ids, ids, mask)
    trainer = DistillationTrainer(teacher, student, DistillConfig(alpha=alpha, chunk_tokens=chunk, mtp_weight=0.7,
                                                                  mtp_depths=3))
    assert student.mtp is not None and student.config.num_predict_tokens == 3
    out = trainer.compute_loss(ids, ids, mask)
    with torch.no_grad():
        hidden = student.model(ids, attention_mask=mask)[0]
        labels = ids.masked_fill(mask == 0, -100)
        depths = mtp_depth_losses(student.mtp, student.lm_head, hidden, student.model.embed_tokens(ids), labels,
                                  mask.bool(), 3)
    assert depths.min() > 1.0  # fresh heads: far from zero, so a missing or misweighted term shows
    assert abs(out["mtp_loss"].item() - depths.mean().item()) < 1e-6  # the reference rounds its logits to float32
    assert abs(out["loss"].item() - (without + 0.7 * depths.mean().item())) < 1e-6
    out["loss"].backward()
    assert student.mtp.fc.weight.grad.abs().sum() > 0 and student.mtp.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_cli_distill_mtp_trains_heads_and_exports_them(workspace, tmp_path):
    """`distill --mtp` adds heads to a student without any, lowers their loss (logged as mtp_loss), and the final
    model carries them: mtp.* tensors, mtp_num_hidden_layers 1, and lossless speculative decoding after loading."""
    from safetensors.torch import load_file

    from hybridize.model.modeling import HybridForCausalLM

    run = tmp_path / "run"
    result = _hybridize(*_distill_args(workspace, run, "--steps", 16, "--save-every", 0, "--mtp", "--mtp-depths", 2))
    assert result.returncode == 0, result.stderr
    metrics = _metrics(run)
    first, last = (sum(m["mtp_loss"] for m in part) / 4 for part in (metrics[:4], metrics[-4:]))
    print(f"distill --mtp: mtp_loss {first:.3f} -> {last:.3f}")
    assert last < first - 0.35, (first, last)  # measured: 4.84 (fresh heads: uniform over 128 tokens) -> 4.30
    for m in metrics:  # the logged loss is its parts
        assert m["loss"] == pytest.approx(m["kd_loss"] + 0.3 * m["mtp_loss"], rel=1e-5)
    tensors = load_file(run / "final" / "model.safetensors")
    assert len([n for n in tensors if n.startswith("mtp.")]) == 15
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["mtp_num_hidden_layers"] == 1 and config["num_predict_tokens"] == 2
    model = HybridForCausalLM.from_pretrained(run / "final").eval()
    assert torch.equal(model.state_dict()["mtp.fc.weight"], tensors["mtp.fc.weight"])
    prompt = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.mtp_decoder.generate(prompt, max_new_tokens=12), expected)


MTP_RUN = dict(SHORT_RUN, mtp_weight=0.5, mtp_depths=2)


def _mtp_curve(run: Path) -> list[list]:
    return [row + [m["mtp_loss"]] for row, m in zip(_curve(run), _metrics(run), strict=True)]


@pytest.mark.parametrize("first", ["none", "fsdp"])
def test_mtp_stop_and_resume_reproduce_the_run(workspace, tmp_path, first):
    """distill --mtp stopped at step 3 (under `first`: FSDP2 keeps the heads in its root unit) and resumed without
    FSDP: every step's losses (mtp_loss included) and the final model, heads included, equal an uninterrupted run;
    and the heads are trained (not the fresh ones again after the resume)."""
    from safetensors.torch import load_file

    whole, cut = _whole_and_resumed(workspace, tmp_path, DistillConfig(**MTP_RUN, grad_accum=2, sharding="none"),
                                    first)
    assert len(_metrics(cut)) == 6 and _mtp_curve(cut) == _mtp_curve(whole)
    assert _mtp_curve(whole)[-1][-1] < _mtp_curve(whole)[0][-1]
    assert (cut / "final" / "model.safetensors").read_bytes() == (whole / "final" / "model.safetensors").read_bytes()
    assert any(n.startswith("mtp.") for n in load_file(whole / "final" / "model.safetensors"))


def test_mtp_fsdp_steps_equal_unsharded_steps(workspace, tmp_path):
    """With MTP heads too, FSDP2 (heads in the root unit) and plain modules train the same model in bf16."""
    runs = {}
    for sharding in ("fsdp", "none"):
        _fit(workspace, tmp_path / sharding, DistillConfig(**MTP_RUN, grad_accum=2, dtype="bfloat16",
                                                           sharding=sharding))
        runs[sharding] = _metrics(tmp_path / sharding)
    for a, b in zip(runs["fsdp"], runs["none"], strict=True):
        for key in ("loss", "kd_loss", "mtp_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


@pytest.mark.parametrize("case", ["negative", "zero", "depths", "switch"])
def test_mtp_user_mistakes_are_one_line(workspace, tmp_path, capsys, case):
    from hybridize.cli import main

    out = tmp_path / "run"
    args = [str(a) for a in _distill_args(workspace, out, "--steps", 1, "--save-every", 0)]
    extra = {"negative": ["--mtp", "--mtp-weight", "-0.5"], "zero": ["--mtp", "--mtp-weight", "0"],
             "depths": ["--mtp-depths", "2"], "switch": ["--mtp", "--resume"]}[case]
    if case == "switch":
        assert main(args) == 0
    capsys.readouterr()
    assert main(args + extra) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    expected = {"negative": "mtp_weight must be >= 0 (0 trains no MTP heads), got -0.5",
                "zero": "--mtp with --mtp-weight 0 trains no heads", "depths": "mtp_depths needs MTP training",
                "switch": "--resume cannot change --mtp off -> on"}[case]
    assert len(lines) == 1 and lines[0].startswith("hybridize: error: ") and expected in lines[0], lines
    assert (out / "metrics.jsonl").exists() == (case == "switch")
    with pytest.raises(HybridizeError, match="mtp_weight must be >= 0"):
        DistillConfig(mtp_weight=-1.0)
