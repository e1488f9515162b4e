"""Convert the real SmolLM2-135M-Instruct (GGUF from PyPI) into a hybrid and compare it with its teacher.

    .venv/bin/python examples/smollm2_demo.py [--output smollm2-hybrid] [--pattern 0,1,2] [--period 4]
                                              [--no-calibrate]

Prints the layer stats, the perplexity of the teacher and of the fresh (not yet distilled) hybrid on a short real
text, and a greedy continuation from each. A fresh hybrid keeps the teacher's attention layers exactly, but its
DeltaNet layers start as no-ops (see hybridize/transfer/init.py), so its perplexity is far above the teacher's
until it is distilled; with `--pattern ''` (all attention) it equals the teacher. Unless --no-calibrate, it also
converts a calibrated hybrid (`convert --calibrate`, about a minute on a CPU) on text the package ships (Thoreau's
Walden, the long-context filler), a different register from the Python text it is scored on.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hybridize
from hybridize.assets import fetch_smollm2_gguf
from hybridize.evals.longctx import BUILTIN_FILLER
from hybridize.transfer.convert import convert_to_folder

TEXT = (
    "Python is an easy to learn, powerful programming language. It has efficient high-level data structures and a "
    "simple but effective approach to object-oriented programming. Python's elegant syntax and dynamic typing, "
    "together with its interpreted nature, make it an ideal language for scripting and rapid application "
    "development in many areas on most platforms. The Python interpreter and the extensive standard library are "
    "freely available in source or binary form for all major platforms from the Python web site, and may be freely "
    "distributed. The same site also contains distributions of and pointers to many free third party Python "
    "modules, programs and tools, and additional documentation."
)
PROMPT = "The Python interpreter is"


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    return math.exp(model(ids, labels=ids)["loss"].item())


@torch.no_grad()
def continuation(model, tokenizer, prompt: str, tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="smollm2-hybrid", help="where the converted model is written")
    parser.add_argument("--pattern", default="0,1,2", help="DeltaNet positions within each period ('' = none)")
    parser.add_argument("--period", type=int, default=4, help="pattern period (3:1 hybrid by default)")
    parser.add_argument("--no-calibrate", action="store_true", help="skip the calibrated conversion")
    args = parser.parse_args()
    torch.manual_seed(0)

    gguf = fetch_smollm2_gguf()
    print(f"source: {gguf}")
    pattern = [int(x) for x in args.pattern.split(",") if x.strip()]
    config = hybridize.CrossArchTransferConfig(
        hybrid_attention=hybridize.HybridAttentionConfig(deltanet_layer_pattern=pattern, pattern_period=args.period)
    )
    summary = convert_to_folder(str(gguf), args.output, config, dtype="float32", force=True)
    print(f"converted in {summary['seconds']} s, peak RSS {summary['peak_rss_gb']} GB -> {summary['output']}")

    tokenizer = AutoTokenizer.from_pretrained(args.output)
    teacher = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hybrid = AutoModelForCausalLM.from_pretrained(args.output, dtype=torch.float32).eval()
    print("layer stats:", json.dumps(hybrid.get_layer_stats()))

    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    models = {"teacher": teacher, "hybrid": hybrid}
    if not args.no_calibrate:
        models["calibrated"] = calibrated_hybrid(gguf, config, args.output + "-calibrated")
    scores = ", ".join(f"{name} {perplexity(m, ids):.2f}" for name, m in models.items())
    print(f"perplexity on {ids.shape[1]} tokens of real text: {scores}")
    print(f"greedy continuation of {PROMPT!r}")
    for name, model in models.items():
        print(f"  {name + ':':<11} {continuation(model, tokenizer, PROMPT)!r}")


def calibrated_hybrid(gguf, config, output: str):
    """The same conversion with --calibrate on the package's built-in Walden text (16k tokens, closed form)."""
    from dataclasses import replace
    from importlib import resources

    walden = resources.files("hybridize.evals").joinpath("data", BUILTIN_FILLER)
    with resources.as_file(walden) as path:
        summary = convert_to_folder(str(gguf), output, replace(config, calibrate_data=[str(path)]), dtype="float32",
                                    force=True)
    print(f"calibrated on Walden in {summary['calibration']['seconds']} s (mean per-layer error "
          f"{summary['calibration']['mean_rel_err']}) -> {output}")
    return AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()


if __name__ == "__main__":
    main()
