"""Perplexity of SmolLM2-135M-Instruct (teacher) and of hybrids freshly converted from it, on real text.

    python benchmarks/fresh_perplexity.py --corpus VAL.jsonl [--windows 16] [--length 512] [--output results.json]

VAL.jsonl holds one {"text": ...} document a line (e.g. val.jsonl from ../shared/data/build_corpus.sh). The first
`--windows` documents with at least `--length` tokens each give one window of their first `--length` tokens.
Prints a table and writes JSON. CPU, float32.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybridize import CrossArchTransferConfig, HybridAttentionConfig, create_hybrid_from_qwen3
from hybridize.assets import fetch_smollm2_gguf

VARIANTS = {
    "all attention, gate ones": CrossArchTransferConfig(hybrid_attention=HybridAttentionConfig([])),
    "3:1 hybrid, gate ones": CrossArchTransferConfig(),
    "3:1 hybrid, gate zero": CrossArchTransferConfig(gate_init_strategy="zero"),
    "3:1 hybrid, gate small": CrossArchTransferConfig(gate_init_strategy="small"),
}


def windows(tokenizer, corpus: Path, count: int, length: int) -> torch.Tensor:
    out = []
    with open(corpus) as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"], return_tensors="pt").input_ids[0]
            if len(ids) >= length:
                out.append(ids[:length])
            if len(out) == count:
                break
    if not out:
        raise SystemExit(f"no document in {corpus} has {length} tokens")
    return torch.stack(out)


@torch.no_grad()
def perplexity(model, batch: torch.Tensor, micro: int = 4) -> float:
    parts = [batch[i : i + micro] for i in range(0, len(batch), micro)]
    losses = [model(p, labels=p)["loss"].item() for p in parts]
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, required=True, help="JSONL file of {'text': ...} documents")
    parser.add_argument("--windows", type=int, default=16, help="number of evaluation windows [default: 16]")
    parser.add_argument("--length", type=int, default=512, help="tokens per window [default: 512]")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "fresh_perplexity.json",
                        help="where to write the JSON results")
    args = parser.parse_args()
    torch.manual_seed(0)
    gguf = fetch_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    batch = windows(tokenizer, args.corpus, args.windows, args.length)
    teacher = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    results = {"teacher (SmolLM2-135M-Instruct)": perplexity(teacher, batch)}
    for name, config in VARIANTS.items():
        results[name] = perplexity(create_hybrid_from_qwen3(gguf, config, dtype=torch.float32), batch)
    print(f"{len(batch)} windows x {args.length} tokens from {args.corpus}")
    for name, ppl in results.items():
        print(f"{name:36s} {ppl:12.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"windows": len(batch), "length": args.length, "perplexity": results}, indent=2))


if __name__ == "__main__":
    main()
