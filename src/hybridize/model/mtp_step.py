"""The MTP heads' work in greedy speculative decoding as fixed-buffer steps, replayed as CUDA graphs on CUDA.

Per verify step the heads draft k tokens (k − 1 applications of the MTP module and k lm_head argmaxes) and, after
the verify, take in every verified slot (one application over k + 1 slots). Run eagerly these are a few hundred
small kernels whose launches cost more than the verify forward itself (draft 4.2 ms + update 2.5 ms against a
5.2 ms graph-replayed verify on the healed SmolLM2, H200, 2026-12-03). Here each is one graph replay.

The MTP's KV lives in a static buffer whose slots mirror the backbone's StaticHybridCache slot for slot (slot s
holds the pair (backbone hidden at s, token at s + 1)), so the backbone cache's `valid` mask is also the MTP's:
rejected drafts are holes in both, and nothing needs rolling back. As in DecodeStep, everything that depends on
the sequence comes from device tensors — the first new slot `start`, `valid` — not from Python ints:

- update (T = k + 1 slots from `start`, after the backbone's rollback): every slot's pair is written, rows' holes
  included (masked everywhere later, overwritten by the next step); positions count the valid slots before
  `start`; each query sees the valid slots up to its own; the state kept is each row's at its last accepted slot.
- draft (k tokens): draft j reads the state, takes the argmax, and (j < k − 1) applies the module at slot
  `start + j`, past the sequence, seeing the valid slots and the drafts before it. Those slots are scratch: the
  next update rewrites them.

The eager reference is `_Run`'s dynamic MTP cache (mtp.py); tests compare the two draft for draft. Sampling keeps
the eager heads (its draws would need the generator's state inside the graph).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .config import FULL
from .decode_step import GraphedCall, graph_policy
from .layers import fixed_buffer_step
from .static_cache import StaticHybridCache


class FixedMTPHeads:
    """The MTP heads of one model on one StaticHybridCache (after its prefill): `prefill`, then per verify step
    `draft(k)` and `update(hidden, next_ids, n_accepted)`."""

    def __init__(self, model, cache: StaticHybridCache):
        self.model, self.cache = model, cache
        self.policy = graph_policy(model, cache, "the MTP heads' step")
        device, batch = cache.valid.device, cache.valid.shape[0]
        self.kv = StaticHybridCache(SimpleNamespace(layer_types=[FULL]), cache.max_cache_len, cuda_graph=False)
        self.key_slots = torch.arange(cache.max_cache_len, device=device)
        self.start = torch.zeros(1, dtype=torch.long, device=device)
        self.state = torch.zeros(batch, model.config.hidden_size, dtype=model.dtype, device=device)  # h at last kept
        self.drafts: dict[int, GraphedCall] = {}
        self.updates: dict[int, tuple[GraphedCall, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # --- the module on fixed slots --------------------------------------------------------------------------------
    def _apply(self, hidden, next_ids, slots, positions, attn_mask) -> torch.Tensor:
        mtp = self.model.mtp
        self.kv.write_slot = slots
        try:
            with fixed_buffer_step():
                x = mtp.fuse(hidden, self.model.model.embed_tokens(next_ids))
                x = mtp.layers[0](x, mtp.rotary_emb(x, positions), attn_mask=attn_mask, pad_mask=None, cache=self.kv)
                return mtp.norm(x)
        finally:
            self.kv.write_slot = None

    def _draft(self, k: int) -> torch.Tensor:
        valid, h, drafts = self.cache.valid, self.state, []
        before = valid.sum(-1, keepdim=True)  # (B, 1): real tokens so far
        for j in range(k):
            d = self.model.lm_head(h).argmax(-1)
            drafts.append(d)
            if j < k - 1:
                slot = self.start + j
                mask = (valid | (self.key_slots >= self.start)) & (self.key_slots <= slot)  # (B, S)
                h = self._apply(h[:, None], d[:, None], slot, before + j, mask[:, None, None])[:, 0]
        return torch.stack(drafts, 1)

    def _update(self, hidden: torch.Tensor, next_ids: torch.Tensor, n_accepted: torch.Tensor) -> None:
        valid, T = self.cache.valid, hidden.shape[1]
        offsets = torch.arange(T, device=hidden.device)
        slots = self.start + offsets
        before = (valid & (self.key_slots < self.start)).sum(-1, keepdim=True)  # (B, 1)
        mask = valid[:, None, :] & (self.key_slots <= slots[:, None])  # (B, T, S)
        h = self._apply(hidden, next_ids, slots, before + offsets, mask[:, None])
        self.state.copy_(h[torch.arange(h.shape[0], device=h.device), n_accepted])

    # --- what speculative decoding calls --------------------------------------------------------------------------
    def _follow_cache(self) -> None:
        """After the backbone cache grew (its KV buffers moved): grow the MTP's too and capture again."""
        if self.kv.max_cache_len != self.cache.max_cache_len:
            self.kv.grow(self.cache.max_cache_len)
            self.key_slots = torch.arange(self.cache.max_cache_len, device=self.key_slots.device)
            self.drafts.clear()
            self.updates.clear()

    @torch.no_grad()
    def prefill(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> None:
        """The prompt's slots (eager, like the backbone's prefill); the state at the last one."""
        self._follow_cache()
        self.kv.reset()
        h = self.model.mtp(hidden, self.model.model.embed_tokens(next_ids), attention_mask=self.cache.attention_mask,
                           cache=self.kv)
        self.state.copy_(h[:, -1])

    @torch.no_grad()
    def draft(self, k: int) -> torch.Tensor:
        """k greedy drafts (B, k) after the backbone cache's last slot."""
        self._follow_cache()
        if k not in self.drafts:
            self.drafts[k] = GraphedCall(lambda: self._draft(k), self.policy, label=f"{k} drafts")
        self.start.fill_(self.cache.seq_length)
        return self.drafts[k]()

    @torch.no_grad()
    def update(self, start: int, hidden: torch.Tensor, next_ids: torch.Tensor, n_accepted: torch.Tensor) -> None:
        """Take in the T verified slots from `start` (hidden (B, T, D), the token after each (B, T)), after the
        backbone's rollback; keep the state at each row's slot start + n_accepted."""
        self._follow_cache()
        T = hidden.shape[1]
        if T not in self.updates:
            bufs = (torch.empty_like(hidden), torch.empty_like(next_ids), torch.empty_like(n_accepted))
            call = GraphedCall(lambda: self._update(*bufs), self.policy, label=f"update, {T} tokens")
            self.updates[T] = (call, *bufs)
        call, *bufs = self.updates[T]
        for buf, value in zip(bufs, (hidden, next_ids, n_accepted), strict=True):
            buf.copy_(value)
        self.start.fill_(start)
        call()


def fixed_heads_for(model, cache: StaticHybridCache) -> FixedMTPHeads:
    """The cache's FixedMTPHeads for this model (kept on the cache, so calls that reuse the cache reuse its graphs)."""
    heads = cache.mtp_heads
    if heads is None or heads.model is not model or heads.state.shape[0] != cache.valid.shape[0]:
        heads = cache.mtp_heads = FixedMTPHeads(model, cache)
    return heads
