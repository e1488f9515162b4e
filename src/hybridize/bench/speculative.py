"""Speculative decoding with a model's own MTP heads against its plain decoding, on real text (`hybridize bench
MODEL --speculative --data ...`).

For each --data path and decode batch, the same prompts (windows of the path's token stream at seeded random
offsets) are decoded greedily twice on the same engine:

    plain        `model.generate(do_sample=False, cache_implementation=...)`: one token per backbone step
    speculative  `model.mtp_decoder.generate(num_draft_tokens=K, cache_implementation=...)`: K drafts from the MTP
                 heads, one K+1-token verify step of the backbone, rollback to the accepted position

Both run one untimed call first (CUDA-graph capture, kernel autotuning), and the speculative one an untimed last
call with its phase clock on (`phase_ms_per_verify`: drafting, verify forward, rollback, heads' update, the device
synced between them). tok/s counts the new tokens each row kept
(up to and including its EOS) over the wall time of all batches; `tokens_per_verify` is the decoder's own mean
(accepted drafts + the backbone's token, per verify step and row). Greedy speculative decoding is lossless, so
the two outputs must be equal: `identical_rows` says how many are; in bfloat16 a row can still part where the
K+1-token and the one-token steps round a near-tie differently (`first_divergence`, the earliest new-token index
where any row differs). On a CPU the same runs in float32 on the dynamic cache (what the tests use).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..device import resolve_device
from ..errors import HybridizeError
from ..ops.dispatch import fla_status, note_if_slow_path
from .common import device_name, sync, versions


@dataclass
class SpeculativeBenchConfig:
    """The flags of `hybridize bench MODEL --speculative`, one field each."""

    model: str = ""
    data: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=lambda: [1, 8])
    draft_tokens: int = 3
    prompt_tokens: int = 256
    new_tokens: int = 128
    prompts: int = 16  # per data path and batch size (rounded up to a whole number of batches)
    seed: int = 0

    def __post_init__(self):
        if not self.model:
            raise HybridizeError("--speculative needs a model folder with MTP heads")
        if not self.data:
            raise HybridizeError("--speculative needs --data: text to take the prompts from")
        values = [*self.batches, self.prompt_tokens, self.new_tokens, self.prompts]
        if not self.batches or min(values) < 1 or self.draft_tokens < 1:
            raise HybridizeError("batches, prompt tokens, new tokens, prompts and draft tokens must all be >= 1")


def prompt_windows(tokens: np.ndarray, count: int, length: int, seed: int, where: str) -> torch.Tensor:
    """`count` windows of `length` tokens at seeded random offsets of the stream, (count, length) int64."""
    if len(tokens) < length + 1:
        raise HybridizeError(f"{where} has {len(tokens):,} tokens, fewer than one prompt of {length}; give more "
                             f"text or a smaller --prompt-tokens")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - length, size=count)
    return torch.from_numpy(np.stack([tokens[s: s + length] for s in starts]).astype(np.int64))


def kept_tokens(new: torch.Tensor, eos: set[int]) -> list[list[int]]:
    """Each row's new tokens up to and including its first EOS (what a user keeps)."""
    rows = []
    for row in new.tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def _first_difference(a: list[int], b: list[int]) -> int:
    """The first index where two token lists differ (the shorter one's length when one is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _decode_all(run, prompts: torch.Tensor, batch: int, device: torch.device) -> tuple[float, list[torch.Tensor]]:
    """Seconds to decode every prompt in batches of `batch` (after one untimed batch) and the new tokens."""
    run(prompts[:batch].to(device))
    sync(device)
    outputs, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        outputs.append(run(prompts[i: i + batch].to(device)))
    sync(device)
    return time.perf_counter() - start, outputs


def _phase_profile(model, speculative, prompts: torch.Tensor, stats: list[dict]) -> dict[str, float]:
    """One more (untimed) speculative call with the decoder's phase clock on: milliseconds per verify step (one
    backbone forward for the whole batch) spent drafting, in the verify forward, the rollback and the heads'
    update — where a verify step's time goes."""
    model.mtp_decoder.time_phases = True
    try:
        speculative(prompts)
    finally:
        model.mtp_decoder.time_phases = False
    last = stats.pop()
    steps = max(len(last["accepted"]), 1)  # verify forwards; `verify_steps` counts row-steps
    return {name: round(1000 * sec / steps, 4) for name, sec in last["phase_seconds"].items()}


@torch.no_grad()
def measure_speculative(model, prompts: torch.Tensor, batch: int, cfg: SpeculativeBenchConfig,
                        device: torch.device, cache: str) -> dict:
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    pad = next(iter(eos_ids), 0)
    n = prompts.shape[1]
    stats: list[dict] = []

    def plain(ids: torch.Tensor) -> torch.Tensor:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=cfg.new_tokens, pad_token_id=pad, cache_implementation=cache)
        return out[:, n:].cpu()

    def speculative(ids: torch.Tensor) -> torch.Tensor:
        out = model.mtp_decoder.generate(ids, max_new_tokens=cfg.new_tokens, num_draft_tokens=cfg.draft_tokens,
                                         pad_token_id=pad, cache_implementation=cache)
        stats.append(dict(model.mtp_decoder.stats))
        return out[:, n:].cpu()

    plain_s, plain_out = _decode_all(plain, prompts, batch, device)
    stats.clear()
    spec_s, spec_out = _decode_all(speculative, prompts, batch, device)
    stats = stats[1:]  # the untimed warm-up call's stats
    phases = _phase_profile(model, speculative, prompts[:batch].to(device), stats)
    plain_rows = [r for out in plain_out for r in kept_tokens(out, eos_ids)]
    spec_rows = [r for out in spec_out for r in kept_tokens(out, eos_ids)]
    diverged = [_first_difference(p, s) for p, s in zip(plain_rows, spec_rows, strict=True) if p != s]
    verifies = sum(s["verify_steps"] for s in stats)
    committed = sum(s["tokens_per_verify"] * s["verify_steps"] for s in stats)
    plain_tokens, spec_tokens = sum(map(len, plain_rows)), sum(map(len, spec_rows))
    row = {"batch": batch, "prompts": len(prompts), "plain_tokens_per_s": round(plain_tokens / plain_s, 2),
           "speculative_tokens_per_s": round(spec_tokens / spec_s, 2),
           "tokens_per_verify": round(committed / max(verifies, 1), 4),
           "identical_rows": len(plain_rows) - len(diverged), "rows": len(plain_rows),
           "first_divergence": min(diverged) if diverged else None,
           "verify_cuda_graph": all(s["cuda_graph"] for s in stats),
           "heads_cuda_graph": all(s.get("heads_cuda_graph", False) for s in stats),
           "phase_ms_per_verify": phases,
           "plain_seconds": round(plain_s, 4), "speculative_seconds": round(spec_s, 4)}
    row["speedup"] = round(row["speculative_tokens_per_s"] / row["plain_tokens_per_s"], 4)
    return row


def run_speculative_bench(cfg: SpeculativeBenchConfig, progress: bool = True, save=lambda report: None) -> dict:
    """Every (data path, batch) row; see the module docstring. `save(report)` gets the report so far after every
    row (`complete` False until the end)."""
    from ..train.config import DistillConfig
    from ..train.data import tokenize_corpus
    from ..train.models import load_language_model, load_tokenizer

    device = resolve_device()
    note_if_slow_path(device)
    cache = "static" if device.type == "cuda" else "dynamic"  # the CUDA-graph engine; eager on a CPU
    dtype = DistillConfig().compute_dtype(device.type)
    model = load_language_model(cfg.model, dtype, progress).to(device)
    if getattr(model, "mtp", None) is None:
        raise HybridizeError(f"{cfg.model} has no MTP heads: train them with `hybridize train-mtp` or `hybridize "
                             f"distill --mtp`")
    tokenizer = load_tokenizer(cfg.model)
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos if eos is not None else tokenizer.eos_token_id
    rows: list[dict] = []
    report = {"config": asdict(cfg), "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "cache": cache, "versions": versions(), "kernels": fla_status(),
              "num_predict_tokens": model.config.num_predict_tokens, "complete": False, "rows": rows}
    for path in cfg.data:
        tokens = tokenize_corpus([path], tokenizer, eos, progress=False, vocab_size=model.lm_head.weight.shape[0])
        for batch in cfg.batches:
            count = -(-cfg.prompts // batch) * batch
            prompts = prompt_windows(tokens, count, cfg.prompt_tokens, cfg.seed, path)
            if progress:
                print(f"hybridize bench: {path}: batch {batch}, {count} prompts", file=sys.stderr, flush=True)
            rows.append({"data": path, **measure_speculative(model, prompts, batch, cfg, device, cache)})
            save(report)
    report["complete"] = True
    save(report)
    return report


def format_table(report: dict) -> str:
    cfg = report["config"]
    lines = [f"speculative decoding, {cfg['model']}, {cfg['draft_tokens']} drafts, {report['dtype']}, "
             f"{report['cache']} cache, {report['device']}, kernels: {report['kernels']}",
             f"{'data':<28}{'batch':>6}{'plain tok/s':>13}{'spec tok/s':>12}{'speedup':>9}{'tok/verify':>12}"
             f"{'identical':>11}{'verify':>8}{'heads':>7}"]
    for r in report["rows"]:
        lines.append(f"{r['data'][-28:]:<28}{r['batch']:>6}{r['plain_tokens_per_s']:>13,.1f}"
                     f"{r['speculative_tokens_per_s']:>12,.1f}{r['speedup']:>9.2f}{r['tokens_per_verify']:>12.2f}"
                     f"{r['identical_rows']:>6}/{r['rows']:<4}"
                     f"{'graph' if r.get('verify_cuda_graph') else 'eager':>8}"
                     f"{'graph' if r.get('heads_cuda_graph') else 'eager':>7}")
        phases = r.get("phase_ms_per_verify") or {}
        if phases:
            lines.append("    ms per verify step: " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    return "\n".join(lines)
