"""The hybrid cache: KV tensors for attention layers, (conv state, recurrent state) for DeltaNet layers.

Attention KV can be cut back to any length, but a DeltaNet state summarises the whole prefix and cannot: rolling
back (speculative decoding rejects drafted tokens) goes through `snapshot()` / `restore()` instead, which copy the
O(1)-size DeltaNet states and remember the KV length, or, for speculative decoding, through `checkpointing`:
then a multi-token forward keeps the DeltaNet state after every position and `rollback(n_keep)` picks one per row
(no replay). Works with transformers' `generate` (see
HybridForCausalLM.prepare_inputs_for_generation) and with beam search (`reorder_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LINEAR, HybridConfig


@dataclass
class CacheSnapshot:
    seq_length: int
    linear_states: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]]
    attention_mask: torch.Tensor | None


class HybridCache:
    """Per-layer decoding state of a HybridForCausalLM; one object for the whole model."""

    is_compileable = False

    def __init__(self, config: HybridConfig):
        self.layer_types = list(config.layer_types)
        self.key_cache: dict[int, torch.Tensor] = {}  # layer -> (B, Hkv, S, d)
        self.value_cache: dict[int, torch.Tensor] = {}
        self.conv_states: dict[int, torch.Tensor | None] = {}  # layer -> (B, conv_dim, kernel - 1)
        self.recurrent_states: dict[int, torch.Tensor | None] = {}  # layer -> (B, Hv, dk, dv) float32
        self.seq_length = 0  # tokens seen so far (padding included)
        self.attention_mask: torch.Tensor | None = None  # (B, seq_length) 2D padding mask, None = no padding
        self.checkpointing = False  # keep DeltaNet states after every position of a forward, for rollback()
        self.last_length = 0  # tokens the last forward added
        self._checkpoints: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (B, T, ...) conv, recurrent

    # --- what the layers call -------------------------------------------------------------------------------
    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.key_cache:
            k = torch.cat([self.key_cache[layer_idx], k], dim=-2)
            v = torch.cat([self.value_cache[layer_idx], v], dim=-2)
        self.key_cache[layer_idx], self.value_cache[layer_idx] = k, v
        return k, v

    def linear_state(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.conv_states.get(layer_idx), self.recurrent_states.get(layer_idx)

    def update_linear_state(self, layer_idx: int, conv_state, recurrent_state) -> None:
        """Store a DeltaNet layer's new state; while `checkpointing`, both carry a time axis (B, T, ...) holding
        the state after each position, and the last one becomes the current state."""
        if self.checkpointing:
            conv_state, recurrent_state = self._checkpoints[layer_idx] = self._keep_checkpoints(
                layer_idx, conv_state, recurrent_state)
            conv_state, recurrent_state = conv_state[:, -1], recurrent_state[:, -1]
        self._set_linear(layer_idx, conv_state, recurrent_state)

    # --- storage: the places where a static (preallocated) cache differs --------------------------------------
    def _set_linear(self, layer_idx: int, conv_state, recurrent_state) -> None:
        self.conv_states[layer_idx], self.recurrent_states[layer_idx] = conv_state, recurrent_state

    def _set_linear_states(self, states: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        for i, (conv, rec) in states.items():
            self._set_linear(i, conv, rec)

    def _keep_checkpoints(self, layer_idx: int, conv_states: torch.Tensor, recurrent_states: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a layer's per-position states (B, T, ...) live until `rollback`: here, the tensors themselves."""
        return conv_states, recurrent_states

    def _keep_kv(self, length: int) -> None:
        """Cut every layer's KV to its first `length` tokens."""
        for i in self.key_cache:
            self.key_cache[i] = self.key_cache[i][..., :length, :]
            self.value_cache[i] = self.value_cache[i][..., :length, :]

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor that holds decoding state (for memory accounting)."""
        stores = (self.key_cache, self.value_cache, self.conv_states, self.recurrent_states)
        return [t for store in stores for t in store.values() if t is not None]

    # --- what the model and generate call -------------------------------------------------------------------
    def advance(self, seq_length: int, attention_mask: torch.Tensor | None) -> None:
        """Called by the model after a forward: the cache now holds `seq_length` tokens with this padding mask."""
        self.last_length = seq_length - self.seq_length
        self.seq_length, self.attention_mask = seq_length, attention_mask

    def rollback(self, n_keep: torch.Tensor | int) -> None:
        """Keep only the first `n_keep[b]` tokens of the last forward in row b (a checkpointing forward; 1 <= n_keep
        <= its length), as if the rest had never been seen. DeltaNet states come from the per-position checkpoints,
        so nothing is recomputed. Rows may keep different counts: attention KV is cut to the longest row and the
        tokens a row rejected stay as masked holes (like padding: hidden from attention, not counted in positions).
        """
        T, past = self.last_length, self.seq_length - self.last_length
        if not self.checkpointing or T == 0:
            raise ValueError("rollback needs a forward run with cache.checkpointing = True")
        B, device = self._batch()
        n_keep = torch.as_tensor(n_keep).to("cpu", torch.long).expand(B)
        if int(n_keep.min()) < 1 or int(n_keep.max()) > T:
            raise ValueError(f"n_keep must lie in [1, {T}] (the last forward's length), got {n_keep.tolist()}")
        uniform = bool((n_keep == n_keep[0]).all())  # every row keeps as many (always at batch 1)
        if self._checkpoints:  # one index for every layer: a verify step's rollback is a few kernels per layer
            if uniform:  # a view, no gather
                pick = (slice(None), int(n_keep[0]) - 1)
            else:
                pick = (torch.arange(B, device=device), (n_keep - 1).to(device))
        self._set_linear_states({i: (conv[pick], rec[pick]) for i, (conv, rec) in self._checkpoints.items()})
        self._checkpoints = {}
        keep = past + int(n_keep.max())
        self._keep_kv(keep)
        self.seq_length, self.last_length = keep, 0
        if self.attention_mask is None and uniform:  # no holes before, none now: no mask to build (nor to sync on)
            return
        mask = self.attention_mask
        mask = torch.ones(B, past + T, dtype=torch.bool, device=device) if mask is None else mask.clone()
        mask[:, past:] &= (torch.arange(T)[None, :] < n_keep[:, None]).to(mask.device)  # (B, T): tokens kept
        self.attention_mask = None if bool(mask[:, :keep].all()) else mask[:, :keep]

    def _batch(self) -> tuple[int, torch.device]:
        for store in (self.key_cache, self.conv_states):
            for t in store.values():
                if t is not None:
                    return t.shape[0], t.device
        raise ValueError("rollback on an empty cache")
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether its state is a fixed-size recurrence (transformers' Cache attribute; generate reads
        it when a cache is passed in)."""
        return [t == LINEAR for t in self.layer_types]

    def __len__(self) -> int:
        return len(self.layer_types)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder every per-sequence state along the batch dimension (beam search)."""
        for store in (self.key_cache, self.value_cache, self.conv_states, self.recurrent_states):
            for i, t in store.items():
                if t is not None:
                    store[i] = t.index_select(0, beam_idx.to(t.device))
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask.index_select(0, beam_idx.to(self.attention_mask.device))

    def snapshot(self) -> CacheSnapshot:
        """Remember the current position: copies of the DeltaNet states, the KV length and the padding mask."""

        def copy(t):
            return None if t is None else t.clone()

        states = {i: (copy(self.conv_states.get(i)), copy(self.recurrent_states.get(i))) for i in self.conv_states}
        mask = copy(self.attention_mask)
        return CacheSnapshot(self.seq_length, states, mask)

    def restore(self, snap: CacheSnapshot) -> None:
        """Go back to a snapshot taken earlier on this cache: DeltaNet states restored, KV cut to its length."""
        if snap.seq_length > self.seq_length:
            raise ValueError(f"cannot restore to position {snap.seq_length}: the cache holds {self.seq_length}")
        self._keep_kv(snap.seq_length)
        for i in set(self.conv_states) - set(snap.linear_states):  # layers first run after the snapshot
            self._set_linear(i, None, None)
        for i, (conv, rec) in snap.linear_states.items():
            self._set_linear(i, conv, rec)
        self.attention_mask = snap.attention_mask
        self.seq_length = snap.seq_length

    def crop(self, max_length: int) -> None:
        """Cut attention KV to `max_length`; DeltaNet states cannot be cut, so this only works with no DeltaNet."""
        if max_length < 0:
            max_length = self.seq_length + max_length
        if max_length >= self.seq_length:
            return
        if any(t == LINEAR for t in self.layer_types):
            raise ValueError("DeltaNet states cannot be cropped; take a snapshot() before and restore() it")
        self._keep_kv(max_length)
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[:, :max_length]
        self.seq_length = max_length
