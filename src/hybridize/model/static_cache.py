"""A preallocated HybridCache: every state lives in a buffer allocated once, so a decoding step can be replayed as
a CUDA graph (`hybridize.model.decode_step`).

Same interface and semantics as HybridCache (snapshot / restore, per-position checkpoints and `rollback`,
`reorder_cache`, left padding); only the storage differs:

- attention KV: (B, Hkv, max_cache_len, d) buffers; new tokens are written at their slot, a forward reads the
  filled prefix (eager) or the whole buffer under the `valid` mask (the captured step). Cutting KV back is free:
  slots past `seq_length` are ignored and later overwritten.
- DeltaNet conv / recurrent states: fixed buffers updated in place (copy_), never replaced.
- DeltaNet per-position checkpoints (a verify step while `checkpointing`): fixed buffers per number of new tokens
  T, so a captured verify step writes them at the same addresses every replay; `rollback` reads them.
- `valid` (B, max_cache_len) bool: which slots hold real tokens (not padding, not a token rollback rejected, not
  yet written). The captured step derives positions and the attention mask from it on the device.

Buffers are allocated on first use from the shapes the layers write (batch, heads, dtype, device), so the same
cache serves any layer layout, ETD's extra per-iteration slots included. transformers' StaticCache was checked: it
holds KV only (no recurrent or conv state), so it cannot serve a DeltaNet layer.
"""

from __future__ import annotations

import torch

from .cache import HybridCache
from .config import HybridConfig


class StaticHybridCache(HybridCache):
    """HybridCache in buffers of `max_cache_len` tokens; `model.generate(..., cache_implementation="static")` makes
    one. One-token decoding steps on it run a fixed-buffer step, captured as a CUDA graph on CUDA when
    `cuda_graph` is not False; so do T-token forwards while `checkpointing` (speculative verify steps)."""

    # transformers' generate would torch.compile the forward for a compileable cache; this one captures its own
    # CUDA graph of the decoding step instead.
    is_compileable = False

    def __init__(self, config: HybridConfig, max_cache_len: int, cuda_graph: bool | None = None):
        super().__init__(config)
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}")
        self.max_cache_len = max_cache_len
        self.cuda_graph = cuda_graph  # None: on CUDA when the model allows it
        self.valid: torch.Tensor | None = None  # (B, max_cache_len) bool
        self.write_slot: torch.Tensor | None = None  # (1,) long: set while the fixed-buffer step runs
        self.decode_step = None  # the model's DecodeStep for this cache, built on the first fixed-buffer step
        self.mtp_heads = None  # speculative decoding's FixedMTPHeads on this cache (model/mtp_step.py), kept for reuse
        self._linear_buffers: dict[tuple[str, int], torch.Tensor] = {}
        self._checkpoint_buffers: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # T -> layer -> bufs

    # --- storage ------------------------------------------------------------------------------------------------
    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.key_cache:
            shape = (*k.shape[:2], self.max_cache_len, k.shape[3])
            self.key_cache[layer_idx] = k.new_zeros(shape)
            self.value_cache[layer_idx] = v.new_zeros(shape[:3] + v.shape[3:])
        keys, values = self.key_cache[layer_idx], self.value_cache[layer_idx]
        if self.write_slot is not None:  # the fixed-buffer step: write at a device index, attend under `valid`
            keys.index_copy_(2, self.write_slot, k)
            values.index_copy_(2, self.write_slot, v)
            return keys, values
        start, end = self.seq_length, self.seq_length + k.shape[2]
        self.check_room(k.shape[2])
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def check_room(self, new_tokens: int) -> None:
        if self.seq_length + new_tokens > self.max_cache_len:
            raise ValueError(f"the static cache holds {self.max_cache_len} tokens and has {self.seq_length}; "
                             f"{new_tokens} more do not fit: build it with a larger max_cache_len")

    def _set_linear(self, layer_idx: int, conv_state, recurrent_state) -> None:
        for kind, store, state in (("conv", self.conv_states, conv_state),
                                   ("recurrent", self.recurrent_states, recurrent_state)):
            if state is None:
                store[layer_idx] = None
                continue
            buffer = self._linear_buffers.get((kind, layer_idx))
            if buffer is None:
                buffer = self._linear_buffers[(kind, layer_idx)] = torch.empty_like(state)
            if buffer.data_ptr() != state.data_ptr():
                buffer.copy_(state)
            store[layer_idx] = buffer

    def _set_linear_states(self, states: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Every layer's states into its buffers in one launch (torch._foreach_copy_, as torch's optimizers batch
        their per-parameter updates): a rollback after a verify step otherwise costs two copies per DeltaNet layer."""
        pairs = [(self._linear_buffers.get((kind, i)), state) for i, both in states.items()
                 for kind, state in zip(("conv", "recurrent"), both, strict=True)]
        if any(buf is None or state is None or buf.shape != state.shape or buf.dtype != state.dtype
               for buf, state in pairs):
            return super()._set_linear_states(states)
        torch._foreach_copy_([buf for buf, _ in pairs], [state for _, state in pairs])
        for i in states:
            self.conv_states[i] = self._linear_buffers[("conv", i)]
            self.recurrent_states[i] = self._linear_buffers[("recurrent", i)]

    def _keep_checkpoints(self, layer_idx: int, conv_states: torch.Tensor, recurrent_states: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy a layer's per-position states (B, T, ...) into this cache's buffers for T tokens."""
        kept = self._checkpoint_buffers.setdefault(conv_states.shape[1], {})
        if layer_idx not in kept:
            kept[layer_idx] = (torch.empty_like(conv_states), torch.empty_like(recurrent_states))
        for buffer, state in zip(kept[layer_idx], (conv_states, recurrent_states), strict=True):
            buffer.copy_(state)
        return kept[layer_idx]

    def _keep_kv(self, length: int) -> None:
        """Nothing to cut: slots past `length` are masked by `valid` and rewritten by later tokens."""

    def state_tensors(self) -> list[torch.Tensor]:
        return super().state_tensors() + ([self.valid] if self.valid is not None else [])

    # --- bookkeeping: `valid` follows every change of length or padding ---------------------------------------
    def _sync_valid(self) -> None:
        if self.seq_length == 0 and self.valid is None:
            return
        if self.valid is None:
            batch, device = self._batch()
            self.valid = torch.zeros(batch, self.max_cache_len, dtype=torch.bool, device=device)
        n = self.seq_length
        self.valid[:, :n] = True if self.attention_mask is None else self.attention_mask
        self.valid[:, n:] = False

    def advance(self, seq_length: int, attention_mask: torch.Tensor | None) -> None:
        super().advance(seq_length, attention_mask)
        self._sync_valid()

    def advance_step(self, new_tokens: int) -> None:
        """After the fixed-buffer step (which marked its slots in `valid` on the device): `new_tokens` more. A replayed
        graph ran no Python, so the checkpoints `rollback` reads are named here, from the buffers it wrote."""
        self.seq_length += new_tokens
        self.last_length = new_tokens
        if self.attention_mask is not None:
            self.attention_mask = self.valid[:, : self.seq_length]
        if self.checkpointing:
            self._checkpoints = dict(self._checkpoint_buffers.get(new_tokens, {}))  # none without DeltaNet layers

    def grow(self, max_cache_len: int) -> None:
        """Room for `max_cache_len` tokens, keeping what the cache holds (speculative decoding: rows' rejected tokens
        leave holes, so the slots used can outrun the tokens kept). The KV buffers move, so the fixed-buffer step is
        rebuilt, its graphs captured again, on next use."""
        extra = max_cache_len - self.max_cache_len
        if extra <= 0:
            return
        for store in (self.key_cache, self.value_cache):
            for i, t in store.items():
                store[i] = torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], dim=2)
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], extra)], dim=1)
        self.max_cache_len = max_cache_len
        self.decode_step = None

    def rollback(self, n_keep) -> None:
        super().rollback(n_keep)
        self._sync_valid()

    def rollback_in_place(self, n_keep: torch.Tensor) -> None:
        """`rollback` for a device tensor n_keep (B,) that the host does not read: row b keeps the first n_keep[b]
        tokens of the last forward (a checkpointing fixed-buffer step) and its other slots become masked holes;
        every slot stays used, since which ones are free is not known here without a device-to-host copy (a sync
        that would stall the GPU each verify step). `reclaim` frees the trailing ones once the host knows the
        counts. n_keep is not range-checked (that would read it): 1 <= n_keep <= the forward's length."""
        step, T = self.decode_step, self.last_length
        if not self.checkpointing or T == 0:
            raise ValueError("rollback needs a forward run with cache.checkpointing = True")
        if step is None or (T, True) not in step.shapes:  # the forward was not the fixed-buffer step
            raise ValueError("rollback_in_place follows a fixed-buffer verify step; use rollback")
        step.rollback(n_keep)
        self._checkpoints = {}
        self.last_length = 0
        self.attention_mask = self.valid[:, : self.seq_length]

    def keep_verified(self, slots: torch.Tensor, n_keep: torch.Tensor, rows: torch.Tensor) -> None:
        """The device half of `rollback_in_place`, from device tensors only (so a CUDA graph can hold it): of the
        last step's T slots `slots` (T,), row b keeps the first n_keep[b] — its DeltaNet states from the
        per-position checkpoints, its later slots marked invalid. rows: arange(B)."""
        kept = torch.arange(slots.numel(), device=slots.device) < n_keep[:, None]  # (B, T)
        self.valid.index_copy_(1, slots, self.valid.index_select(1, slots) & kept)
        pick = (rows, n_keep - 1)
        self._set_linear_states({i: (conv[pick], rec[pick])
                                 for i, (conv, rec) in self._checkpoint_buffers.get(slots.numel(), {}).items()})

    def reclaim(self, length: int) -> None:
        """After `rollback_in_place`: the slots from `length` on hold no row's token, so the next tokens may use
        them (host bookkeeping, no device work: `valid` already masks them)."""
        if length > self.seq_length:
            raise ValueError(f"cannot reclaim from slot {length}: the cache holds {self.seq_length}")
        self.seq_length = length
        self.attention_mask = self.valid[:, :length]

    def restore(self, snap) -> None:
        super().restore(snap)
        self._sync_valid()

    def crop(self, max_length: int) -> None:
        super().crop(max_length)
        self._sync_valid()

    # --- reuse across generate calls ----------------------------------------------------------------------------
    @property
    def rows(self) -> int | None:
        """The batch size its buffers were allocated for (None before the first forward)."""
        return None if self.valid is None else self.valid.shape[0]

    def reset(self) -> None:
        """Empty, as if new, but keep every buffer and the decoding step's CUDA graphs captured on them."""
        self.conv_states.clear()  # a prefill then starts from no state; _set_linear refills the same buffers
        self.recurrent_states.clear()
        self.seq_length = self.last_length = 0
        self.attention_mask = None
        self.checkpointing = False
        self._checkpoints = {}
        if self.valid is not None:
            self.valid.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder rows in place, so that the buffers (and a captured graph) stay valid."""
        if self.attention_mask is not None:  # first: it may be a view of `valid`, which is rebuilt from it below
            self.attention_mask = self.attention_mask.index_select(0, beam_idx.to(self.attention_mask.device))
        for t in super().state_tensors():
            t.copy_(t.index_select(0, beam_idx.to(t.device)))
        self._sync_valid()


def static_cache_for(model, rows: int, max_cache_len: int) -> StaticHybridCache:
    """The StaticHybridCache of a generate call that decodes `rows` sequences of up to `max_cache_len` tokens: the
    cache of the model's previous call, reset, when its buffers hold as many rows on the same device and dtype and
    between 1 and 2 times the tokens (the captured step attends over the whole buffer under its mask, so a much
    longer one would slow every step) — so the decoding step's CUDA graphs, captured on those buffers, are replayed
    instead of captured again (two eager steps per kind of step and call otherwise) — else a new one, kept for the
    next call. The kept cache stays allocated between calls; `model.release_static_cache()` frees it."""
    held = getattr(model, "_reusable_static_cache", None)
    key = (rows, model.device, model.dtype)
    if (held is not None and held[0] == key and held[1].rows == rows
            and max_cache_len <= held[1].max_cache_len <= 2 * max_cache_len):
        held[1].reset()
        return held[1]
    model._reusable_static_cache = None  # drop the old buffers before allocating new ones
    cache = StaticHybridCache(model.config, max_cache_len)
    model._reusable_static_cache = (key, cache)
    return cache
