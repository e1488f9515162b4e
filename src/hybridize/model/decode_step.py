"""The fixed-buffer step on a StaticHybridCache — one new token (decoding) or T (a speculative verify step) —
with fixed input and output buffers, replayed as a CUDA graph.

Why: batch-1 decoding of an 8B hybrid is launch-bound — about a dozen kernels per layer and hundreds per token,
the GPU busy a small share of the wall time. A CUDA graph launches the whole step at once. The step computes what
HybridModel.forward computes for one new token, but everything that depends on how long the sequence is comes from
device tensors (the cache's `valid` mask and the write slot), not Python ints, so one captured graph serves every
step: positions = the real tokens before the new one (`valid` summed, so left padding and tokens that speculative
decoding rejected do not count, as in `prepare_step`), attention sees the `valid` slots, and the new K/V are
written at the slot with `index_copy_`.

A verify step (T new tokens while `cache.checkpointing`) is the same function with T slots: positions count the
valid tokens before each new one, the mask adds causality among the new tokens, and the DeltaNet layers write their
state after every position into per-T buffers the cache holds (`StaticHybridCache._keep_checkpoints`), which
`rollback` then reads. Shapes differ per T, so each T (with or without checkpoints) gets its own buffers and graph.
Speculative decoding's rollback after a verify step is a graph per T as well (`DecodeStep.rollback`): each row's
states picked at its accepted count, a device tensor, and its rejected slots marked invalid, with no host sync.

torch.compile(mode="reduce-overhead") (what transformers' generate does for its compileable static caches) was
considered: it would break its graph around fla's Triton kernels and the cache's Python bookkeeping; capturing
the eager step by hand (torch.cuda.graph) has neither problem. On a CPU the same fixed-buffer step runs eagerly,
which is what the tests compare against the dynamic cache.
"""

from __future__ import annotations

import sys

import torch

from .layers import fixed_buffer_step
from .static_cache import StaticHybridCache


def graph_blocker(model) -> str | None:
    """Why the decoding step of `model` cannot be captured as a CUDA graph, or None when it can."""
    if not getattr(model.model, "graph_capturable", False):
        return f"{type(model.model).__name__} keeps Python-side records of each forward (ETD's routing)"
    rope_type = model.config.rope_parameters.get("rope_type", "default")
    if "dynamic" in rope_type or rope_type == "longrope":
        return f"rope_type {rope_type!r} rescales its frequencies on the host as the sequence grows"
    return None


def is_decode_step(cache, input_ids, inputs_embeds, position_ids, labels, output_hidden_states) -> bool:
    """Whether a forward is a fixed-buffer step on a filled StaticHybridCache: one new real token per row or, while
    `cache.checkpointing` (a speculative verify step), T >= 1 of them."""
    return (isinstance(cache, StaticHybridCache) and input_ids is not None
            and (input_ids.shape[1] == 1 or cache.checkpointing) and input_ids.shape[1] >= 1
            and inputs_embeds is None and position_ids is None and labels is None and not output_hidden_states
            and cache.seq_length > 0 and not torch.is_grad_enabled())


class GraphPolicy:
    """Whether the GraphedCalls of one step run as CUDA graphs: `use_graph` turns False for all of them when one
    capture fails (a kernel that syncs with the host), unless `strict` (asked for explicitly), which raises."""

    def __init__(self, use_graph: bool, strict: bool, what: str, device: torch.device):
        self.use_graph, self.strict, self.what, self.device = use_graph, strict, what, device


class GraphedCall:
    """`fn()` on fixed input and output buffers, replayed as a CUDA graph under its policy: the first call runs
    eagerly on a side stream (Triton autotuning, cuBLAS workspaces and lazily allocated buffers happen outside the
    capture), the second captures the graph, every call from then on replays it and returns copies of its output
    tensors (the next replay overwrites them). Without graphs, `fn()` itself."""

    def __init__(self, fn, policy: GraphPolicy, label: str = ""):
        self.fn, self.policy, self.label = fn, policy, label
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out = None  # the graph's outputs: a tensor, a tuple of tensors, or None
        self.warmed_up = False

    def __call__(self):
        if not self.policy.use_graph:
            return self.fn()
        if not self.warmed_up:
            return self._warm_up()
        if self.graph is None and not self._capture():
            return self.fn()
        self.graph.replay()
        if isinstance(self.out, tuple):
            return tuple(t.clone() for t in self.out)
        return None if self.out is None else self.out.clone()

    def _warm_up(self):
        current = torch.cuda.current_stream(self.policy.device)
        side = torch.cuda.Stream(device=self.policy.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = self.fn()
        current.wait_stream(side)
        self.warmed_up = True
        return out

    def _capture(self) -> bool:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records, does not run
                self.out = self.fn()
        except RuntimeError as e:
            if self.policy.strict:
                raise
            self.policy.use_graph = False
            where = f" ({self.label})" if self.label else ""
            print(f"hybridize: note: {self.policy.what}{where} could not be captured as a CUDA graph "
                  f"({_root_cause(e)}); it runs eagerly, slower", file=sys.stderr)
            return False
        self.graph = graph
        return True


def _root_cause(error: BaseException) -> str:
    """The first error of a failed capture: the one that ended it ("operation failed due to a previous error during
    capture", raised by the capture's exit) hides the op that broke it, which Python keeps as its context."""
    while error.__context__ is not None:
        error = error.__context__
    return f"{type(error).__name__}: {' '.join(str(error).split())[:240]}"


class _Shape:
    """The buffers of the step for one number of new tokens T: a CUDA graph reads and writes fixed memory."""

    def __init__(self, step: DecodeStep, T: int):
        device = step.start.device
        self.ids = torch.zeros(step.batch, T, dtype=torch.long, device=device)
        self.offsets = torch.arange(T, device=device)  # new token i goes to slot start + i, position before + i
        self.call = GraphedCall(lambda: step._compute(self), step.policy, label=f"batch {step.batch}, {T} new tokens")
        self.n_keep = torch.ones(step.batch, dtype=torch.long, device=device)  # the rollback's input
        self.rollback = GraphedCall(lambda: step._rollback(self), step.policy,
                                    label=f"batch {step.batch}, rollback of {T} tokens")

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        return self.call.graph


class DecodeStep:
    """One model's fixed-buffer step on one StaticHybridCache; `__call__(input_ids)` (B, T) returns the final
    (normed) hidden states (B, T, D) — speculative decoding feeds them to its MTP heads — and logits (B, T, V)."""

    def __init__(self, model, cache: StaticHybridCache):
        if cache.valid is None:
            raise ValueError("the static cache is empty: run the prompt through the model first")
        self.model, self.cache = model, cache
        self.policy = graph_policy(model, cache, "the decoding step")
        self.batch = cache.valid.shape[0]
        device = cache.valid.device
        self.start = torch.zeros(1, dtype=torch.long, device=device)  # the first new token's slot
        self.key_slots = torch.arange(cache.max_cache_len, device=device)
        self.rows = torch.arange(self.batch, device=device)
        # (T, checkpointing) -> buffers and graph: a verify step also writes per-position checkpoints, a graph
        # captured without them must not stand in for it (nor the reverse), even at T == 1
        self.shapes: dict[tuple[int, bool], _Shape] = {}

    @property
    def use_graph(self) -> bool:
        return self.policy.use_graph

    @property
    def graph(self) -> torch.cuda.CUDAGraph | None:
        """The one-token step's graph (None until captured)."""
        shape = self.shapes.get((1, False))
        return None if shape is None else shape.graph

    def _compute(self, shape: _Shape) -> tuple[torch.Tensor, torch.Tensor]:
        backbone, cache = self.model.model, self.cache
        slots = self.start + shape.offsets  # (T,)
        x = backbone.embed_tokens(shape.ids)  # (B, T, D)
        positions = cache.valid.sum(-1, keepdim=True) + shape.offsets  # (B, T): real tokens before each new one
        cache.valid.index_fill_(1, slots, True)
        attn_mask = cache.valid[:, None, None, :]  # (B, 1, 1, max_cache_len)
        if shape.offsets.numel() > 1:  # causal among the new tokens: (B, 1, T, max_cache_len)
            attn_mask = attn_mask & (self.key_slots <= slots[:, None])
        cache.write_slot = slots
        try:
            with fixed_buffer_step():  # norms reuse their 1 + w, fused kernels: few launches per replay
                x = backbone.run_layers(x, backbone.rotary_emb(x, positions), attn_mask, None, cache, None)
                hidden = backbone.norm(x)
        finally:
            cache.write_slot = None
        return hidden, self.model.lm_head(hidden)

    def _rollback(self, shape: _Shape) -> None:
        self.cache.keep_verified(self.start + shape.offsets, shape.n_keep, self.rows)

    @torch.no_grad()
    def rollback(self, n_keep: torch.Tensor) -> None:
        """After a verify step of T tokens (`cache.checkpointing`): row b keeps its first n_keep[b] (B,) tokens, a
        device tensor never read on the host (no sync); one graph replay. The slots stay used (see
        StaticHybridCache.rollback_in_place)."""
        T = self.cache.last_length
        shape = self.shapes[(T, True)]
        shape.n_keep.copy_(n_keep)
        self.start.fill_(self.cache.seq_length - T)
        shape.rollback()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache, T = self.cache, input_ids.shape[1]
        cache.check_room(T)
        key = (T, bool(cache.checkpointing))
        shape = self.shapes.get(key)
        if shape is None:
            shape = self.shapes[key] = _Shape(self, T)
        shape.ids.copy_(input_ids)
        self.start.fill_(cache.seq_length)
        out = shape.call()
        cache.advance_step(T)
        return out


def graph_policy(model, cache: StaticHybridCache, what: str) -> GraphPolicy:
    """Graphs on CUDA unless the model cannot be captured or the cache says `cuda_graph=False`; `cuda_graph=True`
    on a model or device that cannot is a one-line error."""
    blocker = graph_blocker(model)
    on_cuda = cache.valid.is_cuda
    if cache.cuda_graph and (blocker or not on_cuda):
        why = blocker or "the cache is not on CUDA"
        raise ValueError(f"cuda_graph=True but the step cannot be captured: {why}")
    return GraphPolicy(on_cuda and blocker is None and cache.cuda_graph is not False, bool(cache.cuda_graph), what,
                       cache.valid.device)


def static_decode(model, cache: StaticHybridCache, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (B, T, D), logits (B, T, V)) of T new tokens per row, through the cache's DecodeStep for this model
    (built on first use, rebuilt for another model). The cache's buffers fix the batch size."""
    step = cache.decode_step
    if step is None or step.model is not model:
        step = cache.decode_step = DecodeStep(model, cache)
    if input_ids.shape[0] != step.batch:
        raise ValueError(f"the static cache holds {step.batch} sequences, got {input_ids.shape[0]} new tokens' rows")
    return step(input_ids)


def forward_new_tokens(model, cache, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(final normed hidden states, logits) of `input_ids` on top of `cache`: the fixed-buffer step when
    `is_decode_step` says the cache allows it (a StaticHybridCache), else the model's eager forward. The cache
    decides, so callers that need the hidden states (speculative decoding's verify step) need no branch."""
    if is_decode_step(cache, input_ids, None, None, None, False):
        return static_decode(model, cache, input_ids)
    hidden, _ = model.model(input_ids, cache=cache)
    return hidden, model.lm_head(hidden)
