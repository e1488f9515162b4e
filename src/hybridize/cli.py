"""The `hybridize` command line.

    hybridize convert SOURCE OUTPUT [--pattern 0,1,2] [--period 4] [--attention-layers 3,7] [--gate-init ones]
                                    [--dtype bfloat16] [--dry-run] [--force] [--seed 0]
    hybridize export HYBRID_DIR OUT [--format qwen3_5] [--force]

User mistakes (bad flags, unsupported or broken sources, an existing output) print one line,
`hybridize: error: <message>`, on stderr and exit with status 2; never a traceback.
Each subcommand is one `add_<name>_parser` function plus one `cmd_<name>` function.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import HybridizeError
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


def add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a Qwen3 / Llama-family model into a Gated DeltaNet + gated-attention hybrid",
        description=(
            "Convert a pretrained Qwen3 / Llama-family model into a Gated DeltaNet + gated-attention hybrid by "
            "transferring its weights, and write it as a Hugging Face model folder (safetensors, config, tokenizer). "
            "Layer i becomes Gated DeltaNet when i % PERIOD is in PATTERN; the other layers stay softmax attention "
            "with a sigmoid output gate."
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
        help="random seed for the newly initialised parameters (DeltaNet projections, 'small' gates) [default: 0]",
    )
    p.set_defaults(func=cmd_convert)


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
    source_config, family = read_source_config(args.source)  # cheap: config only, fails before any work
    if family == "qwen3_5_text" and (args.pattern, args.period, args.attention_layers) != (None, None, None):
        raise HybridizeError(
            f"{args.source} is already a hybrid (qwen3_5_text); --pattern/--period/--attention-layers do not apply"
        )
    attention = _attention_config(args, source_config.num_hidden_layers)
    if args.dry_run:
        from .transfer.plan import conversion_plan

        dtype = resolve_dtype(args.dtype, source_config)
        hybrid_config = hybrid_config_for(source_config, family, attention, dtype)
        plan = {"source": args.source, **conversion_plan(source_config, family, hybrid_config, dtype)}
        print(json.dumps(plan, indent=2))
        return 0

    transfer = CrossArchTransferConfig(
        source_model=args.source, hybrid_attention=attention, gate_init_strategy=args.gate_init, seed=args.seed
    )
    summary = convert_to_folder(args.source, args.output, transfer, dtype=args.dtype, force=args.force)
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
    return parser


def _os_message(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers' deprecation notices are not the user's business here
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
    print(f"hybridize: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
