"""Inference speed: prefill and decode of the hybrid against transformers' model of its source, in one process.

Both models have random weights of the named shape (speed does not depend on the values), built directly in the
compute dtype. Each is timed the same way, through its own forward with its own cache (the hybrid's
HybridCache, transformers' DynamicCache):

    prefill  one forward over `length` tokens with the cache on (logits of the last position only), median of
             `repeats`; tok/s, peak memory, and the bytes of the cache it leaves
    decode   prefill `context` tokens at `batch` sequences (untimed), then `new_tokens` greedy one-token steps;
             tok/s = batch · new_tokens / time; the roofline is batch / (bytes read per step / copy bandwidth),
             bytes read = the weights (less the embedding table, which is gathered, not read) + the cache.
             The hybrid decodes on its StaticHybridCache (the CUDA-graph step on CUDA) and, with
             `compare_dynamic`, also on the dynamic HybridCache (`dynamic_tokens_per_s`); the source model on
             transformers' DynamicCache through its own forward.
    verify   (`verify_tokens`, the hybrid only) at each decode batch and the first decode context, on one
             StaticHybridCache: the one-token step, then the T-token speculative verify step (cache.checkpointing,
             T tokens, then a rollback keeping 1, so both kinds of step add one token per repeat and see the same
             cache), each step timed alone between device syncs, median of `new_tokens`; ms per step, the ratio
             to the one-token step, and the rollback's own ms (`rollback_in_place` + `reclaim`, what greedy
             speculative decoding runs). On CUDA all three are CUDA-graph replays.

The copy bandwidth is measured first (a device-to-device copy: read + write). Rows that run out of memory are
reported as such, not dropped. On CUDA, computing runs in bfloat16; on a CPU in float32 (the `tiny` shape there
takes seconds; it is what tests run).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..device import resolve_device
from ..model.modeling import HybridForCausalLM
from ..model.static_cache import StaticHybridCache
from ..ops.dispatch import fla_status, note_if_slow_path
from .common import build, device_name, profile_table, sync, versions

SMALL_SHAPES = ("tiny",)  # shapes whose default lengths are CPU-sized


@dataclass
class InferBenchConfig:
    """What `hybridize bench` (without --train) measures; fields map 1:1 onto its flags. Empty lists take the
    shape's defaults: the issue's grid (4k/32k/128k prefill; batch 1 and 32 at 1k and 32k context) for real
    shapes, a few hundred tokens for `tiny`. `model` (a hybridize folder) replaces the random hybrid of `shape`
    with real weights; `against` is then the source model to compare with (a folder, hub id or .gguf) or none."""

    shape: str = "qwen3-8b"
    model: str | None = None
    prefill_lengths: list[int] = field(default_factory=list)
    decode_batches: list[int] = field(default_factory=list)
    decode_contexts: list[int] = field(default_factory=list)
    new_tokens: int = 0  # 0 = the shape's default (64 on real shapes, 8 on tiny)
    repeats: int = 3
    against: str = "source"  # source (of --shape) | none | a model (folder, hub id, .gguf)
    compare_dynamic: bool = True  # also time the hybrid's decoding on its dynamic cache
    verify_tokens: list[int] = field(default_factory=list)  # T of the timed verify steps; empty = none
    largest_batch: bool = False  # CUDA: also decode at the largest batch each model fits, per decode context
    profile: bool = False  # CUDA: profile one prefill of the first length per model (kernels by kind)
    seed: int = 0

    def __post_init__(self):
        small = self.shape in SMALL_SHAPES
        self.prefill_lengths = self.prefill_lengths or ([128, 512] if small else [4096, 32768, 131072])
        self.decode_batches = self.decode_batches or ([1, 4] if small else [1, 32])
        self.decode_contexts = self.decode_contexts or ([64] if small else [1024, 32768])
        self.new_tokens = self.new_tokens or (8 if small else 64)
        values = [*self.prefill_lengths, *self.decode_batches, *self.decode_contexts, self.new_tokens, self.repeats,
                  *self.verify_tokens]
        if min(values) < 1:
            raise ValueError("lengths, batches, contexts, new tokens and repeats must all be >= 1")
        if self.model and self.against == "source":
            raise ValueError("with MODEL, --against names the model to compare with (the source it was converted "
                             "from: folder, hub id or .gguf) or none")
        if not self.model and self.against not in ("source", "none"):
            raise ValueError(f"--against {self.against}: a model to compare with needs MODEL (the hybrid to time); "
                             "with --shape it is 'source' or 'none'")


def copy_bandwidth(device: torch.device, megabytes: int | None = None) -> float:
    """Bytes per second of a large device-to-device copy, counting the read and the write (median of 5)."""
    size = (megabytes or (1024 if device.type == "cuda" else 128)) * 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * size / statistics.median(times[1:])


def tensor_bytes(obj, _seen: set | None = None) -> int:
    """Bytes of every distinct tensor reachable from a cache object (dicts, lists, attributes), e.g. a HybridCache
    or transformers' DynamicCache."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def weight_bytes_read(model: nn.Module) -> int:
    """Bytes of the weights one decode step reads: all parameters but an untied input embedding (gathered)."""
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - (0 if tied else embed.numel() * embed.element_size())


def _tokens(batch: int, length: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, length), generator=gen).to(device)


def _peak_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None


def cache_bytes(cache) -> int:
    """Bytes of a cache's state: the hybrid's own accounting, else every tensor reachable (transformers' caches)."""
    if hasattr(cache, "state_tensors"):
        return sum(t.numel() * t.element_size() for t in cache.state_tensors())
    return tensor_bytes(cache)


@torch.no_grad()
def measure_prefill(model: nn.Module, length: int, cfg: InferBenchConfig, device: torch.device) -> dict:
    ids = _tokens(1, length, model.config.vocab_size, cfg.seed, device)
    times, state = [], 0
    _peak_reset(device)
    for _ in range(cfg.repeats + 1):  # the first run warms up (kernel autotuning, allocator)
        sync(device)
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync(device)
        times.append(time.perf_counter() - start)
        state = cache_bytes(out.past_key_values)
        del out
    seconds = statistics.median(times[1:])
    return {"length": length, "seconds": round(seconds, 6), "tokens_per_s": round(length / seconds, 3),
            "cache_bytes": state, "cache_gb": round(state / 1e9, 4), "peak_gb": _peak_gb(device)}


@torch.no_grad()
def time_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int, cache=None) -> tuple[float, object]:
    """Seconds for `new_tokens` greedy one-token steps after prefilling `ids` (and one untimed step), and the cache.
    `cache` None: the model makes its own (use_cache=True)."""
    device = ids.device
    with warnings.catch_warnings():  # transformers >= 5.2x renames past_key_values; 5.17 (the GPU image) has no other
        warnings.simplefilter("ignore", FutureWarning)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        step = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)  # untimed warm-up
        token = step.logits[:, -1:].argmax(-1)
        sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens):
            step = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = step.logits[:, -1:].argmax(-1)
    sync(device)
    return time.perf_counter() - start, cache


def measure_decode(model: nn.Module, batch: int, context: int, cfg: InferBenchConfig, device: torch.device,
                   bandwidth: float) -> dict:
    ids = _tokens(batch, context, model.config.vocab_size, cfg.seed, device)
    _peak_reset(device)
    hybrid = isinstance(model, HybridForCausalLM)
    cache = StaticHybridCache(model.config, context + cfg.new_tokens + 2) if hybrid else None
    seconds, cache = time_decode(model, ids, cfg.new_tokens, cache)
    state = cache_bytes(cache)
    del cache
    row = {"batch": batch, "context": context, "tokens_per_s": round(batch * cfg.new_tokens / seconds, 3),
           "ms_per_step": round(1e3 * seconds / cfg.new_tokens, 4),
           "roofline_tokens_per_s": round(batch * bandwidth / (weight_bytes_read(model) + state), 1),
           "cache_gb": round(state / 1e9, 4), "peak_gb": _peak_gb(device)}
    if hybrid:
        row["cache"] = "static"
    if hybrid and cfg.compare_dynamic:
        _peak_reset(device)
        seconds, _ = time_decode(model, ids, cfg.new_tokens)
        row["dynamic_tokens_per_s"] = round(batch * cfg.new_tokens / seconds, 3)
    return row


def _step_ms(step, repeats: int, device: torch.device, after=None) -> tuple[float, float | None]:
    """Median ms of `step()` over `repeats` calls, each timed alone between device syncs, after two untimed calls
    (on CUDA: the eager warm-up, then the capture of the graph); and the median ms of `after()`, run untimed
    after each call (None without it)."""
    times, after_times = [], []
    for i in range(repeats + 2):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
        if after is not None:
            start = time.perf_counter()
            after()
            sync(device)
            after_times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), (1e3 * statistics.median(after_times[2:]) if after else None)


@torch.no_grad()
def measure_verify(model: nn.Module, batch: int, context: int, cfg: InferBenchConfig, device: torch.device
                   ) -> list[dict]:
    """The T-token verify step against the one-token step on the same static cache (see the module docstring);
    one row per T in cfg.verify_tokens."""
    vocab = model.config.vocab_size
    ids = _tokens(batch, context, vocab, cfg.seed, device)
    steps = cfg.new_tokens + 2  # each timed kind of step adds one token per call
    cache = StaticHybridCache(model.config, context + steps * (1 + len(cfg.verify_tokens)) + max(cfg.verify_tokens))
    token = model(input_ids=ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    one_ms, _ = _step_ms(lambda: model(input_ids=token, cache=cache), cfg.new_tokens, device)

    keep_one = torch.ones(batch, dtype=torch.long, device=device)

    def rollback() -> None:  # what greedy speculative decoding runs: in place, then the host frees the slots
        start = cache.seq_length - cache.last_length
        cache.rollback_in_place(keep_one)
        cache.reclaim(start + 1)
        cache.checkpointing = False

    rows = []
    for T in cfg.verify_tokens:
        drafts = _tokens(batch, T, vocab, cfg.seed + T, device)

        def verify(drafts: torch.Tensor = drafts) -> None:
            cache.checkpointing = True
            model(input_ids=drafts, cache=cache)

        ms, rollback_ms = _step_ms(verify, cfg.new_tokens, device, after=rollback)
        rows.append({"batch": batch, "context": context, "tokens": T, "ms_per_step": round(ms, 4),
                     "one_token_ms": round(one_ms, 4), "vs_one_token": _ratio(ms, one_ms),
                     "rollback_ms": round(rollback_ms, 4)})
    return rows


def _decode_peak(model: nn.Module, batch: int, context: int, cfg: InferBenchConfig, device: torch.device
                 ) -> int | None:
    """Peak bytes of prefilling `context` tokens at `batch` and two decode steps, or None when it runs out of memory."""
    ids = _tokens(batch, context, model.config.vocab_size, cfg.seed, device)
    _peak_reset(device)
    try:
        cache = StaticHybridCache(model.config, context + 4) if isinstance(model, HybridForCausalLM) else None
        time_decode(model, ids, 2, cache)
        return torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        ids = cache = None  # drop this probe's tensors before the allocator is emptied
        _peak_reset(device)


def largest_decode_batch(model: nn.Module, context: int, cfg: InferBenchConfig, device: torch.device,
                         capacity: int | None = None, peak=_decode_peak) -> int:
    """The largest batch that prefills `context` tokens (all rows at once, as generate does) and decodes in memory;
    0 when not even one row fits.

    Peak memory is linear in the batch (weights + per-row cache and activations), so two probes (batch 1 and 2)
    predict the limit; probes at the prediction step down by 10 % until one fits — two or three prefills instead of
    a bisection's dozen (a 32k-token prefill at batch 64 takes a minute). `capacity`: bytes available, default the
    device's total memory."""
    capacity = torch.cuda.get_device_properties(device).total_memory if capacity is None else capacity
    one, two = peak(model, 1, context, cfg, device), peak(model, 2, context, cfg, device)
    if one is None:
        return 0
    if two is None:
        return 1
    batch = max(2, int((0.98 * capacity - one) // max(two - one, 1)) + 1)
    while batch > 2 and peak(model, batch, context, cfg, device) is None:
        batch = max(2, int(batch * 0.9))
    return batch


def measure_largest_batch(model: nn.Module, context: int, cfg: InferBenchConfig, device: torch.device,
                          bandwidth: float) -> dict:
    """The decode row at the largest batch the model fits after `context` tokens (`largest_decode_batch`)."""
    batch = largest_decode_batch(model, context, cfg, device)
    if batch == 0:
        return {"batch": 0, "error": "out of memory"}
    return {"batch": batch, **_guarded(device, measure_decode, model, batch, context, cfg, device, bandwidth)}


def _guarded(device: torch.device, measure, *args) -> dict | list:
    """A row, or why there is none (out of memory is a result at long context, not a crash)."""
    try:
        return measure(*args)
    except torch.OutOfMemoryError:
        _peak_reset(device)
        return {"error": "out of memory"}


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _profiled(run) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    return profile_table(prof)


@torch.no_grad()
def profile_prefill(model: nn.Module, length: int, cfg: InferBenchConfig, device: torch.device) -> dict:
    """Where one prefill's GPU time goes (the kernels by kind)."""
    ids = _tokens(1, length, model.config.vocab_size, cfg.seed, device)
    return {"length": length, **_profiled(lambda: (model(input_ids=ids, use_cache=True, logits_to_keep=1),
                                                   sync(device)))}


@torch.no_grad()
def profile_decode_step(model: nn.Module, cfg: InferBenchConfig, device: torch.device) -> dict:
    """The hybrid's one-token step at batch 1 run eagerly (the kernels its CUDA graph replays): how many kernels a
    token costs and where their GPU time goes, after a prompt of the first decode context."""
    context = cfg.decode_contexts[0]
    ids = _tokens(1, context, model.config.vocab_size, cfg.seed, device)
    cache = StaticHybridCache(model.config, context + 4, cuda_graph=False)
    token = model(input_ids=ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
    model(input_ids=token, cache=cache)  # warm-up
    return {"context": context, **_profiled(lambda: (model(input_ids=token, cache=cache), sync(device)))}


def bench_model(name: str, model: nn.Module, cfg: InferBenchConfig, device: torch.device, bandwidth: float,
                rows: dict, save=lambda: None) -> None:
    """Fill `rows` (the model's part of the report) row by row, calling `save()` after each: a run cut short by a
    time limit keeps what it measured."""

    def add(part: str, row: dict | list) -> None:
        rows.setdefault(part, [])
        rows[part] += row if isinstance(row, list) else [row]
        save()

    rows.setdefault("prefill", [])
    rows.setdefault("decode", [])
    for length in cfg.prefill_lengths:
        _say(f"{name}: prefill {length} tokens")
        add("prefill", {"length": length, **_guarded(device, measure_prefill, model, length, cfg, device)})
    if cfg.profile and device.type == "cuda":  # after the timed rows: kernels compiled and autotuned, not profiled
        _say(f"{name}: profile")
        rows["profile"] = _guarded(device, profile_prefill, model, cfg.prefill_lengths[0], cfg, device)
        if isinstance(model, HybridForCausalLM):
            rows["profile_decode"] = _guarded(device, profile_decode_step, model, cfg, device)
        save()
    for context in cfg.decode_contexts:
        for batch in cfg.decode_batches:
            _say(f"{name}: decode batch {batch} after {context} tokens")
            add("decode", {"batch": batch, "context": context,
                           **_guarded(device, measure_decode, model, batch, context, cfg, device, bandwidth)})
    if cfg.largest_batch and device.type != "cuda":
        _say(f"{name}: --largest-batch needs a CUDA device (it probes GPU memory); skipped")
    elif cfg.largest_batch:
        for context in cfg.decode_contexts:
            _say(f"{name}: decode at the largest batch that fits after {context} tokens")
            add("decode", {"context": context, "largest": True,
                           **measure_largest_batch(model, context, cfg, device, bandwidth)})
    if isinstance(model, HybridForCausalLM) and cfg.verify_tokens:
        context = cfg.decode_contexts[0]
        for batch in cfg.decode_batches:
            _say(f"{name}: verify steps of {cfg.verify_tokens} tokens, batch {batch} after {context} tokens")
            found = _guarded(device, measure_verify, model, batch, context, cfg, device)
            add("verify", found if isinstance(found, list) else [
                {"batch": batch, "context": context, "tokens": T, **found} for T in cfg.verify_tokens])


def run_infer_bench(cfg: InferBenchConfig, save=lambda report: None) -> dict:
    """Every row for the hybrid and (against='source') transformers' source model; ratios hybrid / source.
    `save(report)` gets the report so far after every row (`complete` False until the end)."""
    device = resolve_device()
    note_if_slow_path(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(cfg.seed)
    bandwidth = copy_bandwidth(device)
    results: dict = {}
    report = {"config": asdict(cfg), "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
              "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "versions": versions(), "kernels": fla_status(),
              "complete": False, "results": results}
    for kind in ["hybrid"] + (["source"] if cfg.against != "none" else []):
        model = _model(kind, cfg, dtype, device)
        results[kind] = {"weights_gb": round(weight_bytes_read(model) / 1e9, 3)}
        bench_model(kind, model, cfg, device, bandwidth, results[kind], lambda: save(report))
        del model
        _peak_reset(device)
    if "source" in results:
        _add_ratios(results)
    report["complete"] = True
    save(report)
    return report


def _model(kind: str, cfg: InferBenchConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The hybrid or the source to time: MODEL / --against when given (real weights), else random ones of --shape."""
    path = cfg.model if kind == "hybrid" else cfg.against
    if not cfg.model:
        return build(kind, cfg.shape, dtype, device).eval()
    from ..errors import HybridizeError
    from ..train.models import load_language_model

    model = load_language_model(path, dtype, progress=False)
    if kind == "hybrid" and not isinstance(model, HybridForCausalLM):
        raise HybridizeError(f"{path} is not a hybridize model folder; convert it first (`hybridize convert`), or "
                             "pass it as --against to time it next to one")
    return model.to(device)


def _ratio(a: float, b: float) -> float:
    """a / b to 4 significant digits: a fixed number of decimals would lose most of a small ratio's digits."""
    return float(f"{a / b:.4g}")


def _add_ratios(results: dict) -> None:
    for part in ("prefill", "decode"):
        for mine, theirs in zip(results["hybrid"][part], results["source"][part], strict=True):
            if "tokens_per_s" in mine and "tokens_per_s" in theirs:
                mine["speed_vs_source"] = _ratio(mine["tokens_per_s"], theirs["tokens_per_s"])
            if mine.get("cache_bytes") and theirs.get("cache_bytes"):
                mine["cache_vs_source"] = _ratio(mine["cache_bytes"], theirs["cache_bytes"])


def _cell(row: dict, key: str, fmt: str) -> str:
    if "error" in row:
        return "OOM" if key == "tokens_per_s" else "-"
    value = row.get(key)
    return "-" if value is None else format(value, fmt)


def format_table(report: dict) -> str:
    cfg, res = report["config"], report["results"]
    models = list(res)
    what = f"model {cfg['model']}" if cfg.get("model") else f"shape {cfg['shape']}"
    lines = [f"inference, {what}, {report['dtype']}, {report['device']}, copy bandwidth "
             f"{report['copy_bandwidth_gb_s']} GB/s, kernels: {report['kernels']}",
             "prefill (batch 1)    " + "".join(f"{m + ' tok/s':>14}" for m in models)
             + f"{'× source':>10}{'cache GB':>10}{'× source':>10}"]
    for i, length in enumerate(cfg["prefill_lengths"]):
        rows = [res[m]["prefill"][i] for m in models]
        h = rows[0]
        lines.append(f"  {length:>8} tokens     " + "".join(f"{_cell(r, 'tokens_per_s', ',.0f'):>14}" for r in rows)
                     + f"{_cell(h, 'speed_vs_source', '.2f'):>10}{_cell(h, 'cache_gb', '.3f'):>10}"
                     f"{_cell(h, 'cache_vs_source', '.2f'):>10}")
    lines.append("decode (greedy)      " + "".join(f"{m + ' tok/s':>14}" for m in models)
                 + f"{'× source':>10}{'roofline':>10}{'of roof':>9}{'dynamic':>10}")
    for i, row in enumerate(res["hybrid"]["decode"]):
        rows = [res[m]["decode"][i] for m in models]
        roof = row.get("roofline_tokens_per_s")
        share = f"{row['tokens_per_s'] / roof:.0%}" if roof and "tokens_per_s" in row else "-"
        largest = " (largest batch each fits: " + ", ".join(f"{m} {r['batch']}" for m, r in zip(
            models, rows, strict=True)) + ")" if row.get("largest") else ""
        lines.append(f"  batch {row['batch']:>3} ctx {row['context']:>6} " + "".join(
            f"{_cell(r, 'tokens_per_s', ',.1f'):>14}" for r in rows) + f"{_cell(row, 'speed_vs_source', '.2f'):>10}"
            f"{_cell(row, 'roofline_tokens_per_s', ',.0f'):>10}{share:>9}"
            f"{_cell(row, 'dynamic_tokens_per_s', ',.1f'):>10}{largest}")
    verify = res["hybrid"].get("verify")
    if verify:
        lines.append(f"verify step (static cache)        {'ms':>10}{'1-token ms':>12}{'× 1-token':>11}"
                     f"{'rollback ms':>13}")
        for row in verify:
            lines.append(f"  batch {row['batch']:>3} ctx {row['context']:>6} T {row['tokens']:>3}  "
                         f"{_cell(row, 'ms_per_step', '.3f'):>10}{_cell(row, 'one_token_ms', '.3f'):>12}"
                         f"{_cell(row, 'vs_one_token', '.2f'):>11}{_cell(row, 'rollback_ms', '.3f'):>13}")
    for m in models:
        p = res[m].get("profile")
        if p and "by_kind_ms" in p:
            kinds = ", ".join(f"{k} {v:.0f}" for k, v in p["by_kind_ms"].items())
            lines.append(f"profile {m} prefill {p['length']}: GPU {p['gpu_ms']:.0f} ms, {p['kernels']} kernels: "
                         f"{kinds}")
        p = res[m].get("profile_decode")
        if p and "by_kind_ms" in p:
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in p["by_kind_ms"].items())
            lines.append(f"profile {m} decode step (eager, batch 1, context {p['context']}): GPU {p['gpu_ms']:.2f} "
                         f"ms, {p['kernels']} kernels: {kinds}")
    return "\n".join(lines)
