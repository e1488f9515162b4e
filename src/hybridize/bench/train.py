"""Training throughput: one distillation step of the hybrid against the source architecture trained the same way.

Each variant builds its student with random weights (the real shapes; speed does not depend on the values), a
bf16 teacher of the source architecture, and runs `DistillationTrainer.train_step` — the code `hybridize distill`
runs: FSDP2 over all processes or plain modules in one (`sharding`, as `distill --sharding`), fp32 master weights
(or `master_dtype`), AdamW, the fused KD head — on random tokens; the report records which layout ran. The
baseline variant is the same step with transformers' own model of the source as the student.

Reported per variant: tokens/s (global), step time (median of `steps` after `warmup`), MFU and peak GPU memory
per GPU. MFU counts model FLOPs (no activation recompute): 6 × the student's matmul parameters + 2 × the
teacher's per token, plus attention (softmax: 2·H·d·T per token and layer forward, causal) and the DeltaNet core
(≈ 4·dk·dv + 2·C·(dk + dv) per token, head and layer forward, C = 64), ×3 for the student's backward. The peak is
the H200's dense bf16 rate from its datasheet (989 TFLOP/s) unless `peak_tflops` says otherwise.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..model.config import LINEAR
from ..ops.dispatch import fla_status
from ..train.config import DistillConfig
from ..train.parallelize import DistEnv, init_distributed, resolve_sharding
from ..train.trainer import DistillationTrainer
from .common import build, device_name, profile_table, versions

H200_BF16_TFLOPS = 989.0
DELTANET_CHUNK = 64


@dataclass
class TrainBenchConfig:
    """What `hybridize bench --train` measures; fields map 1:1 onto its flags."""

    shape: str = "qwen3-8b"
    seq_len: int = 4096
    batch_size: int = 1
    grad_accum: int = 1
    steps: int = 5
    warmup: int = 2
    checkpointing: str = "both"  # on | off | both
    against: str = "source"  # source | none
    teacher: bool = True
    master_dtype: str = "float32"
    sharding: str = "fsdp"  # auto | fsdp | none, as DistillConfig.sharding
    peak_tflops: float = H200_BF16_TFLOPS
    profile: bool = False
    seed: int = 0


def _linear_params(model: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))


def forward_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Model FLOPs of one forward pass per token: matmuls, attention scores/values, the DeltaNet core."""
    cfg = model.config
    flops = 2.0 * _linear_params(model)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for kind in layer_types:
        if kind == LINEAR:
            dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
            flops += cfg.linear_num_value_heads * (4 * dk * dv + 2 * DELTANET_CHUNK * (dk + dv))
        else:
            flops += 2.0 * cfg.num_attention_heads * head_dim * seq_len
    return flops


def _free_memory(env: DistEnv) -> None:
    gc.collect()
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)


def _say(env: DistEnv, message: str) -> None:
    """Progress on stderr (rank 0): builds and first steps can take minutes (kernel autotuning)."""
    if env.is_main:
        print(f"bench: {message}", file=sys.stderr, flush=True)


def _sync(env: DistEnv) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def run_variant(cfg: TrainBenchConfig, env: DistEnv, student_kind: str, checkpointing: bool) -> dict:
    """Time `cfg.steps` distillation steps with `student_kind` ("hybrid" or "source") as the student."""
    _free_memory(env)
    _say(env, f"building {student_kind} student and teacher ({cfg.shape})")
    torch.manual_seed(cfg.seed)
    compute = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    student = build("hybrid" if student_kind == "hybrid" else "source", cfg.shape, getattr(torch, cfg.master_dtype),
                     env.device)
    teacher = build("source", cfg.shape, compute, env.device) if cfg.teacher else None
    fwd_student = forward_flops_per_token(student, cfg.seq_len)
    fwd_teacher = forward_flops_per_token(teacher, cfg.seq_len) if teacher is not None else 0.0
    dcfg = DistillConfig(seq_len=cfg.seq_len, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                         grad_checkpointing=checkpointing, alpha=1.0 if cfg.teacher else 0.0, steps=1_000_000,
                         sharding=cfg.sharding)
    trainer = DistillationTrainer(teacher, student, dcfg)
    trainer.setup(total_steps=1_000_000)
    per_rank = cfg.batch_size // (cfg.grad_accum * env.world_size)
    gen = torch.Generator().manual_seed(cfg.seed + env.rank)
    vocab = student.config.vocab_size
    micro = [torch.randint(0, vocab, (per_rank, cfg.seq_len), generator=gen) for _ in range(cfg.grad_accum)]
    times, record = [], {}
    for i in range(cfg.warmup + cfg.steps):
        _sync(env)
        start = time.perf_counter()
        record = trainer.train_step(micro)
        _sync(env)
        elapsed = time.perf_counter() - start
        _say(env, f"{student_kind} ckpt={checkpointing}: {'warmup' if i < cfg.warmup else 'timed'} step {i + 1}: "
                  f"{elapsed:.3f} s")
        if i >= cfg.warmup:
            times.append(elapsed)
    profile = None
    if cfg.profile and env.device.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            trainer.train_step(micro)
            _sync(env)
        profile = profile_table(prof)
    step = statistics.median(times)
    tokens = cfg.batch_size * cfg.seq_len
    flops = tokens * (3 * fwd_student + fwd_teacher)
    peak = torch.cuda.max_memory_allocated(env.device) / 1e9 if env.device.type == "cuda" else None
    result = {
        "student": student_kind, "checkpointing": checkpointing, "sharding": trainer.parallel.sharding,
        "tokens_per_s": round(tokens / step, 1),
        "step_s": round(step, 4), "step_s_spread": round(max(times) - min(times), 4),
        "mfu": round(flops / step / env.world_size / (cfg.peak_tflops * 1e12), 4),
        "model_tflop_per_step": round(flops / 1e12, 2), "peak_gb_per_gpu": None if peak is None else round(peak, 2),
        "loss": record.get("loss"),
    }
    if profile is not None:
        result["profile"] = profile
    del trainer, student, teacher
    _free_memory(env)
    return result


def run_train_bench(cfg: TrainBenchConfig) -> dict:
    """All variants of `cfg` in one process (group); rank 0's view, with ratios hybrid / source."""
    env = init_distributed()
    if cfg.batch_size % (cfg.grad_accum * env.world_size):
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of grad_accum × GPUs "
                         f"({cfg.grad_accum} × {env.world_size})")
    sharding = resolve_sharding(cfg.sharding, env.world_size)  # refused before any model is built
    flags = {"both": [False, True], "on": [True], "off": [False]}[cfg.checkpointing]
    students = ["hybrid"] + (["source"] if cfg.against == "source" else [])
    results = [run_variant(cfg, env, s, ac) for ac in flags for s in students]
    for r in results:
        if r["student"] == "hybrid":
            base = next((b for b in results if b["student"] == "source" and b["checkpointing"] == r["checkpointing"]),
                        None)
            if base is not None:
                r["speed_vs_source"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
    compute = "bfloat16" if env.device.type == "cuda" else "float32"
    return {"config": asdict(cfg), "world_size": env.world_size, "device": device_name(env.device, env.world_size),
            "sharding": sharding, "compute_dtype": compute, "versions": versions(), "kernels": fla_status(),
            "results": results}


def format_table(report: dict) -> str:
    cfg = report["config"]
    lines = [f"training step, shape {cfg['shape']}, {cfg['batch_size']} × {cfg['seq_len']} tokens, "
             f"teacher {report['compute_dtype'] if cfg['teacher'] else 'none'}, master {cfg['master_dtype']}, "
             f"sharding {report['sharding']}, {report['device']}, "
             f"kernels: {report['kernels']}",
             f"{'student':<8} {'ckpt':<5} {'tok/s':>10} {'step s':>8} {'MFU':>6} {'peak GB/GPU':>12} {'× source':>9}"]
    for r in report["results"]:
        ratio = f"{r['speed_vs_source']:.2f}" if "speed_vs_source" in r else ""
        peak = "-" if r["peak_gb_per_gpu"] is None else f"{r['peak_gb_per_gpu']:.1f}"
        lines.append(f"{r['student']:<8} {'on' if r['checkpointing'] else 'off':<5} {r['tokens_per_s']:>10,.0f} "
                     f"{r['step_s']:>8.3f} {r['mfu']:>6.1%} {peak:>12} {ratio:>9}")
    for r in report["results"]:
        if "profile" in r:
            p = r["profile"]
            kinds = ", ".join(f"{k} {v:.0f}" for k, v in p["by_kind_ms"].items())
            lines.append(f"profile {r['student']} ckpt={r['checkpointing']}: GPU busy {p['gpu_ms']:.0f} ms of "
                         f"{r['step_s'] * 1e3:.0f} ms, {p['kernels']} kernels: {kinds}")
    return "\n".join(lines)
