"""The hybrid cache: KV tensors for attention layers, (conv state, recurrent state) for DeltaNet layers.

Attention KV can be cut back to any length, but a DeltaNet state summarises the whole prefix and cannot: rolling
back (speculative decoding rejects drafted tokens) goes through `snapshot()` / `restore()` instead, which copy the
O(1)-size DeltaNet states and remember the KV length. Works with transformers' `generate` (see
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
        self.conv_states[layer_idx], self.recurrent_states[layer_idx] = conv_state, recurrent_state

    # --- what the model and generate call -------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

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
        for i in self.key_cache:
            self.key_cache[i] = self.key_cache[i][..., : snap.seq_length, :]
            self.value_cache[i] = self.value_cache[i][..., : snap.seq_length, :]
        self.conv_states = {i: c for i, (c, _) in snap.linear_states.items()}
        self.recurrent_states = {i: r for i, (_, r) in snap.linear_states.items()}
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
        for i in self.key_cache:
            self.key_cache[i] = self.key_cache[i][..., :max_length, :]
            self.value_cache[i] = self.value_cache[i][..., :max_length, :]
        if self.attention_mask is not None:
            self.attention_mask = self.attention_mask[:, :max_length]
        self.seq_length = max_length
