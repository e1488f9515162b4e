"""Which layers keep softmax attention: `hybridize select-layers SOURCE --data PATH --keep K`.

Uniform placement (every fourth layer) ignores that layers differ in how much they need exact softmax attention:
KL-guided selection (arXiv 2512.20569) beats it at equal training tokens. The methods:

- `kl`: the importance of layer i is KL(teacher ‖ teacher with only layer i made Gated DeltaNet), per token on
  the calibration text, with layer i's DeltaNet as `hybridize convert` would make it (so a calibrated conversion
  gives a calibrated answer). The K layers whose conversion costs the most KL keep attention. The teacher is
  transformers' own model of the source, the probe an exact all-attention conversion with one decoder layer
  swapped at a time (about L/2 forward passes per batch).
- `passkey`: the same KL, but only at the answer tokens of passkey prompts (a 5-digit key hidden in filler from the
  data at depths spread over 0-100 %, the question, then the key, teacher-forced): the layers whose attention the
  teacher needs to retrieve. General text barely exercises retrieval, so `kl` can rank a retrieval layer low.
- `kl+passkey`: both scans; a layer's score is its share of the total `kl` score plus its share of the total
  `passkey` score, so the layers kept serve general text and retrieval alike. On SmolLM2 (docs/BENCHMARKS.md) the
  `kl` set healed to the lowest validation KL but kept no retrieval (passkey 2 %), the `passkey` set kept the most
  (28 %) at a higher KL; four layers were in both.
- `proxy`: no probe model, one teacher forward with attention weights: the importance of a layer is the share of
  its attention mass on keys more than `window` tokens back (averaged over heads and queries). Linear attention
  keeps a decaying summary and handles recency well; far, sharp retrieval is what it loses. Cheap, no conversion.

All return scores for every layer and the chosen layers in the form `convert --attention-layers` accepts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..device import resolve_device
from ..errors import HybridizeError
from ..model.config import FULL
from ..train.data import first_windows
from .config import CrossArchTransferConfig, HybridAttentionConfig

METHODS = ("kl", "passkey", "kl+passkey", "proxy")


@dataclass
class SelectConfig:
    """`hybridize select-layers` settings; fields map 1:1 onto its flags."""

    keep: int = 0  # 0: as many as the default 3:1 pattern keeps
    method: str = "kl"
    tokens: int = 16_384
    seq_len: int = 512
    batch_size: int = 4
    window: int = 64
    dtype: str = "float32"
    data: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.method not in METHODS:
            raise HybridizeError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.keep < 0 or self.tokens < 1 or self.seq_len < 2 or self.batch_size < 1 or self.window < 1:
            raise HybridizeError("need keep >= 0, tokens >= 1, seq_len >= 2, batch_size >= 1 and window >= 1")


def _batches(windows: torch.Tensor, batch_size: int):
    return [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]


def _passkey_batches(source: str, cfg: SelectConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids (1, T), targets (1, T)) per passkey prompt: `cfg.tokens // cfg.seq_len` prompts of at most
    `cfg.seq_len` tokens with the key's needle at depths spread evenly over 0-100 %, then the key; the targets
    are only the key's tokens (every other position is ignored)."""
    from ..evals.longctx import TaskBuilder, load_filler
    from ..train.losses import IGNORE_INDEX
    from ..train.models import load_tokenizer

    tokenizer = load_tokenizer(source)
    builder = TaskBuilder(tokenizer, load_filler(cfg.data), chat=False)
    count = max(1, cfg.tokens // cfg.seq_len)
    out = []
    for j in range(count):
        sample = builder.sample("passkey", cfg.seq_len, round(100 * j / max(count - 1, 1)), j)
        answer = list(tokenizer(" " + sample.answers[0], add_special_tokens=False)["input_ids"])
        ids = torch.tensor([[*sample.input_ids, *answer]])
        targets = torch.full_like(ids, IGNORE_INDEX)
        start = len(sample.input_ids)
        targets[0, start - 1: start - 1 + len(answer)] = ids[0, start:]
        out.append((ids, targets))
    return out


@torch.no_grad()
def kl_scores(source: str, batch_sets: list[list[tuple[torch.Tensor, torch.Tensor]]], cfg: SelectConfig,
              transfer: CrossArchTransferConfig, progress: bool = True) -> list[list[float]]:
    """For each set of (ids, targets) batches: per layer, KL(teacher ‖ the conversion that makes only that layer
    DeltaNet), nats per target token. The teacher and the probe models are built once for all sets.

    Layers before i are the same in both models, so each probe starts from the all-attention copy's input to
    layer i (computed once per batch) and runs only layers i..L−1: about L/2 layer passes per probe."""
    from ..train.losses import distillation_sums
    from ..train.models import load_language_model
    from ..train.objective import final_hidden
    from .convert import create_hybrid_from_qwen3

    dtype, device = getattr(torch, cfg.dtype), resolve_device()  # a KL scan: ~30 min on 2 CPU cores
    teacher = load_language_model(source, dtype, progress=progress).to(device)
    num_layers = teacher.config.num_hidden_layers
    as_attention = replace(transfer, hybrid_attention=HybridAttentionConfig(attention_layers=list(range(num_layers))))
    as_linear = replace(transfer, hybrid_attention=HybridAttentionConfig(attention_layers=[]))
    probe = create_hybrid_from_qwen3(source, as_attention, dtype=dtype).to(device)
    linear_layers = create_hybrid_from_qwen3(source, as_linear, dtype=dtype).model.layers.to(device)
    bar = tqdm(total=num_layers * sum(len(b) for batches in batch_sets for b, _ in batches),
               desc=f"select-layers ({cfg.method})", unit="window", disable=not progress)
    results = []
    for batches in batch_sets:
        sums = torch.zeros(num_layers, dtype=torch.float64)
        count = 0.0
        for batch, targets in batches:
            batch, targets = batch.to(device), targets.to(device)
            teacher_final, _ = final_hidden(teacher, batch, None, None, with_states=False)
            _, inputs = probe.model(batch, output_hidden_states=True)  # inputs[i]: what enters layer i
            positions = torch.arange(batch.shape[1], device=device)[None].expand(batch.shape[0], -1)
            rope = probe.model.rotary_emb(inputs[0], positions)
            for i in range(num_layers):
                x = linear_layers[i](inputs[i], rope)
                for layer in probe.model.layers[i + 1:]:
                    x = layer(x, rope)
                out = distillation_sums(probe.model.norm(x), probe.lm_head.weight, targets, teacher_final,
                                        teacher.lm_head.weight, chunk_tokens=4096)
                sums[i] += float(out["kd_sum"])
                bar.update(len(batch))
            count += float(out["count"])
        results.append((sums / max(count, 1.0)).tolist())
    bar.close()
    return results


@torch.no_grad()
def proxy_scores(source: str, windows: torch.Tensor, cfg: SelectConfig, progress: bool = True) -> list[float]:
    """Per layer, the teacher's share of attention probability on keys more than `cfg.window` tokens back."""
    from ..train.models import load_language_model

    device = resolve_device()
    teacher = load_language_model(source, getattr(torch, cfg.dtype), progress=progress).to(device)
    teacher.set_attn_implementation("eager")  # attention weights are only returned by the eager path
    T = windows.shape[1]
    steps = torch.arange(T, device=device)
    far = (steps[:, None] - steps[None, :]) > cfg.window  # (query, key)
    sums = torch.zeros(teacher.config.num_hidden_layers, dtype=torch.float64)
    batches = _batches(windows, cfg.batch_size)
    for batch in tqdm(batches, desc="select-layers (proxy)", unit="batch", disable=not progress):
        attentions = teacher(batch.to(device), output_attentions=True).attentions  # L × (B, H, T, T)
        for i, probs in enumerate(attentions):
            sums[i] += float((probs.float() * far).sum(-1).mean(dim=(1, 2)).sum())
    return (sums / len(windows)).tolist()


def select_attention_layers(source: str, cfg: SelectConfig, transfer: CrossArchTransferConfig | None = None,
                            progress: bool = True) -> dict:
    """Score every layer of `source` and pick the `cfg.keep` that keep softmax attention. Returns a report."""
    from .sources import read_source_config

    start = time.perf_counter()
    source = str(source)
    if not cfg.data:
        raise HybridizeError("select-layers needs --data: text to measure the layers on")
    for path in cfg.data:
        if not Path(path).expanduser().exists():
            raise HybridizeError(f"data path {path} does not exist")
    source_config, _ = read_source_config(source)
    num_layers = source_config.num_hidden_layers
    uniform = [i for i, t in enumerate(HybridAttentionConfig().layer_types(num_layers)) if t == FULL]
    keep = cfg.keep or len(uniform)
    if keep > num_layers:
        raise HybridizeError(f"--keep {keep} is more than the source's {num_layers} layers")
    transfer = transfer or CrossArchTransferConfig()
    parts = {}  # method part -> (scores, tokens)
    if cfg.method == "proxy":
        windows = first_windows(source, cfg.data, cfg.tokens, cfg.seq_len)
        parts["proxy"] = proxy_scores(source, windows, cfg, progress), windows.numel()
    scans = {part: _kl_batches(source, cfg, part) for part in ("kl", "passkey") if part in cfg.method.split("+")}
    if scans:
        for (part, batches), part_scores in zip(scans.items(), kl_scores(source, list(scans.values()), cfg, transfer,
                                                                         progress), strict=True):
            parts[part] = part_scores, sum(b.numel() for b, _ in batches)
    scores = combined_scores([s for s, _ in parts.values()])
    chosen = sorted(sorted(range(num_layers), key=lambda i: -scores[i])[:keep])
    report = {
        "source": source, "method": cfg.method, "keep": keep, "attention_layers": chosen,
        "flag": "--attention-layers " + ",".join(map(str, chosen)),
        "scores": [round(s, 6) for s in scores], "uniform_attention_layers": uniform,
        "tokens": int(sum(t for _, t in parts.values())), "seq_len": cfg.seq_len,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if len(parts) > 1:
        report["scores_by_method"] = {name: [round(x, 6) for x in s] for name, (s, _) in parts.items()}
    return report


def _kl_batches(source: str, cfg: SelectConfig, part: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, targets) of a KL scan: passkey prompts (targets at the key only), or the text's first windows."""
    from ..train.losses import next_token_targets

    if part == "passkey":
        return _passkey_batches(source, cfg)
    windows = first_windows(source, cfg.data, cfg.tokens, cfg.seq_len)
    return [(b, next_token_targets(b)) for b in _batches(windows, cfg.batch_size)]


def combined_scores(per_method: list[list[float]]) -> list[float]:
    """One method's scores as they are; several: per layer, the sum of its shares of each method's total."""
    if len(per_method) == 1:
        return per_method[0]
    totals = [max(sum(s), 1e-30) for s in per_method]
    return [sum(s[i] / total for s, total in zip(per_method, totals, strict=True)) for i in range(len(per_method[0]))]
