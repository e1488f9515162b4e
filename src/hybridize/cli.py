"""The `hybridize` command line.

    hybridize convert SOURCE OUTPUT [--pattern 0,1,2] [--period 4] [--attention-layers 3,7] [--gate-init ones]
                                    [--dtype bfloat16] [--dry-run] [--force] [--seed 0]
                                    [--calibrate DATA [DATA ...] [--calibrate-tokens 64k] [--calibrate-steps N] ...]
    hybridize export HYBRID_DIR OUT [--format qwen3_5] [--force]
    hybridize distill --teacher SOURCE --student HYBRID_DIR --data PATH [PATH ...] --out RUN_DIR [...]
    torchrun --nproc-per-node N -m hybridize distill ...      (the same run sharded over N GPUs)
    hybridize eval MODEL --data PATH [--teacher SOURCE] [--seq-len N] [--max-tokens N]
    hybridize eval MODEL --task passkey|niah [--teacher SOURCE] [--lengths 1k,2k,4k,8k] [--depths 0,50,100] [...]
    hybridize train-mtp MODEL --data PATH [PATH ...] --out OUT [--steps N] [--batch-size N] [--seq-len N] [--lr X]
                        [--save-every N] [--stop-at STEP] [--resume]
    hybridize plot RUN_DIR | EVAL.json
    hybridize heal SOURCE OUT --data PATH [PATH ...] [--tokens 50M] [--eval-data PATH ...] [--select-layers kl]
                   [--resume]
    hybridize select-layers SOURCE --data PATH [--keep K] [--method kl|passkey|kl+passkey|proxy]
    hybridize analyze-layers MODEL --data PATH [--tokens N] [--seq-len N] [--json FILE]
    hybridize train-etd MODEL OUT --data PATH [--part routers|experts] [--steps N] [--split E,K,D] [--resume]
    hybridize bench --train [--shape qwen3-8b|smollm2|tiny] [--seq-len N] [--gpus N] [--json FILE]
    hybridize bench MODEL [--against SOURCE] [--prefill-lengths 4k,32k] [--decode-batches 1,32] [--json FILE]
    hybridize bench MODEL --speculative --data PATH [PATH ...] [--decode-batches 1,8] [--draft-tokens 3]
    hybridize corpus OUT [--sources NAME ...] [--holdout NAME] [--val-fraction 0.01] [--max-mb-per-source N] [--list]

User mistakes (bad flags, unsupported or broken sources, an existing output) print one line,
`hybridize: error: <message>`, on stderr and exit with status 2; never a traceback.
Each subcommand is one `add_<name>_parser` function plus one `cmd_<name>` function.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import threading

from .errors import HybridizeError
from .output import json_safe
from .transfer.config import GATE_INIT_STRATEGIES
from .transfer.convert import DTYPES


class _Parser(argparse.ArgumentParser):
    """argparse, but errors become HybridizeError so that main prints them on one line."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise HybridizeError(" ".join(message.split()))


def _int_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; '' -> []."""
    text = text.strip()
    if not text:
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of layer numbers ({part!r} is not an integer)"
            ) from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: layer numbers must be >= 0, got {value}")
        out.append(value)
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


# ------------------------------------------------------------------------------------------------------- convert


def _add_layout_flags(p) -> None:
    """Which layers become DeltaNet and how attention gates start: the flags `convert` and `heal` share."""
    p.add_argument(
        "--pattern",
        type=_int_list,
        default=None,
        metavar="I,J,..",
        help="positions within each period that become Gated DeltaNet, comma-separated ('' = none: all layers "
        "stay attention) [default: 0,1,2, i.e. 3 DeltaNet : 1 attention]",
    )
    p.add_argument(
        "--period",
        type=_positive_int,
        default=None,
        metavar="N",
        help="length of the repeating layer pattern [default: 4]",
    )
    p.add_argument(
        "--attention-layers",
        type=_int_list,
        default=None,
        metavar="I,J,..",
        help="explicit list of layers that stay gated attention (all others become DeltaNet); replaces "
        "--pattern/--period, e.g. for layers chosen by a KL-guided search [default: use the pattern]",
    )
    p.add_argument(
        "--gate-init",
        choices=GATE_INIT_STRATEGIES,
        default="ones",
        help="attention output-gate init: 'ones' = gate rows 0 and o_proj doubled, so attention layers equal the "
        "source exactly; 'zero' = gate rows 0, no compensation (attention output halved); 'small' = gate rows "
        "N(0, 0.01^2), o_proj doubled [default: ones]",
    )


def add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Qwen3 / Llama-family model into a Gated DeltaNet + gated-attention hybrid",
        description=(
            "Convert a pretrained Qwen3 / Llama-family model into a Gated DeltaNet + gated-attention hybrid by "
            "transferring its weights, and write it as a Hugging Face model folder (safetensors, config, tokenizer). "
            "Layer i becomes Gated DeltaNet when i % PERIOD is in PATTERN; the other layers stay softmax attention "
            "with a sigmoid output gate. With --calibrate DATA each DeltaNet layer is then fitted to the source's "
            "attention output on DATA (decay, output gate, least-squares out_proj, optionally Adam), which brings "
            "a fresh hybrid much closer to its teacher before any distillation."
        ),
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="the model to convert: a local folder (config.json + *.safetensors), a .gguf file, or a Hugging Face "
        "hub id such as Qwen/Qwen3-8B",
    )
    p.add_argument(
        "output",
        metavar="OUTPUT",
        nargs="?",
        help="folder to write the hybrid into (written to a temporary folder, renamed into place when complete); "
        "may be omitted with --dry-run",
    )
    _add_layout_flags(p)
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="dtype of the written weights [default: the source's stored dtype]",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="read only the source's config.json and print the plan as JSON (layer schedule, parameter counts, "
        "weight and cache sizes); download nothing else, write nothing [default: off]",
    )
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it already exists [default: refuse]")
    p.add_argument(
        "--seed",
        type=_int,
        default=0,
        help="random seed for the newly initialised parameters (DeltaNet projections, 'small' gates) and the "
        "calibration windows [default: 0]",
    )
    add_calibrate_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (reading a GGUF, calibrating, "
                   "writing)")
    p.set_defaults(func=cmd_convert)


def _nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


CALIBRATE_FLAGS = ("calibrate_tokens", "calibrate_seq_len", "calibrate_steps", "calibrate_batch_size", "calibrate_lr")


def add_calibrate_arguments(p, heal: bool = False) -> None:
    """--calibrate and its sizes: the CrossArchTransferConfig.calibrate_* fields, 1:1 (heal: on by default, on
    --data, and --no-calibrate)."""
    from .transfer.config import CrossArchTransferConfig

    d = CrossArchTransferConfig()
    g = p.add_argument_group("calibration (a fresh hybrid close to its teacher; see transfer/calibrate.py)")
    default = ("the --data text; --no-calibrate: none" if heal else
               "no calibration, DeltaNet layers start as no-ops")
    g.add_argument("--calibrate", dest="calibrate_data", nargs="+", metavar="DATA",
                   help="fit each DeltaNet layer to the source's attention output on this text (any format distill "
                   "reads: text, JSONL, parquet, datasets folders, .npy tokens), layer by layer with the teacher's "
                   f"own layer inputs; on CUDA when available [default: {default}]")
    if heal:
        g.add_argument("--no-calibrate", action="store_true",
                       help="start from the plain init (DeltaNet layers as no-ops): the zero-init baseline")
    g.add_argument("--calibrate-tokens", type=_count, default=None, metavar="N",
                   help=f"tokens of DATA to calibrate on (e.g. 64k), drawn as seeded random windows "
                   f"[default: {d.calibrate_tokens}]")
    g.add_argument("--calibrate-seq-len", type=_positive_int, default=None, metavar="N",
                   help=f"tokens per calibration window [default: {d.calibrate_seq_len}]")
    g.add_argument("--calibrate-steps", type=_nonnegative_int, default=None, metavar="N",
                   help="Adam steps of the attention-transfer fit per DeltaNet layer after the closed-form init; 0 = "
                   "closed-form only (measured enough for SmolLM2; each step costs a DeltaNet forward and backward) "
                   f"[default: {d.calibrate_steps}]")
    g.add_argument("--calibrate-batch-size", type=_positive_int, default=None, metavar="N",
                   help=f"windows per Adam step [default: {d.calibrate_batch_size}]")
    g.add_argument("--calibrate-lr", type=_positive_float, default=None, metavar="LR",
                   help=f"peak Adam learning rate of the fit (warmup, cosine decay) [default: {d.calibrate_lr}]")


def _calibrate_kwargs(args) -> dict:
    """The calibrate_* config fields the user gave; a size without --calibrate is a mistake, not a no-op."""
    given = {name: getattr(args, name) for name in CALIBRATE_FLAGS if getattr(args, name) is not None}
    if given and not args.calibrate_data:
        flag = "--" + next(iter(given)).replace("_", "-")
        raise HybridizeError(f"{flag} needs --calibrate DATA")
    for path in args.calibrate_data or []:
        if not os.path.exists(os.path.expanduser(path)):
            raise HybridizeError(f"calibration data {path} does not exist")
    return {"calibrate_data": args.calibrate_data, **given} if args.calibrate_data else {}


def _attention_config(args, num_layers: int):
    from .transfer.config import HybridAttentionConfig

    pattern_given = args.pattern is not None or args.period is not None
    if args.attention_layers is not None:
        if pattern_given:
            raise HybridizeError("use either --attention-layers or --pattern/--period, not both")
        return HybridAttentionConfig(attention_layers=args.attention_layers)
    attention = HybridAttentionConfig()
    if args.pattern is not None:
        attention.deltanet_layer_pattern = args.pattern
    if args.period is not None:
        attention.pattern_period = args.period
    attention.layer_types(num_layers)  # validates against the source's depth
    return attention


def cmd_convert(args) -> int:
    from .transfer.config import CrossArchTransferConfig
    from .transfer.convert import convert_to_folder, hybrid_config_for, resolve_dtype
    from .transfer.sources import read_source_config

    if not args.dry_run and not args.output:
        raise HybridizeError("convert needs an OUTPUT folder (or --dry-run to only print the plan)")
    calibrate = _calibrate_kwargs(args)
    source_config, family = read_source_config(args.source)  # cheap: config only, fails before any work
    if family == "qwen3_5_text" and (args.pattern, args.period, args.attention_layers) != (None, None, None):
        raise HybridizeError(
            f"{args.source} is already a hybrid (qwen3_5_text); --pattern/--period/--attention-layers do not apply"
        )
    if calibrate and family == "qwen3_5_text":
        raise HybridizeError(f"{args.source} is already a hybrid (qwen3_5_text); --calibrate needs an attention "
                             "source (Qwen3 / Llama) as the teacher")
    attention = _attention_config(args, source_config.num_hidden_layers)
    if args.dry_run:
        from .transfer.plan import conversion_plan

        dtype = resolve_dtype(args.dtype, source_config)
        hybrid_config = hybrid_config_for(source_config, family, attention, dtype)
        plan = {"source": args.source, **conversion_plan(source_config, family, hybrid_config, dtype)}
        print(json.dumps(plan, indent=2))
        return 0

    transfer = CrossArchTransferConfig(
        source_model=args.source, hybrid_attention=attention, gate_init_strategy=args.gate_init, seed=args.seed,
        **calibrate,
    )
    from .train.models import gguf_progress

    with gguf_progress(not args.no_progress):
        summary = convert_to_folder(args.source, args.output, transfer, dtype=args.dtype, force=args.force,
                                    progress=not args.no_progress)
    print(json.dumps(summary, indent=2, default=str))
    return 0


# -------------------------------------------------------------------------------------------------------- export

EXPORT_FORMATS = ("qwen3_5",)


def add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a hybridize model as a stock checkpoint (Qwen3.5) that transformers and vLLM run as-is",
        description=(
            "Write a hybridize model folder as a stock Qwen3.5 text checkpoint (model_type qwen3_5_text, "
            "Qwen3_5ForCausalLM): same tensors, a rewritten config, tokenizer and generation config. Models the "
            "format cannot express (no q/k-norm, as from Llama sources; RoPE types vLLM or transformers' Qwen3.5 "
            "compute differently) are refused and nothing is written."
        ),
    )
    p.add_argument("hybrid_dir", metavar="HYBRID_DIR", help="a folder written by `hybridize convert` (or "
                   "save_pretrained of a HybridForCausalLM)")
    p.add_argument("output", metavar="OUT", help="folder to write the export into (written to a temporary folder, "
                   "renamed into place when complete)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="qwen3_5",
                   help="checkpoint format: 'qwen3_5' = transformers' / vLLM's Qwen3_5ForCausalLM [default: qwen3_5]")
    p.add_argument("--force", action="store_true", help="replace OUT if it already exists [default: refuse]")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export.qwen3_5 import export_qwen3_5

    summary = export_qwen3_5(args.hybrid_dir, args.output, force=args.force)
    print(json.dumps(summary, indent=2, default=str))
    return 0


# ------------------------------------------------------------------------------------------------------- distill


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):  # an inf learning rate turns every weight into NaN
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _count(text: str) -> int:
    """An integer >= 1 that may use k/M/B suffixes: 20M = 20,000,000."""
    scale = {"k": 10**3, "m": 10**6, "b": 10**9}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except (ValueError, OverflowError):  # OverflowError: inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 20000000 or 20M)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _add_training_flags(p, d, eval_tokens: bool = True) -> None:
    """The DistillConfig flags that `distill` and `heal` share (all but the run's length, --align-only, --stop-at)."""
    from .train.config import COMPUTE_DTYPES, SHARDINGS, TRAINABLE

    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len,
                   help=f"tokens per sequence [default: {d.seq_len}]")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"global batch in sequences per optimizer step, over all GPUs [default: {d.batch_size}]")
    p.add_argument("--grad-accum", type=_positive_int, default=d.grad_accum,
                   help="micro-steps per optimizer step (each GPU then holds batch/(accum*GPUs) sequences at once) "
                   f"[default: {d.grad_accum}]")
    p.add_argument("--lr", type=_float, default=d.lr, help=f"peak learning rate (AdamW) [default: {d.lr}]")
    p.add_argument("--min-lr", type=_float, default=d.min_lr, help=f"final learning rate of the cosine decay "
                   f"[default: {d.min_lr}]")
    p.add_argument("--warmup", type=_int, default=d.warmup, help=f"linear warmup steps [default: {d.warmup}]")
    p.add_argument("--weight-decay", type=_float, default=d.weight_decay,
                   help=f"AdamW weight decay on matrices [default: {d.weight_decay}]")
    p.add_argument("--clip", type=_float, default=d.clip, help=f"gradient-norm clipping, 0 = off [default: {d.clip}]")
    p.add_argument("--temperature", type=_float, default=d.temperature,
                   help=f"KD softmax temperature (KD is scaled by T^2) [default: {d.temperature}]")
    p.add_argument("--alpha", type=_float, default=d.alpha,
                   help=f"weight of KD vs cross-entropy on the data: alpha*KD + (1-alpha)*CE [default: {d.alpha}]")
    p.add_argument("--align-weight", type=_float, default=d.align_weight,
                   help="weight of the per-layer hidden-state alignment loss (MSE of each layer's output vs the "
                   f"teacher's) [default: {d.align_weight}]")
    p.add_argument("--train", choices=TRAINABLE, default=d.train,
                   help="what trains: all parameters, the token mixers of every layer, or only the DeltaNet layers "
                   f"[default: {d.train}]")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=d.dtype,
                   help="compute dtype; auto = bfloat16 on CUDA, float32 on CPU (master weights, optimizer state and "
                   f"gradient reduction stay float32) [default: {d.dtype}]")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, ~30%% more compute)")
    p.add_argument("--sharding", choices=SHARDINGS, default=d.sharding,
                   help="fsdp: shard student and teacher with FSDP2 over the processes (torchrun); none: plain modules "
                   "in one process, without FSDP's per-layer gathers, casts and hooks (the same numerics: float32 "
                   "master weights, compute in --dtype; tested on CPUs, not yet measured on a GPU, where its first "
                   "run did not finish its warm-up in 140 s); auto: none for one process, fsdp for more. "
                   f"Checkpoints resume under either [default: {d.sharding}]")
    p.add_argument("--save-every", type=_int, default=d.save_every,
                   help=f"checkpoint every N steps (and at the end); 0 = only at the end [default: {d.save_every}]")
    p.add_argument("--keep", type=_positive_int, default=d.keep, help=f"checkpoints to keep [default: {d.keep}]")
    p.add_argument("--eval-every", type=_int, default=d.eval_every,
                   help=f"evaluate on --eval-data every N steps, 0 = never [default: {d.eval_every}]")
    if eval_tokens:  # heal has its own --eval-tokens, for each eval path as well
        p.add_argument("--eval-tokens", type=_count, default=d.eval_tokens,
                       help=f"tokens of --eval-data to evaluate on [default: {d.eval_tokens}]")
    p.add_argument("--max-bad-steps", type=_positive_int, default=d.max_bad_steps,
                   help=f"stop after this many steps with a NaN/inf loss or gradient [default: {d.max_bad_steps}]")
    p.add_argument("--chunk-tokens", type=_positive_int, default=d.chunk_tokens,
                   help=f"positions per logits chunk of the loss (memory vs speed) [default: {d.chunk_tokens}]")
    p.add_argument("--seed", type=_int, default=d.seed, help=f"data order and init seed [default: {d.seed}]")
    _add_mtp_flags(p)


def _add_mtp_flags(p) -> None:
    """--mtp, --mtp-weight, --mtp-depths (DistillConfig.mtp_weight / mtp_depths; `_resolve_mtp` reads them)."""
    from .train.config import MTP_WEIGHT

    g = p.add_argument_group("multi-token prediction (MTP heads for speculative decoding, trained jointly)")
    g.add_argument("--mtp", action="store_true",
                   help="train MTP heads together with the student: a student without heads gets fresh ones "
                   "(Qwen3.5's mtp.* layout, as train-mtp adds them); depth k learns the data token k+1 steps ahead "
                   "(cross-entropy), the loss adds mtp-weight * the mean over depths, and the final model carries "
                   "the heads (HybridForCausalLM.mtp_decoder); the heads train whatever --train says")
    g.add_argument("--mtp-weight", type=_float, default=None, metavar="W",
                   help=f"weight of the MTP loss; > 0 turns --mtp on by itself, 0 = off [default: {MTP_WEIGHT} "
                   "with --mtp, else 0]")
    g.add_argument("--mtp-depths", type=_positive_int, default=None, metavar="K",
                   help="tokens the heads predict beyond the next one (num_predict_tokens, at most 64; the number "
                   "of drafts per verify step) [default: the student's, 4 for new heads]")


def _resolve_mtp(args) -> None:
    """Fold --mtp into args.mtp_weight (the DistillConfig field): --mtp alone gives the default weight, and a
    weight > 0 alone turns MTP on (what `heal` passes to distill under torchrun: --mtp-weight only)."""
    from .train.config import MTP_WEIGHT

    if args.mtp and args.mtp_weight == 0:
        raise HybridizeError("--mtp with --mtp-weight 0 trains no heads: drop --mtp-weight, or drop --mtp")
    if args.mtp_weight is None:
        args.mtp_weight = MTP_WEIGHT if args.mtp else 0.0


def add_distill_parser(sub) -> None:
    from .train.config import DistillConfig

    d = DistillConfig()
    p = sub.add_parser(
        "distill",
        help="heal a converted hybrid by knowledge distillation from its teacher (1 GPU, or N under torchrun)",
        description=(
            "Train the hybrid STUDENT to match the TEACHER's next-token distribution on your text: "
            "loss = alpha*KD + (1-alpha)*CE (+ align-weight * per-layer hidden-state alignment), averaged per target "
            "token. Run it as is on one device, or as `torchrun --nproc-per-node N -m hybridize distill ...` to "
            "shard student and teacher with FSDP2 over N GPUs: --batch-size is global, so the same flags train the "
            "same model. Checkpoints go to OUT/checkpoints (--resume continues exactly), metrics to "
            "OUT/metrics.jsonl, the healed model to OUT/final."
        ),
    )
    p.add_argument("--teacher", required=True, metavar="SOURCE",
                   help="the model the student was converted from: folder, hub id owner/name or .gguf file")
    p.add_argument("--student", required=True, metavar="HYBRID_DIR", help="a `hybridize convert` output folder")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="training text: text files or folders, JSONL with a 'text' field, parquet, Hugging Face "
                   "datasets folders (save_to_disk), or pre-tokenized .npy token arrays; tokenized once and cached "
                   "in OUT/data")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run folder (created)")
    p.add_argument("--eval-data", nargs="+", metavar="PATH", help="held-out text for --eval-every")
    _add_training_flags(p, d)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help="optimizer steps to run [default: one pass over the data]")
    length.add_argument("--tokens", type=_count, help="training tokens (e.g. 20M); rounded up to whole steps")
    p.add_argument("--align-only", action="store_true",
                   help="train on the hidden-state alignment alone (the first stage of RADLADS-style recipes; KD and "
                   "CE are still logged); then distill from RUN_DIR/final in a second run")
    p.add_argument("--stop-at", type=_positive_int, metavar="STEP",
                   help="end this invocation after STEP with a checkpoint, keeping the full schedule (for time-limited "
                   "jobs; --resume continues) [default: run to the end]")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its latest checkpoint "
                   "(from step 0 when it has none)")
    p.add_argument("--override", action="store_true", help="with --resume: accept flags that change the schedule "
                   "(--steps, --lr, --warmup, ...) from what the checkpoint was trained with [default: refuse]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (metrics still go to the files)")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args) -> int:
    from dataclasses import fields

    from .train.config import DistillConfig
    from .train.run import run_distill

    _resolve_mtp(args)
    config = DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig)})
    summary = run_distill(args.teacher, args.student, args.data, args.out, config, eval_data=args.eval_data,
                          resume=args.resume, progress=not args.no_progress, override=args.override)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(json_safe(summary), indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------------------- eval


def _lengths(text: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096] (k = 1024 tokens)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = 1024 if part.endswith("k") else 1
        try:
            value = int(float(part.removesuffix("k")) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token counts such as "
                                             "1k,2k,4096") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"token counts must be >= 1, got {part}")
        out.append(value)
    return out


def _depths(text: str) -> list[int]:
    """'0,50,100' -> [0, 50, 100]: whole percentages."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of percentages such as 0,50,100") \
            from None
    if not all(0 <= v <= 100 for v in values):
        raise argparse.ArgumentTypeError(f"depths are percentages in [0, 100], got {text}")
    return values


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_eval_parser(sub) -> None:
    from .evals.longctx import TASKS
    from .evals.runner import PROMPT_FORMATS, LongContextConfig

    lc = LongContextConfig()
    p = sub.add_parser(
        "eval",
        help="perplexity on held-out text (with --teacher also KL and greedy agreement), or long-context retrieval "
        "accuracy with --task",
        description="Evaluate MODEL on the first --max-tokens tokens of --data (in order, packed with EOS "
        "separators into --seq-len windows) and print JSON: perplexity; with --teacher also the teacher's "
        "perplexity, the per-token KL(teacher || model) and the share of positions whose argmax equals the teacher's. "
        "With --task instead: synthetic long-context prompts (passkey, or RULER-style needles in a haystack) of "
        "--lengths tokens made of real filler text, answered by greedy generation and scored by exact match; prints "
        "the accuracy per length and depth (of MODEL / of the teacher) as a table, and the full result as JSON to "
        "--json.",
    )
    p.add_argument("model", metavar="MODEL", help="a hybridize folder, or any source `convert` reads (folder, hub "
                   "id, .gguf)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text in any format `distill` reads: the held-out text "
                   "(required without --task); with --task the filler the prompts are made of [default with --task: "
                   "built-in public-domain prose, Thoreau's Walden]")
    p.add_argument("--teacher", metavar="SOURCE", help="compare against this model (same vocabulary)")
    p.add_argument("--seq-len", type=_positive_int, default=2048, help="tokens per window [default: 2048]")
    p.add_argument("--max-tokens", type=_count, default=262_144, help="tokens to evaluate [default: 262144]")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="windows per forward pass [default: 4]")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                   help="auto = bfloat16 on CUDA, float32 on CPU [default: auto]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("long-context tasks")
    g.add_argument("--task", choices=list(TASKS), help="passkey = a 5-digit pass key hidden in the filler; niah = "
                   "RULER's needle variants: single needle, multiple keys (one asked), multiple values (all asked), "
                   "variable tracking [default: perplexity instead]")
    niah = ",".join(TASKS["niah"])
    g.add_argument("--variants", type=_names, metavar="V,..", help=f"the niah variants to run, from {niah} "
                   f"[default: all]")
    g.add_argument("--lengths", type=_lengths, metavar="N,..", help="prompt lengths in tokens of MODEL's tokenizer, "
                   f"k = 1024 [default: {','.join(f'{n // 1024}k' for n in lc.lengths)}]")
    g.add_argument("--depths", type=_depths, metavar="D,..", help="needle depths, percent of the filler before "
                   f"the needle [default: {','.join(map(str, lc.depths))}]")
    g.add_argument("--trials", type=_positive_int, help=f"prompts per length and depth [default: {lc.trials}]")
    g.add_argument("--seed", type=_int, help="seed of every random choice (filler position, keys, values, other "
                   f"needles' depths): the same seed gives the same prompts [default: {lc.seed}]")
    g.add_argument("--prompt", choices=PROMPT_FORMATS, help="plain = a completion prompt ending in 'Answer: The pass "
                   "key is'; chat = the same question in the tokenizer's chat template, the answer's start in the "
                   f"assistant turn [default: {lc.prompt}]")
    g.add_argument("--json", metavar="FILE", help="write the full result (accuracy grids, every prompt's answer and "
                   "output) as JSON to FILE, for `hybridize plot FILE`; '-' = stdout (the table then goes to stderr) "
                   "[default: table only]")
    p.set_defaults(func=cmd_eval)


_LONGCTX_FLAGS = ("variants", "lengths", "depths", "trials", "seed", "prompt", "json")


def cmd_eval(args) -> int:
    if args.task:
        return _cmd_eval_task(args)
    given = [f"--{f}" for f in _LONGCTX_FLAGS if getattr(args, f) is not None]
    if given:
        raise HybridizeError(f"{', '.join(given)} only apply to long-context tasks: add --task passkey|niah")
    if not args.data:
        raise HybridizeError("eval needs --data PATH (held-out text for perplexity), or --task passkey|niah")
    from .train.run import run_eval

    result = run_eval(args.model, args.data, teacher=args.teacher, seq_len=args.seq_len, max_tokens=args.max_tokens,
                      batch_size=args.batch_size, dtype=args.dtype, progress=not args.no_progress)
    print(json.dumps(json_safe(result), indent=2))
    return 0


def _cmd_eval_task(args) -> int:
    from dataclasses import fields

    from .evals.runner import LongContextConfig, format_table, run_longctx

    if args.variants is not None and args.task != "niah":
        raise HybridizeError("--variants applies to --task niah")
    given = {f.name: getattr(args, f.name) for f in fields(LongContextConfig) if getattr(args, f.name) is not None}
    config = LongContextConfig(**given)
    result = run_longctx(args.model, config, teacher=args.teacher, progress=not args.no_progress)
    table = format_table(result)
    if args.json == "-":
        print(json.dumps(result, indent=1))
        print(table, end="", file=sys.stderr)
        return 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(table, end="")
    return 0


# ---------------------------------------------------------------------------------------------------------- plot


def add_plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a distill run's loss curves, or an `eval --task` result's heat maps "
                       "(PNG)", description="For a run folder: read RUN_DIR/metrics.jsonl (and eval.jsonl) and draw "
                       "the curves. For the JSON file of `hybridize eval --task ... --json`: draw the accuracy heat "
                       "maps (needle depth x prompt length), per variant, for the model and its teacher.")
    p.add_argument("path", metavar="RUN_DIR|EVAL.json", help="a `hybridize distill --out` folder or a "
                   "`hybridize eval --task ... --json` file")
    p.add_argument("--out", metavar="PNG", help="where to write the image [default: RUN_DIR/curves.png, or the "
                   "JSON's path with .png]")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from pathlib import Path

    if Path(args.path).is_file():
        from .evals.heatmap import plot_longctx

        print(plot_longctx(args.path, args.out))
        return 0
    from .train.plot import plot_run

    print(plot_run(args.path, args.out))
    return 0


# -------------------------------------------------------------------------------------------------- select-layers


def add_select_parser(sub) -> None:
    from .transfer.select import METHODS, SelectConfig

    d = SelectConfig()
    p = sub.add_parser(
        "select-layers",
        help="choose which layers keep softmax attention (KL-guided or a cheap proxy)",
        description="Score every layer of SOURCE on --data and print (JSON) the --keep layers that should stay "
        "softmax attention, with the flag to pass to `hybridize convert`. kl: KL(teacher || teacher with only that "
        "layer converted to Gated DeltaNet) per token; passkey: the same KL at the answer tokens of passkey prompts "
        "made from --data (the layers retrieval needs); kl+passkey: both scans, a layer scored by the sum of its "
        "shares of the two totals; proxy: the teacher's attention mass beyond --window tokens. "
        "Runs on the GPU when there is one (kl on a 135M model: ~30 min on 2 CPU cores).",
    )
    p.add_argument("source", metavar="SOURCE", help="the model to convert: folder, hub id or .gguf file")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH", help="text in any format `distill` reads")
    p.add_argument("--keep", type=_int, default=d.keep,
                   help="layers that keep attention [default: as many as the 3:1 pattern keeps]")
    p.add_argument("--method", choices=METHODS, default=d.method, help=f"scoring method [default: {d.method}]")
    p.add_argument("--tokens", type=_count, default=d.tokens,
                   help=f"tokens of --data to score on (passkey: --tokens / --seq-len prompts) [default: {d.tokens}]")
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len,
                   help=f"tokens per window (passkey: per prompt) [default: {d.seq_len}]")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"windows per forward pass [default: {d.batch_size}]")
    p.add_argument("--window", type=_positive_int, default=d.window,
                   help=f"proxy: attention to keys farther back than this counts as long-range [default: {d.window}]")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                   help=f"dtype of the teacher and the probe [default: {d.dtype}]")
    p.add_argument("--json", metavar="FILE", help="also write the report to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_select)


def cmd_select(args) -> int:
    from dataclasses import fields

    from .transfer.select import SelectConfig, select_attention_layers

    config = SelectConfig(**{f.name: getattr(args, f.name) for f in fields(SelectConfig)})
    report = select_attention_layers(args.source, config, progress=not args.no_progress)
    text = json.dumps(report, indent=2)
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


# ------------------------------------------------------------------------------------------------------ train-mtp


def _add_device_flag(p, what: str) -> None:
    from .device import DEVICE_CHOICES

    p.add_argument("--device", default="auto", help=f"where it {what}: {DEVICE_CHOICES} [default: auto]")


def add_train_mtp_parser(sub) -> None:
    from .train.mtp import TARGETS, TrainMTPConfig

    d = TrainMTPConfig()
    p = sub.add_parser(
        "train-mtp",
        help="train a hybrid's MTP heads (speculative decoding) alone, backbone frozen, on its own predictions",
        description="Load MODEL (a hybridize folder; heads are added when it has none), train its `mtp.*` heads on "
        "--data with the backbone frozen: depth k learns the backbone's own prediction k tokens further "
        "(self-distillation: its argmax, or its distribution with --targets soft), and write the whole model to "
        "--out. While it trains, checkpoints (the heads, AdamW, "
        "the data position, the RNG; the frozen backbone comes from MODEL) go to the work folder OUT.partial beside "
        "OUT every --save-every steps; --resume continues from the latest one exactly, with the same settings. "
        "OUT.partial is removed once OUT is written.",
    )
    p.add_argument("model", metavar="MODEL", help="a hybridize model folder")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH", help="text in any format `distill` reads")
    p.add_argument("--out", required=True, metavar="OUT", help="folder to write the model with trained heads to")
    p.add_argument("--steps", type=_positive_int, default=d.steps,
                   help=f"optimizer steps (AdamW on the heads only) [default: {d.steps}]")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"sequences per step, windows of the packed token stream [default: {d.batch_size}]")
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len,
                   help=f"tokens per sequence [default: {d.seq_len}]")
    p.add_argument("--lr", type=_float, default=d.lr,
                   help=f"peak learning rate of the heads, reached after --warmup steps, then a cosine to a tenth "
                   f"[default: {d.lr}]")
    p.add_argument("--warmup", type=_nonnegative_int, default=None,
                   help="linear warmup steps [default: 5%% of --steps, at least 1]")
    p.add_argument("--targets", choices=TARGETS, default=d.targets,
                   help="what depth k learns at position i: 'argmax' = cross-entropy on the backbone's argmax at "
                   f"i+k, 'soft' = KL to its distribution there (tied on SmolLM2, costs more) [default: {d.targets}]")
    p.add_argument("--num-predict-tokens", type=_positive_int, default=None,
                   help="MTP depths (tokens t+2 ..) [default: the model's, 4 for new heads]")
    p.add_argument("--save-every", type=_nonnegative_int, default=d.save_every, metavar="N",
                   help=f"write a checkpoint to OUT.partial every N steps (0: only at --stop-at) "
                   f"[default: {d.save_every}]")
    p.add_argument("--stop-at", type=_positive_int, metavar="STEP",
                   help="end this invocation after STEP with a checkpoint, writing no OUT (for time-limited jobs; "
                   "--resume continues) [default: run to the end]")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT.partial from its latest checkpoint (from step 0 when it has none); "
                   "the model, data and training flags must be the ones the run started with")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it exists; without --resume, also discard an existing OUT.partial")
    _add_device_flag(p, "trains the heads (the frozen backbone runs there too)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_train_mtp)


def cmd_train_mtp(args) -> int:
    from .train.mtp import TrainMTPConfig, run_train_mtp

    config = TrainMTPConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                            warmup=args.warmup, targets=args.targets, num_predict_tokens=args.num_predict_tokens,
                            save_every=args.save_every, stop_at=args.stop_at, device=args.device)
    summary = run_train_mtp(args.model, args.data, args.out, config, force=args.force,
                            progress=not args.no_progress, resume=args.resume)
    print(json.dumps(summary, indent=2))
    return 0


# ------------------------------------------------------------------------------------------------- analyze-layers


def add_analyze_parser(sub) -> None:
    from .transfer.analyze import AnalyzeConfig

    d = AnalyzeConfig()
    p = sub.add_parser(
        "analyze-layers",
        help="angular distance between consecutive layers and the proposed ETD encoder/think/decoder split",
        description="Measure, on --data, the angular distance arccos(cos(h_i, h_i+1))/pi between consecutive "
        "layers' hidden states of MODEL (averaged over tokens) and print (JSON) the encoder / think / decoder split "
        "at the curve's knees (25/50/25% when it has none), as ETDConfig arguments.",
    )
    p.add_argument("model", metavar="MODEL", help="a hybridize folder, or a source: folder, hub id or .gguf file")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH", help="text in any format `distill` reads")
    p.add_argument("--tokens", type=_count, default=d.tokens, help=f"tokens of --data to use [default: {d.tokens}]")
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len,
                   help=f"tokens per window [default: {d.seq_len}]")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"windows per forward pass [default: {d.batch_size}]")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype, help=f"[default: {d.dtype}]")
    p.add_argument("--json", metavar="FILE", help="also write the report to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args) -> int:
    from dataclasses import fields

    from .transfer.analyze import AnalyzeConfig, analyze_layers

    config = AnalyzeConfig(**{f.name: getattr(args, f.name) for f in fields(AnalyzeConfig)})
    report = analyze_layers(args.model, config, progress=not args.no_progress)
    text = json.dumps(report, indent=2)
    if args.json:
        _write_json(args.json, report)
    print(text)
    return 0


# ------------------------------------------------------------------------------------------------------ train-etd


def add_train_etd_parser(sub) -> None:
    from .train.etd import PARTS
    from .train.etd_run import TrainETDConfig

    d = TrainETDConfig()
    p = sub.add_parser(
        "train-etd",
        help="train an Encode-Think-Decode model's layer routers or LoRA experts with the base frozen",
        description="Train the routers (from per-sequence route-search labels, focal loss) or the LoRA experts "
        "(next-token CE, bias-balanced) of MODEL, an ETD folder or a hybrid that is first wrapped with --iterations "
        "/ --split. OUT/model is saved every --save-every steps; --resume continues from it.",
    )
    p.add_argument("model", metavar="MODEL", help="an ETD folder (train-etd output) or a hybridize folder")
    p.add_argument("output", metavar="OUT", help="run folder; the model is written to OUT/model")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH", help="text in any format `distill` reads")
    p.add_argument("--part", choices=PARTS, default=d.part, help=f"what trains [default: {d.part}]")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help=f"[default: {d.steps}]")
    p.add_argument("--lr", type=_float, default=d.lr, help=f"AdamW learning rate [default: {d.lr}]")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help=f"[default: {d.batch_size}]")
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len, help=f"[default: {d.seq_len}]")
    p.add_argument("--tokens", type=_count, default=d.tokens, help=f"tokens of --data [default: {d.tokens}]")
    p.add_argument("--gamma", type=_float, default=d.gamma, help=f"focal-loss gamma [default: {d.gamma}]")
    p.add_argument("--skip-bonus", type=_float, default=d.skip_bonus,
                   help=f"route search: nats per token a SKIP may cost and still be kept [default: {d.skip_bonus}]")
    p.add_argument("--balance-rate", type=_float, default=d.balance_rate,
                   help=f"expert balance-bias step per update [default: {d.balance_rate}]")
    p.add_argument("--save-every", type=_positive_int, default=d.save_every, help=f"[default: {d.save_every}]")
    p.add_argument("--iterations", type=_positive_int, default=d.iterations,
                   help=f"wrapping a hybrid: think iterations [default: {d.iterations}]")
    p.add_argument("--split", type=_int_list, default=None, metavar="E,K,D",
                   help="wrapping a hybrid: encoder, think, decoder layers [default: 25/50/25%%]")
    p.add_argument("--num-experts", type=_positive_int, default=d.num_experts, help=f"[default: {d.num_experts}]")
    p.add_argument("--lora-rank", type=_positive_int, default=d.lora_rank, help=f"[default: {d.lora_rank}]")
    p.add_argument("--seed", type=_int, default=d.seed, help=f"init of new routers and experts [default: {d.seed}]")
    p.add_argument("--teacher", metavar="MODEL", default=None,
                   help="experts: distil from this model's logits (KL per token) instead of next-token CE "
                   "[default: none]")
    _add_device_flag(p, "trains (the model, and --teacher)")
    p.add_argument("--resume", action="store_true", help="continue OUT from its last save")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train_etd)


def cmd_train_etd(args) -> int:
    from dataclasses import fields

    from .train.etd_run import TrainETDConfig, train_etd

    config = TrainETDConfig(**{f.name: getattr(args, f.name) for f in fields(TrainETDConfig)})
    summary = train_etd(args.model, args.output, config, resume=args.resume, force=args.force,
                        progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------- bench


def add_bench_parser(sub) -> None:
    from .bench.shapes import SHAPES
    from .bench.train import TrainBenchConfig
    from .train.config import SHARDINGS

    d = TrainBenchConfig()
    p = sub.add_parser(
        "bench",
        help="measure inference (prefill, decode) or, with --train, training throughput against the source model",
        description="Without --train: prefill tok/s at --prefill-lengths, greedy decode tok/s at --decode-batches x "
        "--decode-contexts with its roofline (weights + cache bytes over the measured copy bandwidth), cache size and "
        "peak memory, for the default 3:1 hybrid of --shape (or MODEL, a hybridize folder) and, side by side in the "
        "same process, transformers' model of the source (--against). With --speculative: MODEL's MTP speculative "
        "decoding against its plain decoding on prompts from --data. With --train: time the distillation step "
        "`hybridize distill` runs (student "
        "forward+backward, bf16 teacher forward, fused KD head, AdamW; FSDP2 over --gpus, or plain modules with "
        "--sharding none) for both. Random weights "
        "and tokens with the real shapes; bf16 on CUDA, float32 on a CPU. Prints a table; --json writes every number.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="inference and --speculative: a hybridize model folder to time with its real weights "
                   "instead of a random hybrid of --shape [default: --shape]")
    p.add_argument("--train", action="store_true", help="the training-step benchmark instead of inference")
    p.add_argument("--speculative", action="store_true",
                   help="speculative decoding instead: MODEL (with MTP heads) decodes prompts from --data greedily "
                   "with its heads' drafts and plainly, on the same engine (static cache, CUDA graphs on CUDA); "
                   "tok/s of both, tokens per verify step, and whether the outputs are equal")
    p.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="--speculative: text the prompts come from (any format distill reads); each path gives its "
                   "own rows")
    p.add_argument("--draft-tokens", type=_positive_int, default=3,
                   help="--speculative: drafts per verify step [default: 3]")
    p.add_argument("--prompt-tokens", type=_positive_int, default=256,
                   help="--speculative: tokens per prompt [default: 256]")
    p.add_argument("--prompts", type=_positive_int, default=16,
                   help="--speculative: prompts per data path and batch size [default: 16]")
    p.add_argument("--shape", choices=SHAPES, default=d.shape,
                   help=f"model shapes: Qwen3-8B, SmolLM2-135M or a tiny CPU-sized Qwen3 [default: {d.shape}]")
    p.add_argument("--prefill-lengths", type=_lengths, default=[], metavar="LENGTHS",
                   help="inference: prompt lengths to prefill, e.g. 4k,32k,128k [default: 4k,32k,128k; tiny: 128,512]")
    p.add_argument("--decode-batches", type=_lengths, default=[], metavar="N,..",
                   help="inference: decode batch sizes [default: 1,32; tiny: 1,4; --speculative: 1,8]")
    p.add_argument("--decode-contexts", type=_lengths, default=[], metavar="LENGTHS",
                   help="inference: context before decoding, e.g. 1k,32k [default: 1k,32k; tiny: 64]")
    p.add_argument("--new-tokens", type=_int, default=0,
                   help="inference: timed decode steps per row [default: 64; tiny: 8; --speculative: 128]")
    p.add_argument("--repeats", type=_positive_int, default=3, help="inference: timed prefills (median) [default: 3]")
    p.add_argument("--no-dynamic", dest="compare_dynamic", action="store_false",
                   help="inference: time the hybrid's decoding only on its static cache (the CUDA-graph step), not "
                   "also on the dynamic cache (the 'dynamic' column)")
    p.add_argument("--largest-batch", action="store_true",
                   help="inference, CUDA: also decode at the largest batch each model fits after each "
                   "--decode-contexts (predicted from the peak memory at batch 1 and 2, then probed), the row the "
                   "'decode throughput at each model's largest batch' comparison reads; its prefill takes all rows "
                   "at once, as generate does")
    p.add_argument("--verify-tokens", type=_lengths, default=[], metavar="T,..",
                   help="inference: also time the hybrid's speculative verify step of T tokens against its one-token "
                   "step on the same static cache (CUDA graphs on CUDA), at each --decode-batches entry and the first "
                   "--decode-contexts, e.g. 2,5 [default: not measured]")
    p.add_argument("--seq-len", type=_positive_int, default=d.seq_len,
                   help=f"--train: tokens per sequence [default: {d.seq_len}]")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"--train: global sequences per step [default: {d.batch_size}]")
    p.add_argument("--grad-accum", type=_positive_int, default=d.grad_accum,
                   help=f"--train: micro-steps per step [default: {d.grad_accum}]")
    p.add_argument("--steps", type=_positive_int, default=d.steps,
                   help=f"--train: timed steps (median) [default: {d.steps}]")
    p.add_argument("--warmup", type=_int, default=d.warmup,
                   help=f"--train: untimed steps first (kernel compilation, autotuning) [default: {d.warmup}]")
    p.add_argument("--checkpointing", choices=("on", "off", "both"), default=d.checkpointing,
                   help=f"--train: activation checkpointing per block [default: {d.checkpointing}]")
    p.add_argument("--against", default=d.against, metavar="source|none|SOURCE",
                   help="also time transformers' model of the source: 'source' = the source of --shape (as the "
                   "student with --train), 'none', or with MODEL the model it was converted from (folder, hub id or "
                   f".gguf) [default: {d.against}; none with MODEL]")
    p.add_argument("--no-teacher", dest="teacher", action="store_false",
                   help="--train: plain fine-tuning on cross-entropy (no teacher forward, no KD)")
    p.add_argument("--sharding", choices=SHARDINGS, default=d.sharding,
                   help="--train: fsdp (FSDP2, also in one process: what distill did before) or none (plain modules, "
                   f"one process); auto: none for one GPU, fsdp for more [default: {d.sharding}]")
    p.add_argument("--master-dtype", choices=("float32", "bfloat16"), default=d.master_dtype,
                   help="--train: dtype of the trained weights and AdamW state (compute is bf16 on CUDA either way) "
                   f"[default: {d.master_dtype}]")
    p.add_argument("--peak-tflops", type=_float, default=d.peak_tflops,
                   help=f"--train: the MFU denominator per GPU [default: {d.peak_tflops}, H200 dense bf16]")
    p.add_argument("--profile", action="store_true",
                   help="CUDA: profile one more training step (--train) or one prefill of the first length: GPU "
                   "time by kind of kernel and the top kernels")
    p.add_argument("--gpus", type=_positive_int, default=1,
                   help="--train: GPUs of this host (re-launches itself under torchrun when > 1) [default: 1]")
    p.add_argument("--seed", type=_int, default=d.seed, help=f"weights and tokens seed [default: {d.seed}]")
    p.add_argument("--json", metavar="FILE", help="also write the full report as JSON; inference and --speculative "
                   "rewrite it after every row (\"complete\": false until the end), so a run cut short keeps its rows")
    p.set_defaults(func=cmd_bench)


def _write_json(path: str, report: dict) -> None:
    """Write `report` whole or not at all (a temporary file renamed into place): benchmarks rewrite it after every
    row, and a run killed mid-write must still leave the previous version readable."""
    from pathlib import Path

    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(json_safe(report), indent=2) + "\n")
    os.replace(tmp, target)


def _cmd_bench_infer(args) -> int:
    from dataclasses import fields

    from .bench.infer import InferBenchConfig, format_table, run_infer_bench

    if args.gpus > 1:
        raise HybridizeError("the inference benchmark runs on one GPU; --gpus is for --train")
    alone = bool(args.model) and args.against == "source"
    if alone:
        args.against = "none"  # nothing to compare with unless named
    try:
        config = InferBenchConfig(**{f.name: getattr(args, f.name) for f in fields(InferBenchConfig)})
    except ValueError as e:
        raise HybridizeError(str(e)) from None
    report = run_infer_bench(config, save=(lambda r: _write_json(args.json, r)) if args.json else lambda r: None)
    print(format_table(report))
    if alone:
        print("hybridize bench: timed MODEL alone; add --against SOURCE (the model it was converted from) for the "
              "side-by-side rows", file=sys.stderr)
    return 0


def _cmd_bench_speculative(args) -> int:
    from .bench.speculative import SpeculativeBenchConfig, format_table, run_speculative_bench

    if args.train or args.gpus > 1:
        raise HybridizeError("--speculative runs on one device; it does not combine with --train or --gpus")
    config = SpeculativeBenchConfig(model=args.model or "", data=args.data, batches=args.decode_batches or [1, 8],
                                    draft_tokens=args.draft_tokens, prompt_tokens=args.prompt_tokens,
                                    new_tokens=args.new_tokens or 128, prompts=args.prompts, seed=args.seed)
    report = run_speculative_bench(config, save=(lambda r: _write_json(args.json, r)) if args.json else lambda r: None)
    print(format_table(report))
    return 0


def cmd_bench(args) -> int:
    from dataclasses import fields

    from .bench.train import TrainBenchConfig, format_table, run_train_bench
    from .train.parallelize import shutdown_distributed

    if args.speculative:
        return _cmd_bench_speculative(args)
    if args.data:
        raise HybridizeError("--data is for --speculative (the prompts' text); the other benchmarks use random tokens")
    if args.train and (args.model or args.against not in ("source", "none")):
        raise HybridizeError("--train times random weights of --shape; MODEL and --against SOURCE are for the "
                             "inference benchmark")
    if not args.train:
        return _cmd_bench_infer(args)
    if args.gpus > 1 and "RANK" not in os.environ:
        import subprocess

        argv = sys.argv[1:]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.gpus}",
               "-m", "hybridize", *argv]
        return subprocess.call(cmd)
    config = TrainBenchConfig(**{f.name: getattr(args, f.name) for f in fields(TrainBenchConfig)})
    try:
        report = run_train_bench(config)
    except ValueError as e:
        raise HybridizeError(str(e)) from None
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_table(report))
        if args.json:
            _write_json(args.json, report)
    return 0


# ---------------------------------------------------------------------------------------------------------- heal


def add_heal_parser(sub) -> None:
    from .heal import HealConfig
    from .train.config import DistillConfig
    from .transfer.select import METHODS

    d, h = DistillConfig(), HealConfig()
    p = sub.add_parser(
        "heal",
        help="the whole healing job in one resumable command: convert, align, distill, (long context), evaluate",
        description=(
            "Convert SOURCE into a hybrid (its attention layers chosen by `select-layers --method kl` on --data "
            "unless --select-layers or a layout flag says otherwise; calibrated on --data unless --no-calibrate), "
            "then heal it in stages, each "
            "a `hybridize distill` run started from the "
            "previous one: align (per-layer hidden-state alignment, DeltaNet layers only) -> kd (end-to-end "
            "distillation) -> long (long windows, with --long-context-tokens) -> OUT/final, a normal model folder "
            "-> evaluation against SOURCE on each --eval-data (OUT/eval.json). Every stage keeps its checkpoints, "
            "metrics and curves.png in OUT/<stage>; after a crash, the same command with --resume skips the "
            "finished stages and continues the one in progress."
        ),
    )
    p.add_argument("source", metavar="SOURCE", help="the model to convert and distill from (the teacher): folder, "
                   "hub id or .gguf file")
    p.add_argument("out", metavar="OUT", help="the heal folder (created; must not exist unless --resume)")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="training text in any format `distill` reads (tokenized once per stage folder)")
    p.add_argument("--eval-data", nargs="+", default=[], metavar="PATH",
                   help="held-out text: each path is evaluated on its own at the end (perplexity ratio, KL, greedy "
                   "agreement); the first also serves --eval-every during the stages [default: no evaluation]")
    p.add_argument("--tokens", type=_count, default=h.tokens,
                   help=f"tokens of the end-to-end KD stage, e.g. 50M [default: {h.tokens:,}]")
    p.add_argument("--align-tokens", type=_count_or_zero, default=None,
                   help="tokens of the alignment stage; 0 skips it [default: 0 after calibration, which already "
                   "aligns each DeltaNet layer; --tokens / 20 with --no-calibrate]")
    p.add_argument("--align-lr", type=_float, default=h.align_lr,
                   help=f"peak learning rate of the alignment stage [default: {h.align_lr}]")
    p.add_argument("--long-context-tokens", type=_count_or_zero, default=h.long_context_tokens,
                   help="tokens of a last stage on long windows (--long-seq-len), the same tokens per step; 0 skips "
                   f"it [default: {h.long_context_tokens}]")
    p.add_argument("--long-seq-len", type=_positive_int, default=None,
                   help="window of the long-context stage [default: 4 x --seq-len]")
    p.add_argument("--long-lr", type=_float, default=None,
                   help="peak learning rate of the long-context stage [default: --lr / 10]")
    p.add_argument("--eval-tokens", type=_count, default=h.eval_tokens,
                   help=f"tokens evaluated per --eval-data path, and per --eval-every [default: {h.eval_tokens}]")
    p.add_argument("--eval-passkey", type=_lengths, default=None, metavar="LENGTHS",
                   help="also run passkey retrieval on the final model and SOURCE at these prompt lengths, e.g. "
                   "1k,2k,4k [default: no passkey check]")
    p.add_argument("--passkey-trials", type=_positive_int, default=h.passkey_trials,
                   help=f"passkey prompts per length and depth [default: {h.passkey_trials}]")
    _add_layout_flags(p)
    p.add_argument("--select-layers", choices=[*METHODS, "none"], default=None, metavar="METHOD",
                   help="choose the layers that stay attention with `hybridize select-layers --method METHOD` "
                   "(kl, passkey, kl+passkey or proxy; as many as the 3:1 pattern keeps) on --data (passkey: its "
                   "text) before "
                   "converting, on the GPU when there is one; the choice and the scores go to heal.json. 'none' "
                   "keeps the 3:1 pattern. Why kl+passkey: on SmolLM2-135M its layers healed to 31%% lower KL than "
                   "the pattern's and kept passkey retrieval, which the pattern and kl alone lose "
                   "(docs/BENCHMARKS.md); it costs a probe forward per layer on 16k tokens of each scan "
                   f"[default: {h.select_layers} (kl when --data is only .npy tokens), none when "
                   "--pattern/--period/--attention-layers is given; a --resume keeps the run's own choice]")
    p.add_argument("--weights-dtype", choices=list(DTYPES), default=None,
                   help="dtype of the converted and the final weights [default: the source's stored dtype]")
    add_calibrate_arguments(p, heal=True)
    _add_training_flags(p, d, eval_tokens=False)
    p.add_argument("--gpus", type=_positive_int, default=h.gpus,
                   help="run each training stage on this many GPUs of this machine (torchrun, FSDP2) [default: 1]")
    p.add_argument("--resume", action="store_true", help="continue the heal run in OUT: finished stages are skipped")
    p.add_argument("--override", action="store_true",
                   help="with --resume: accept settings that differ from the run's [default: refuse]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_heal)


def _count_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _count(text)


def _heal_calibration(args) -> dict:
    """heal calibrates on its training text unless --no-calibrate (which takes no calibration flag with it)."""
    if args.no_calibrate:
        given = [n for n in ("calibrate_data", *CALIBRATE_FLAGS) if getattr(args, n) is not None]
        if given:
            flag = "--" + given[0].replace("_", "-").replace("-data", "")
            raise HybridizeError(f"--no-calibrate and {flag} contradict each other; drop one")
        return {}
    args.calibrate_data = args.calibrate_data or args.data
    return _calibrate_kwargs(args)


def _heal_selection(args) -> str | None:
    """The heal run's --select-layers: the flag when given ('none' = None); none when a layout flag is given; on
    --resume the run's own recorded choice (runs from before selection became the default recorded none); else the
    default (kl for .npy-only data: the passkey scan needs text)."""
    from pathlib import Path

    from .heal import HealConfig, recorded_heal_settings
    from .train.data import needs_tokenizer

    layout = (args.pattern, args.period, args.attention_layers) != (None, None, None)
    if args.select_layers is not None:
        if args.select_layers != "none" and layout:
            raise HybridizeError("use either --select-layers or --pattern/--period/--attention-layers, not both")
        return None if args.select_layers == "none" else args.select_layers
    if layout:
        return None
    recorded = recorded_heal_settings(Path(args.out).expanduser()) if args.resume else None
    if recorded is not None:
        return recorded.get("select_layers")
    if "passkey" in HealConfig.select_layers and not needs_tokenizer(args.data):
        print("hybridize: note: --data holds only .npy tokens, so heal selects its attention layers with kl alone "
              "(the passkey scan builds its prompts from text); pass the text to have both scans", file=sys.stderr)
        return "kl"
    return HealConfig.select_layers


def cmd_heal(args) -> int:
    from dataclasses import fields
    from pathlib import Path

    from .heal import HealConfig, HealJob, run_heal
    from .train.config import DistillConfig
    from .transfer.config import CrossArchTransferConfig
    from .transfer.sources import read_source_config

    if "RANK" in os.environ:
        raise HybridizeError("run `hybridize heal` itself without torchrun; --gpus N runs its training stages on N "
                             "GPUs")
    source_config, family = read_source_config(args.source)  # cheap: config only, fails before any work
    if family == "qwen3_5_text":
        raise HybridizeError(f"{args.source} is already a hybrid (qwen3_5_text); heal converts an attention model "
                             "(Qwen3 / Llama family): continue a hybrid's healing with `hybridize distill`")
    args.select_layers = _heal_selection(args)
    attention = _attention_config(args, source_config.num_hidden_layers)
    _resolve_mtp(args)
    transfer = CrossArchTransferConfig(source_model=args.source, hybrid_attention=attention,
                                       gate_init_strategy=args.gate_init, seed=args.seed, **_heal_calibration(args))
    distill = DistillConfig(**{f.name: getattr(args, f.name) for f in fields(DistillConfig) if hasattr(args, f.name)
                               and f.name not in ("tokens", "eval_tokens")}, eval_tokens=args.eval_tokens)
    heal = HealConfig(**{f.name: getattr(args, f.name) for f in fields(HealConfig)})
    job = HealJob(source=args.source, out=Path(args.out), data=args.data, transfer=transfer, distill=distill,
                  heal=heal, eval_data=args.eval_data)
    summary = run_heal(job, resume=args.resume, override=args.override, progress=not args.no_progress)
    print(json.dumps(json_safe(summary), indent=2, default=str))
    return 0


# -------------------------------------------------------------------------------------------------------- corpus


def _root_pair(text: str) -> tuple[str, str]:
    """'NAME=DIR' -> (NAME, DIR)."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=DIR (e.g. bible=/opt/bible)")
    return name, folder


def add_corpus_parser(sub) -> None:
    from .train.corpus import CorpusConfig

    d = CorpusConfig()
    p = sub.add_parser(
        "corpus",
        help="build a multi-domain distillation corpus from text that Debian packages ship (offline)",
        description="Read real text that ships offline (technical docs, source code, man pages, licences, a "
        "dictionary, scripture, novels, humour; --list shows which are installed here), cut it into documents "
        "and write OUT/train.jsonl, OUT/val.jsonl (a hash split per document, the same on every machine), "
        "OUT/holdout.jsonl (every document of the --holdout source, none of it in train/val: a generalization "
        "test) and OUT/manifest.json (per source: package versions, files read, documents and characters). "
        "One {\"text\", \"source\", \"id\"} object a line; pass OUT/train.jsonl to `distill --data` and "
        "OUT/val.jsonl or OUT/holdout.jsonl to `--eval-data` / `eval --data`. benchmarks/build_corpus.sh "
        "installs the packages and builds the project's corpus.",
    )
    p.add_argument("output", metavar="OUT", nargs="?", help="folder to write (written to a temporary folder, "
                   "renamed into place when complete); not needed with --list")
    p.add_argument("--sources", nargs="+", metavar="NAME",
                   help="sources to read (see --list) [default: every known source installed here]")
    p.add_argument("--holdout", metavar="NAME", default=d.holdout,
                   help="a source written whole to OUT/holdout.jsonl and kept out of train and val (read even "
                   "when --sources leaves it out) [default: none]")
    p.add_argument("--val-fraction", type=_float, default=d.val_fraction,
                   help=f"share of each other source's documents that goes to val.jsonl [default: {d.val_fraction}]")
    p.add_argument("--max-mb-per-source", type=_float, metavar="N", default=d.max_mb_per_source,
                   help="keep at most N million characters of each source (a subset chosen by the document "
                   "hash, so no single large source dominates) [default: no limit]")
    p.add_argument("--seed", type=_int, default=d.seed,
                   help=f"salts the split hash: another seed, another train/val split and order [default: {d.seed}]")
    p.add_argument("--root", dest="roots", type=_root_pair, action="append", metavar="NAME=DIR",
                   help="read source NAME from DIR instead of where Debian installs it (repeatable)")
    p.add_argument("--list", action="store_true",
                   help="print the known sources, whether each is installed here, and the Debian packages that "
                   "provide them; build nothing")
    p.add_argument("--force", action="store_true", help="replace OUT if it already exists [default: refuse]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_corpus)


def add_sample_parser(sub) -> None:
    from .train.samples import SampleConfig

    d = SampleConfig()
    p = sub.add_parser(
        "sample",
        help="write text sampled from a model (the teacher) as a JSONL corpus for distill / heal --data",
        description="Sample documents from MODEL (the teacher: a Qwen3 / Llama folder, a GGUF file or a hybridize "
        "folder) and write them to OUT as JSONL ({\"text\", \"source\": \"samples\", \"id\", "
        "\"new_tokens\"} a line), a distillation source that covers the teacher's own distribution next to real "
        "text: `distill --data corpus/train.jsonl OUT`. Each document starts at the EOS token (a fresh document, "
        "as training data separates them) or, with --prompts, at the opening of a prompt document. Each batch has "
        "its own seed, so a stopped run continues where it stopped with the same command (OUT.partial) and gives "
        "the same file as an uninterrupted one. Runs on the GPU when there is one.",
    )
    p.add_argument("model", metavar="MODEL", help="the model to sample from (a folder or a .gguf file)")
    p.add_argument("output", metavar="OUT", help="JSONL file to write (built in OUT.partial, renamed when done)")
    p.add_argument("--tokens", type=_count, default=d.tokens,
                   help="new tokens to write, k/M suffixes allowed; the last batch may pass it [default: 1M]")
    p.add_argument("--max-new-tokens", type=_positive_int, default=d.max_new_tokens,
                   help=f"longest document in new tokens (one also ends at EOS) [default: {d.max_new_tokens}]")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"documents generated at once [default: {d.batch_size}]")
    p.add_argument("--temperature", type=_nonnegative_float, default=d.temperature,
                   help="sampling temperature; 1 is the model's own distribution, 0 greedy decoding of --prompts "
                   "(the text speculative decoding verifies: data for train-mtp when sampling from the hybrid) "
                   f"[default: {d.temperature}]")
    p.add_argument("--top-p", type=_positive_float, default=d.top_p,
                   help=f"nucleus sampling: keep the most likely tokens up to this much probability, 1 keeps all "
                   f"[default: {d.top_p}]")
    p.add_argument("--prompts", nargs="+", metavar="PATH",
                   help="text / JSONL / Parquet files or folders whose documents' openings start the samples, in "
                   "turn (steers the topics) [default: none: every sample starts a fresh document]")
    p.add_argument("--prompt-tokens", type=_positive_int, default=d.prompt_tokens,
                   help=f"tokens of each prompt document that open a sample [default: {d.prompt_tokens}]")
    p.add_argument("--seed", type=_int, default=d.seed,
                   help=f"random seed (each batch draws with its own: seed, batch) [default: {d.seed}]")
    _add_device_flag(p, "generates")
    p.add_argument("--force", action="store_true", help="replace OUT if it already exists [default: refuse]")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars: a line per batch on stderr instead (tokens written, tokens/s)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from dataclasses import fields

    from .train.samples import SampleConfig, sample_corpus

    config = SampleConfig(**{f.name: getattr(args, f.name) for f in fields(SampleConfig)})
    summary = sample_corpus(args.model, args.output, config, force=args.force, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_corpus(args) -> int:
    from dataclasses import fields

    from .train.corpus import CorpusConfig, build_corpus, format_source_list, list_sources

    values = {f.name: getattr(args, f.name) for f in fields(CorpusConfig)}
    values["roots"] = dict(args.roots or [])
    config = CorpusConfig(**values)
    if args.list:
        print(format_source_list(list_sources(config.roots)))
        return 0
    if not args.output:
        raise HybridizeError("corpus needs an OUT folder (or --list to see the sources)")
    manifest = build_corpus(args.output, config, progress=not args.no_progress)
    for name in manifest["skipped_absent"]:
        print(f"note: skipped {name} (not installed here; see hybridize corpus --list)", file=sys.stderr)
    summary = {name: {"documents": s["documents"], "mb": round(s["characters"] / 1e6, 2), "splits": {
        k: v["documents"] for k, v in s["splits"].items()}} for name, s in manifest["sources"].items()}
    print(json.dumps({"out": str(args.output), "outputs": manifest["outputs"], "sources": summary}, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hybridize",
        description="Turn a pretrained Qwen3 / Llama-family transformer into a Gated DeltaNet + gated-attention "
        "hybrid.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    add_convert_parser(sub)
    add_export_parser(sub)
    add_distill_parser(sub)
    add_heal_parser(sub)
    add_train_mtp_parser(sub)
    add_eval_parser(sub)
    add_plot_parser(sub)
    add_bench_parser(sub)
    add_select_parser(sub)
    add_analyze_parser(sub)
    add_train_etd_parser(sub)
    add_corpus_parser(sub)
    add_sample_parser(sub)
    return parser


def _os_message(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return " ".join(str(e).split())


def _interrupt(signum, frame):
    """SIGTERM (a job scheduler, `kill`) ends a run like Ctrl-C: temporary outputs are removed on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers' deprecation notices are not the user's business here
    hf_logging.disable_progress_bar()  # its per-file load/save bars; ours show the work that takes time
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    # fla's Triton kernels autotune on first use (186 s for SmolLM2 on a fresh H200): keep the winners in Triton's
    # on-disk cache beside the compiled kernels, so a resumed or repeated command does not tune again
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else 0
    except HybridizeError as e:
        message = " ".join(str(e).split())
    except OSError as e:
        message = _os_message(e)
    except KeyboardInterrupt:
        print("hybridize: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    print(f"hybridize: error: {message}", file=sys.stderr)
    return 2


def run() -> None:
    """The `hybridize` script and `python -m hybridize`: main(), then leave the process with its exit code."""
    code = main()
    parallelize = sys.modules.get("hybridize.train.parallelize")
    if parallelize is not None and parallelize.started_process_group():
        # A process group's gloo worker thread can still be dropping its last collective's tensors while the
        # interpreter finalizes; it then takes the GIL of a dying interpreter and aborts the process (SIGABRT,
        # "terminate called without an active exception", after a complete run: seen in 2-process CPU runs with
        # torch 2.13, the case of pytorch/pytorch#179291). Everything is written by now: flush and leave without
        # finalizing.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
