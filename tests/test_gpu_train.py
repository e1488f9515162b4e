"""Distillation on CUDA (fla kernels, bf16 FSDP2, NCCL): skipped without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hybridize.train.config import DistillConfig
from hybridize.train.models import load_language_model
from hybridize.train.trainer import DistillationTrainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    import random

    from conftest import build_tiny_source

    root = tmp_path_factory.mktemp("gpu_distill")
    build_tiny_source(root / "teacher", family="qwen3", hidden_size=128, num_attention_heads=4, head_dim=32,
                      num_hidden_layers=4)
    result = subprocess.run([sys.executable, "-m", "hybridize", "convert", root / "teacher", root / "student"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rng = random.Random(0)
    with open(root / "train.jsonl", "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(f"w{rng.randint(0, 60)}" for _ in range(rng.randint(20, 200)))}))
            f.write("\n")
    return root


def _run(cmd, env_extra=None, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, env=env, **kw)


def _args(ws, out, *extra):
    return ["distill", "--teacher", ws / "teacher", "--student", ws / "student", "--data", ws / "train.jsonl",
            "--out", out, "--seq-len", 256, "--batch-size", 8, "--lr", 2e-3, "--warmup", 2, "--save-every", 0,
            "--no-progress", *(extra or ("--steps", 12))]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_on_cuda_matches_cpu(workspace):
    """The chunked KD/CE on CUDA (fla DeltaNet, float32) equals the CPU reference path."""
    from hybridize.model.modeling import HybridForCausalLM

    teacher = load_language_model(workspace / "teacher", torch.float32)
    student = HybridForCausalLM.from_pretrained(workspace / "student", dtype=torch.float32)
    with torch.no_grad():
        for layer in student.model.layers:
            if hasattr(layer, "linear_attn"):
                layer.linear_attn.in_proj_z.weight.normal_(0, 0.2)
    ids = torch.randint(4, 128, (2, 256), generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(alpha=0.5, temperature=2.0, chunk_tokens=100)
    cpu = DistillationTrainer(teacher, student, cfg).compute_loss(ids, ids)
    gpu = DistillationTrainer(teacher.cuda(), student.cuda(), cfg).compute_loss(ids.cuda(), ids.cuda())
    for key in ("kd_loss", "task_loss", "loss"):
        assert gpu[key].item() == pytest.approx(cpu[key].item(), rel=2e-3), key


def test_cli_distill_bf16_lowers_kd_and_n_gpus_match(workspace, tmp_path):
    one = tmp_path / "one"
    result = _run([sys.executable, "-m", "hybridize", *_args(workspace, one)])
    assert result.returncode == 0, result.stderr[-3000:]
    m1 = _metrics(one)
    assert m1[-1]["kd_loss"] < 0.8 * m1[0]["kd_loss"]
    if torch.cuda.device_count() < 2:
        pytest.skip("one GPU: the N-GPU comparison needs two")
    two = tmp_path / "two"
    result = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hybridize",
                   *_args(workspace, two)])
    assert result.returncode == 0, result.stderr[-3000:]
    m2 = _metrics(two)
    for a, b in zip(m1, m2, strict=True):  # bf16 compute: equal up to reduction order and rounding
        assert b["loss"] == pytest.approx(a["loss"], rel=3e-2), a["step"]


def test_two_gpus_equal_one_in_float32(workspace, tmp_path):
    """NCCL + FSDP2 in float32: 2 GPUs × 1 micro-step = 1 GPU × 2 micro-steps (the torch DeltaNet path, which is
    deterministic; fla's backward kernels are not, so bf16 fla runs drift apart like reruns of one GPU do)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    env = {"HYBRIDIZE_DISABLE_FLA": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--dtype", "float32", "--steps", 20)
    result = _run([sys.executable, "-m", "hybridize", *_args(workspace, one, *extra, "--grad-accum", 2)], env_extra=env)
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hybridize",
                   *_args(workspace, two, *extra)], env_extra=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]


def test_train_mtp_and_train_etd_run_on_the_gpu(workspace, tmp_path):
    """train-mtp and train-etd put the model on CUDA by default (they once trained on the GPU machine's CPU): the
    summary names the device, and the heads' losses fall."""
    out = _run([sys.executable, "-m", "hybridize", "train-mtp", workspace / "student", "--data",
                workspace / "train.jsonl", "--out", tmp_path / "mtp", "--steps", "30", "--seq-len", "64",
                "--no-progress"])
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["device"].startswith("cuda")
    assert all(b < a for a, b in zip(summary["first_losses"], summary["last_losses"], strict=True))
    etd = _run([sys.executable, "-m", "hybridize", "train-etd", workspace / "student", tmp_path / "etd", "--data",
                workspace / "train.jsonl", "--part", "experts", "--steps", "4", "--no-progress"])
    assert etd.returncode == 0, etd.stderr
    assert json.loads(etd.stdout)["steps"] == 4
