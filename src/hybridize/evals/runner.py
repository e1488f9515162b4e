"""What `hybridize eval MODEL --task passkey|niah` does, as a library call (the CLI only parses flags).

    filler → model (+ teacher) → one TaskBuilder on the model's tokenizer → every sample → greedy `generate`
    → exact-match scoring → accuracy per variant × length × depth, per model → JSON-able dict (+ `format_table`)

Both models answer the very same token ids, so the teacher's grid is the hybrid's reference cell by cell.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..device import resolve_device
from ..errors import HybridizeError
from .longctx import TASKS, Sample, TaskBuilder, is_correct, load_filler, make_samples

PROMPT_FORMATS = ("plain", "chat")
EVAL_DTYPES = ("auto", "bfloat16", "float32")


@dataclass
class LongContextConfig:
    """The flags of `hybridize eval --task`, one field each (None in `variants` = all of the task's variants)."""

    task: str = "passkey"
    variants: list[str] | None = None
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    depths: list[int] = field(default_factory=lambda: [0, 25, 50, 75, 100])
    trials: int = 10
    seed: int = 0
    data: list[str] | None = None
    prompt: str = "plain"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise HybridizeError(f"unknown --task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.variants is not None:
            unknown = [v for v in self.variants if v not in TASKS[self.task]]
            if unknown or not self.variants:
                raise HybridizeError(f"--variants for --task {self.task} are {', '.join(TASKS[self.task])}; got "
                                     f"{', '.join(self.variants) or 'none'}")
        if not self.lengths or min(self.lengths) < 1:
            raise HybridizeError(f"--lengths must be token counts >= 1, got {self.lengths}")
        if not self.depths or not all(0 <= d <= 100 for d in self.depths):
            raise HybridizeError(f"--depths must be percentages in [0, 100], got {self.depths}")
        if len(set(self.lengths)) != len(self.lengths) or len(set(self.depths)) != len(self.depths):
            raise HybridizeError("--lengths and --depths must not repeat a value")
        if self.trials < 1:
            raise HybridizeError(f"--trials must be >= 1, got {self.trials}")
        if self.prompt not in PROMPT_FORMATS:
            raise HybridizeError(f"--prompt must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt!r}")
        if self.dtype not in EVAL_DTYPES:
            raise HybridizeError(f"--dtype must be one of {', '.join(EVAL_DTYPES)}, got {self.dtype!r}")

    @property
    def variant_names(self) -> tuple[str, ...]:
        return tuple(self.variants) if self.variants else TASKS[self.task]


@torch.no_grad()
def generate_answer(model, tokenizer, sample: Sample, device: torch.device) -> str:
    """Greedy continuation of the sample's prompt (its own `max_new_tokens`), decoded without special tokens."""
    from transformers import GenerationConfig

    ids = torch.tensor([sample.input_ids], device=device)
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    pad = pad[0] if isinstance(pad, list) else pad
    config = GenerationConfig(do_sample=False, max_new_tokens=sample.max_new_tokens, eos_token_id=eos,
                              pad_token_id=pad)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _warn_beyond_positions(role: str, source: str, model, lengths: list[int]) -> int | None:
    """One line on stderr when a length exceeds the model's trained positions; returns that limit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    beyond = [n for n in lengths if limit and n > limit]
    if beyond:
        print(f"hybridize: warning: {role} {source}: lengths {', '.join(map(str, beyond))} exceed its "
              f"max_position_embeddings ({limit}); scores there measure extrapolation", file=sys.stderr)
    return limit


def _grid(samples: list[Sample], correct: list[bool], variant: str, config: LongContextConfig) -> dict:
    """accuracy[i][j]: share of right answers at lengths[i], depths[j]; mean over all cells."""
    cells = {(n, d): [0, 0] for n in config.lengths for d in config.depths}
    for s, ok in zip(samples, correct, strict=True):
        if s.variant == variant:
            cells[s.length, s.depth][0] += ok
            cells[s.length, s.depth][1] += 1
    grid = [[cells[n, d][0] / cells[n, d][1] for d in config.depths] for n in config.lengths]
    right, total = sum(c[0] for c in cells.values()), sum(c[1] for c in cells.values())
    return {"accuracy": grid, "mean": right / total}


def run_longctx(model: str, config: LongContextConfig, teacher: str | None = None, progress: bool = True) -> dict:
    """Accuracy of `model` (and `teacher`) on the config's long-context task; see the module docstring."""
    from ..train.config import DistillConfig
    from ..train.models import check_pair, load_language_model, load_tokenizer

    start = time.perf_counter()
    filler = load_filler(config.data)  # a bad --data fails before any model loads
    device = resolve_device()
    compute = DistillConfig(dtype=config.dtype).compute_dtype(device.type)
    sources = {"model": str(model), **({"teacher": str(teacher)} if teacher else {})}
    models = {role: load_language_model(source, compute).to(device) for role, source in sources.items()}
    if teacher:
        check_pair(models["teacher"], models["model"], align=False)
    tokenizer = load_tokenizer(*sources.values())
    chat = config.prompt == "chat"
    limits = {role: _warn_beyond_positions(role, sources[role], m, config.lengths) for role, m in models.items()}
    builder = TaskBuilder(tokenizer, filler, chat, config.seed)
    samples = make_samples(builder, config.variant_names, config.lengths, config.depths, config.trials,
                           progress)

    outputs: dict[str, list[str]] = {}
    with tqdm(total=len(samples) * len(models), desc=config.task, unit="prompt", disable=not progress) as bar:
        for role, lm in models.items():
            outputs[role] = []
            for s in samples:
                outputs[role].append(generate_answer(lm, tokenizer, s, device))
                bar.update()
    correct = {role: [is_correct(o, s.answers, s.kind, s.all_asked) for o, s in zip(out, samples, strict=True)]
               for role, out in outputs.items()}
    records = []
    for i, s in enumerate(samples):
        record = {"variant": s.variant, "length": s.length, "depth": s.depth, "trial": s.trial,
                  "prompt_tokens": len(s.input_ids), "answers": list(s.answers)}
        record.update({role: {"output": outputs[role][i], "correct": correct[role][i]} for role in models})
        records.append(record)
    return {
        "task": config.task, "model": sources["model"], "teacher": sources.get("teacher"),
        "config": asdict(config), "prompt_format": "chat" if chat else "plain", "filler": filler.source,
        "device": device.type, "dtype": str(compute).removeprefix("torch."), "max_position_embeddings": limits,
        "lengths": config.lengths, "depths": config.depths, "trials": config.trials,
        "results": {v: {role: _grid(samples, correct[role], v, config) for role in models}
                    for v in config.variant_names},
        "samples": records, "seconds": round(time.perf_counter() - start, 1),
    }


def format_table(result: dict) -> str:
    """Accuracy per variant as a length × depth table; cells read "model / teacher" when a teacher ran."""
    roles = [r for r in ("model", "teacher") if result.get(r)]
    lines = []
    for variant, by_role in result["results"].items():
        trials = f"{result['trials']} trial{'s' if result['trials'] != 1 else ''}"
        lines.append(f"{variant}: accuracy ({' / '.join(roles)}), {trials} a cell, rows = length in tokens, "
                     "columns = depth %")
        header = ["length"] + [f"{d}%" for d in result["depths"]] + ["mean"]
        rows = []
        for i, n in enumerate(result["lengths"]):
            cells = [" / ".join(f"{by_role[r]['accuracy'][i][j]:.2f}" for r in roles)
                     for j in range(len(result["depths"]))]
            mean = [sum(by_role[r]["accuracy"][i]) / len(result["depths"]) for r in roles]
            rows.append([str(n), *cells, " / ".join(f"{m:.2f}" for m in mean)])
        rows.append(["all", *[""] * len(result["depths"]), " / ".join(f"{by_role[r]['mean']:.2f}" for r in roles)])
        widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]
        for row in [header, *rows]:
            lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
