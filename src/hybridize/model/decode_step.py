"""The one-token decoding step on a StaticHybridCache: fixed input and output buffers, replayed as a CUDA graph.

Why: batch-1 decoding of an 8B hybrid is launch-bound — about a dozen kernels per layer and hundreds per token,
the GPU busy a small share of the wall time. A CUDA graph launches the whole step at once. The step computes what
HybridModel.forward computes for one new token, but everything that depends on how long the sequence is comes from
device tensors (the cache's `valid` mask and the write slot), not Python ints, so one captured graph serves every
step: positions = the real tokens before the new one (`valid` summed, so left padding and tokens that speculative
decoding rejected do not count, as in `prepare_step`), attention sees the `valid` slots, and the new K/V are
written at the slot with `index_copy_`.

torch.compile(mode="reduce-overhead") (what transformers' generate does for its compileable static caches) was
considered: it would break its graph around fla's Triton kernels and the cache's Python bookkeeping; capturing
the eager step by hand (torch.cuda.graph) has neither problem. On a CPU the same fixed-buffer step runs eagerly,
which is what the tests compare against the dynamic cache.
"""

from __future__ import annotations

import sys

import torch

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
    """Whether a forward is one new real token per row on a filled StaticHybridCache (the step this module runs)."""
    return (isinstance(cache, StaticHybridCache) and input_ids is not None and input_ids.shape[1] == 1
            and inputs_embeds is None and position_ids is None and labels is None and not output_hidden_states
            and cache.seq_length > 0 and not cache.checkpointing and not torch.is_grad_enabled())


class DecodeStep:
    """One model's one-token step on one StaticHybridCache; `__call__(input_ids)` returns logits (B, 1, V)."""

    def __init__(self, model, cache: StaticHybridCache):
        if cache.valid is None:
            raise ValueError("the static cache is empty: run the prompt through the model first")
        blocker = graph_blocker(model)
        on_cuda = cache.valid.is_cuda
        if cache.cuda_graph and (blocker or not on_cuda):
            why = blocker or "the cache is not on CUDA"
            raise ValueError(f"cuda_graph=True but the step cannot be captured: {why}")
        self.model, self.cache = model, cache
        self.use_graph = on_cuda and blocker is None and cache.cuda_graph is not False
        self.batch = cache.valid.shape[0]
        self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=cache.valid.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=cache.valid.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer
        self.warmed_up = False

    def _compute(self) -> torch.Tensor:
        backbone, cache = self.model.model, self.cache
        x = backbone.embed_tokens(self.ids)  # (B, 1, D)
        positions = cache.valid.sum(-1, keepdim=True)  # (B, 1): real tokens before this one
        cache.valid.index_fill_(1, self.slot, True)
        attn_mask = cache.valid[:, None, None, :]  # (B, 1, 1, max_cache_len)
        cache.write_slot = self.slot
        try:
            x = backbone.run_layers(x, backbone.rotary_emb(x, positions), attn_mask, None, cache, None)
        finally:
            cache.write_slot = None
        return self.model.lm_head(backbone.norm(x))

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        cache.check_room(1)
        self.ids.copy_(input_ids)
        self.slot.fill_(cache.seq_length)
        if not self.use_graph:
            logits = self._compute()
        elif not self.warmed_up:  # first step runs eagerly on a side stream (Triton autotuning, cuBLAS workspaces)
            logits = self._warm_up()
        else:
            if self.graph is None:
                self._capture()
            if self.graph is None:  # capture failed: the eager step, as on a CPU
                logits = self._compute()
            else:
                self.graph.replay()
                logits = self.logits.clone()  # the next replay overwrites the buffer
        cache.advance_one()
        return logits

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records, does not run
                self.logits = self._compute()
        except RuntimeError as e:  # a kernel that syncs with the host cannot be captured; decoding still works
            if self.cache.cuda_graph:  # asked for explicitly
                raise
            self.use_graph = False
            print(f"hybridize: note: the decoding step could not be captured as a CUDA graph "
                  f"({' '.join(str(e).split())[:160]}); it runs eagerly, slower", file=sys.stderr)
            return
        self.graph = graph

    def _warm_up(self) -> torch.Tensor:
        side = torch.cuda.Stream(device=self.ids.device)
        side.wait_stream(torch.cuda.current_stream(self.ids.device))
        with torch.cuda.stream(side):
            logits = self._compute()
        torch.cuda.current_stream(self.ids.device).wait_stream(side)
        self.warmed_up = True
        return logits


def static_decode(model, cache: StaticHybridCache, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, 1, V) of one new token per row, through the cache's DecodeStep for this model (built on first
    use, rebuilt for another model). The cache's buffers fix the batch size."""
    step = cache.decode_step
    if step is None or step.model is not model:
        step = cache.decode_step = DecodeStep(model, cache)
    if input_ids.shape[0] != step.batch:
        raise ValueError(f"the static cache holds {step.batch} sequences, got {input_ids.shape[0]} new tokens' rows")
    return step(input_ids)
