"""Text sampled from the teacher itself: a distillation source that covers the teacher's own distribution.

A student healed on a narrow corpus learns that corpus, not its teacher (the SmolLM2 hybrid: 1.12x the teacher's
perplexity on the validation split, 1.71x on the held-out King James Bible). Documents the teacher writes from its
own document start cover what it knows, in every register it writes, and cost nothing but GPU time; sequence-level
KD (Kim & Rush 2016) and MiniLLM train students on them. `sample_corpus` writes them as a JSONL corpus that
`distill --data` / `heal --data` read next to the real text:

    {"text": ..., "source": "samples", "id": "b<batch>r<row>", "new_tokens": n}

Each batch is drawn with its own seed (seed, batch index), so a run stopped at any point and continued with the same
command writes the same file as an uninterrupted one: finished batches are appended to OUT.partial and flushed, and
OUT appears (renamed) only when the token budget is reached. Generation is transformers' `generate` on the loaded
model (any source `load_language_model` reads: a hybridize folder, a Qwen3 / Llama folder, a GGUF file).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..device import resolve_device
from ..errors import HybridizeError
from ..model.modeling import HybridForCausalLM
from ..output import check_output_folder
from .data import iter_documents
from .models import load_language_model, load_tokenizer


@dataclass
class SampleConfig:
    """What `hybridize sample` draws. Defaults: 1M new tokens of 512-token documents, the teacher's own
    distribution (temperature 1) with its least likely 5 % of mass cut (top-p 0.95), from the document start.
    Temperature 0 is greedy decoding of prompt openings: the text speculative decoding sees, on which MTP heads
    can be trained (`train-mtp --data`) with the inputs they get when drafting."""

    tokens: int = 1_000_000  # new tokens to write (the last batch may pass it)
    max_new_tokens: int = 512  # per document; a document also ends at the EOS token
    batch_size: int = 32
    temperature: float = 1.0  # 0: greedy (needs prompts)
    top_p: float = 0.95
    prompts: list[str] | None = None  # text files / JSONL whose documents' openings start the samples
    prompt_tokens: int = 16  # how much of each prompt document opens a sample
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for name in ("tokens", "max_new_tokens", "batch_size", "prompt_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise HybridizeError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.temperature >= 0:
            raise HybridizeError(f"temperature must be >= 0 (0: greedy), got {self.temperature!r}")
        if self.temperature == 0 and not self.prompts:
            raise HybridizeError("temperature 0 (greedy) without prompts writes the same document every time: give "
                                 "prompts (--prompts) whose openings the model continues")
        if not 0 < self.top_p <= 1:
            raise HybridizeError(f"top_p must lie in (0, 1], got {self.top_p!r}")


def _openings(config: SampleConfig, tokenizer, start: int) -> list[list[int]]:
    """The prompts, as token ids: [start] alone (a fresh document), or [start] + the first prompt_tokens tokens of
    each --prompts document, in order."""
    if not config.prompts:
        return [[start]]
    n = config.prompt_tokens
    openings = [[start, *tokenizer(doc[: 20 * n], add_special_tokens=False)["input_ids"][:n]]
                for doc in iter_documents(config.prompts)]
    if not openings:
        raise HybridizeError(f"no text found in {', '.join(map(str, config.prompts))} to open samples with")
    return openings


def _settings(source, config: SampleConfig) -> dict:
    """What decides each batch's content: not the device (up to kernels' rounding), nor the token budget (a run
    continued with a larger --tokens writes more batches of the same kind)."""
    return {"source": str(source), **{k: v for k, v in asdict(config).items() if k not in ("device", "tokens")}}


def _resume(partial: Path, settings: dict) -> tuple[int, int]:
    """(batches done, new tokens written) of an OUT.partial left by a stopped run of the same settings (kept
    beside it in OUT.partial.json); a torn last line is cut off."""
    recorded = partial.with_name(partial.name + ".json")
    if not partial.is_file():
        recorded.write_text(json.dumps(settings, indent=1))
        return 0, 0
    try:
        before = json.loads(recorded.read_text())
    except (OSError, ValueError):
        before = None
    if before != settings:
        raise HybridizeError(f"{partial} was left by a run with other settings ({recorded.name}); continue it with "
                             f"those, or delete both files to start again")
    data = partial.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        partial.write_bytes(complete)
    batches = tokens = 0
    for line in complete.decode("utf-8").splitlines():
        try:
            record = json.loads(line)
            batches = max(batches, int(record["id"].split("r")[0][1:]) + 1)
            tokens += int(record["new_tokens"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HybridizeError(f"{partial} is not a partial sample file of this command; delete it to start "
                                 f"again") from None
    return batches, tokens


@torch.no_grad()
def _draw(model, tokenizer, rows: list[list[int]], config: SampleConfig, seed: int, eos: int
          ) -> list[tuple[str, int]]:
    """One batch: (text, new tokens) per row, the text decoded from the opening and the new tokens up to EOS."""
    batch = tokenizer.pad({"input_ids": rows}, padding=True, padding_side="left", return_tensors="pt").to(model.device)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    torch.manual_seed(seed)
    how = (dict(do_sample=False) if config.temperature == 0 else
           dict(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0))
    if isinstance(model, HybridForCausalLM):  # its decode engine: the fixed-buffer step, CUDA graphs on a GPU
        how["cache_implementation"] = "static"
    out = model.generate(ids, attention_mask=mask, max_new_tokens=config.max_new_tokens, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id, **how)
    docs = []
    for opening, new in zip(rows, out[:, ids.shape[1]:].tolist(), strict=True):
        new = new[: new.index(eos)] if eos in new else new
        docs.append((tokenizer.decode(opening[1:] + new, skip_special_tokens=True), len(new)))
    return docs


def sample_corpus(source: str | Path, out: str | Path, config: SampleConfig, force: bool = False,
                  progress: bool = True) -> dict:
    """Write `config.tokens` new tokens of text sampled from `source` to the JSONL file `out` (see the module
    docstring); returns a summary. A stopped run continues from OUT.partial with the same command."""
    out = check_output_folder(out, force=force, inputs=[source, *(config.prompts or [])], what="OUT")
    partial = out.with_name(out.name + ".partial")
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(source)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise HybridizeError(f"the tokenizer of {source} has no EOS token to end (and start) documents with")
    if tokenizer.pad_token_id is None:  # left padding of the prompt openings (masked out)
        tokenizer.pad_token_id = eos
    openings = _openings(config, tokenizer, eos)  # EOS separates documents in training: after it, a new one
    model = load_language_model(source, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                progress=progress).to(device)
    batch, written = _resume(partial, _settings(source, config))
    documents, new_this_run, start = 0, 0, time.perf_counter()
    with open(partial, "a", encoding="utf-8") as f, tqdm(total=config.tokens, initial=min(written, config.tokens),
                                                         unit="tok", desc="sample", disable=not progress) as bar:
        while written < config.tokens:
            first = batch * config.batch_size
            rows = [openings[(first + r) % len(openings)] for r in range(config.batch_size)]
            docs = _draw(model, tokenizer, rows, config, config.seed * 1_000_003 + batch, eos)
            f.write("".join(json.dumps({"text": text, "source": "samples", "id": f"b{batch}r{r}", "new_tokens": n})
                            + "\n" for r, (text, n) in enumerate(docs)))
            f.flush()
            os.fsync(f.fileno())
            new = sum(n for _, n in docs)
            written, batch, documents = written + new, batch + 1, documents + len(docs)
            new_this_run += new
            bar.update(min(new, config.tokens - bar.n))
            if not progress:  # a log line per batch instead of the bar: how far, how fast
                print(f"sample: batch {batch}: {written:,} / {config.tokens:,} new tokens, "
                      f"{new_this_run / (time.perf_counter() - start):,.0f} tokens/s", file=sys.stderr, flush=True)
    os.replace(partial, out)
    partial.with_name(partial.name + ".json").unlink()
    seconds = time.perf_counter() - start
    return {"out": str(out), "batches": batch, "new_tokens": written, "documents_this_run": documents,
            "new_tokens_this_run": new_this_run, "seconds_this_run": round(seconds, 1),
            "tokens_per_second": round(new_this_run / seconds, 1), "device": str(device)}


__all__ = ["SampleConfig", "sample_corpus"]
