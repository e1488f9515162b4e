"""Peak memory and time of the KD + CE loss (forward + backward): chunked (ours) vs full logits, at Qwen3's vocab.

    python benchmarks/kd_loss_memory.py [--tokens 4096] [--hidden 256] [--vocab 151936] [--chunk 1024]

Each variant runs in its own process (peak RSS = that process's ru_maxrss, minus its RSS before the loss). "full
logits" is the textbook version: both models' [tokens, vocab] logits, float32 log-softmaxes, one KL over all of
them. Inputs are random; both variants are checked to give the same loss and gradient. Writes
benchmarks/results/kd_loss_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _inputs(tokens: int, hidden: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    hs = torch.randn(1, tokens, hidden, generator=g, requires_grad=True)
    ht = torch.randn(1, tokens, hidden, generator=g)
    ws = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).requires_grad_()
    wt = torch.randn(vocab, hidden, generator=g) * hidden**-0.5
    labels = torch.randint(0, vocab, (1, tokens), generator=g)
    return hs, ht, ws, wt, labels


def run_variant(variant: str, tokens: int, hidden: int, vocab: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F

    from hybridize.train.losses import distillation_sums, next_token_targets

    hs, ht, ws, wt, labels = _inputs(tokens, hidden, vocab)
    targets = next_token_targets(labels)
    base = _rss_gb()
    start = time.perf_counter()
    if variant == "chunked":
        out = distillation_sums(hs, ws, targets, ht, wt, temperature=2.0, chunk_tokens=chunk, kd_weight=1.0,
                                ce_weight=1.0)
        loss = out["loss_sum"] / out["count"]
    else:
        s = (hs[0, :-1] @ ws.T).float()
        with torch.no_grad():
            t_logp = F.log_softmax((ht[0, :-1] @ wt.T).float() / 2.0, -1)
        kd = F.kl_div(F.log_softmax(s / 2.0, -1), t_logp, log_target=True, reduction="sum") * 4.0
        loss = (kd + F.cross_entropy(s, labels[0, 1:], reduction="sum")) / (tokens - 1)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"variant": variant, "loss": loss.item(), "grad_norm": ws.grad.norm().item() + hs.grad.norm().item(),
            "seconds": round(seconds, 2), "peak_extra_gb": round(_rss_gb() - base, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--variant", choices=["chunked", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "kd_loss_memory.json")
    args = parser.parse_args()
    if args.variant:  # child process
        print(json.dumps(run_variant(args.variant, args.tokens, args.hidden, args.vocab, args.chunk)))
        return
    rows = []
    for variant in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(args.tokens), "--hidden",
               str(args.hidden), "--vocab", str(args.vocab), "--chunk", str(args.chunk)]
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    full, chunked = rows
    logits_gb = args.tokens * args.vocab * 4 / 1e9
    print(f"KD+CE forward+backward, {args.tokens} tokens × vocab {args.vocab:,} (one float32 logits copy = "
          f"{logits_gb:.2f} GB), hidden {args.hidden}, chunk {args.chunk}, CPU")
    print("| variant | peak extra memory GB | seconds | loss |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['peak_extra_gb']:.2f} | {r['seconds']:.1f} | {r['loss']:.6f} |")
    print(f"chunked / full memory: {chunked['peak_extra_gb'] / full['peak_extra_gb']:.3f}; "
          f"loss rel. diff {abs(chunked['loss'] - full['loss']) / full['loss']:.1e}, "
          f"gradient-norm rel. diff {abs(chunked['grad_norm'] - full['grad_norm']) / full['grad_norm']:.1e}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"config": vars(args) | {"output": str(args.output)}, "rows": rows,
                                       "logits_gb": logits_gb}, indent=1))


if __name__ == "__main__":
    main()
