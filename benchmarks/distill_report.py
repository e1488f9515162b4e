"""Summarise a distillation benchmark (benchmarks/distill_smollm2.sh): quality before/after, speed, MFU, 1 vs 2 GPUs.

    python benchmarks/distill_report.py --runs RUNS --teacher GGUF_OR_FOLDER [--peak-tflops 989]

Reads RUNS/eval_before.json, eval_after.json, one/metrics.jsonl, two/metrics.jsonl; prints a table and writes
benchmarks/results/distill_smollm2.json.

MFU counts model FLOPs per trained token, without recomputation: 3 × the student's forward (forward + backward)
plus 1 × the teacher's forward. A forward is 2 × (every matmul weight, lm_head included) per token, plus for each
softmax-attention layer 2 × 2 × (T/2) × heads × head_dim (QKᵀ and AV over the causal half), plus for each DeltaNet
layer 6 × key_dim × value_dim per value head (state read, decay-update and output of the recurrent form).
The peak defaults to 989 TFLOP/s, the dense bf16 figure of both H100 SXM and H200.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _linear_weights(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def forward_flops_per_token(model, seq_len: int) -> float:
    """Model FLOPs of one forward pass per token (see the module docstring)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    flops = 2.0 * _linear_weights(model)
    for kind in types:
        if kind == "linear_attention":
            flops += 6.0 * cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
        else:
            flops += 4.0 * (seq_len / 2) * cfg.num_attention_heads * head_dim
    return flops


def _meta_models(runs: Path, teacher: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hybridize.model.modeling import HybridForCausalLM

    student_cfg = AutoConfig.from_pretrained(runs / "student")
    path = Path(teacher)
    teacher_cfg = (AutoConfig.from_pretrained(path.parent, gguf_file=path.name) if path.suffix == ".gguf"
                   else AutoConfig.from_pretrained(teacher))
    with torch.device("meta"):
        return HybridForCausalLM(student_cfg), AutoModelForCausalLM.from_config(teacher_cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "distill_smollm2.json")
    args = parser.parse_args()

    before = json.loads((args.runs / "eval_before.json").read_text())
    after_path = args.runs / "eval_after.json"
    after = json.loads(after_path.read_text()) if after_path.is_file() else None
    one, two = _jsonl(args.runs / "one" / "metrics.jsonl"), _jsonl(args.runs / "two" / "metrics.jsonl")
    evals = _jsonl(args.runs / "one" / "eval.jsonl")
    student, teacher = _meta_models(args.runs, args.teacher)
    per_token = 3 * forward_flops_per_token(student, args.seq_len) + forward_flops_per_token(teacher, args.seq_len)
    steady = [m["tok_per_s"] for m in one[10:]] or [m["tok_per_s"] for m in one]
    tok_s = statistics.median(steady)
    steady2 = [m["tok_per_s"] for m in two[10:]]
    tok_s2 = statistics.median(steady2) if steady2 else None
    pairs = list(zip(one[:50], two[:50], strict=False))
    rel = [abs(b["loss"] - a["loss"]) / abs(a["loss"]) for a, b in pairs if a.get("loss") and b.get("loss")]

    def quality(e):
        return {"perplexity": e["perplexity"], "teacher_perplexity": e["teacher_perplexity"],
                "ppl_ratio": e["perplexity"] / e["teacher_perplexity"], "kl": e["kl"], "agreement": e["agreement"]}

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"
    result = {
        "device": device,
        "before": quality(before),
        "after": quality(after) if after else None,
        "train_tokens": one[-1]["tokens"] if one else 0,
        "steps": one[-1]["step"] if one else 0,
        "eval_during_training": evals,
        "one_gpu": {"tok_per_s_median": tok_s, "model_tflops_per_token": per_token / 1e12,
                    "mfu": tok_s * per_token / (args.peak_tflops * 1e12)},
        "two_gpus": {"steps_compared": len(rel), "tok_per_s_median": tok_s2,
                     "mfu": tok_s2 * per_token / (2 * args.peak_tflops * 1e12) if tok_s2 else None,
                     "max_rel_loss_diff": max(rel) if rel else None,
                     "mean_rel_loss_diff": statistics.mean(rel) if rel else None,
                     "losses": [[a["step"], a["loss"], b["loss"]] for a, b in pairs]},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(f"device: {device}; {result['train_tokens']:,} tokens in {result['steps']} steps")
    print("| | perplexity | teacher | ratio | KL/token | greedy agreement |\n|---|---|---|---|---|---|")
    for name, q in (("before", result["before"]), ("after", result["after"])):
        if q:
            print(f"| {name} | {q['perplexity']:.2f} | {q['teacher_perplexity']:.2f} | {q['ppl_ratio']:.3f} | "
                  f"{q['kl']:.4f} | {q['agreement']:.3f} |")
    print(f"1 GPU: {tok_s:,.0f} tok/s, MFU {result['one_gpu']['mfu']:.1%} "
          f"({per_token / 1e9:.2f} GFLOP/token, peak {args.peak_tflops:.0f} TFLOP/s)")
    if tok_s2:
        print(f"2 GPUs: {tok_s2:,.0f} tok/s, MFU {result['two_gpus']['mfu']:.1%}; first {len(rel)} steps' losses vs "
              f"1 GPU: max rel. diff {max(rel):.2e}, mean {statistics.mean(rel):.2e}")


if __name__ == "__main__":
    main()
