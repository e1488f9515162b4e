"""Decoder layer, HybridModel and HybridForCausalLM: a first-class transformers model (generate, save/load, Auto*)."""

from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import HybridCache
from .config import LINEAR, HybridConfig, layer_stats
from .layers import MLP, GatedAttention, GatedDeltaNet, GatedRMSNorm, RMSNorm, RotaryEmbedding

# transformers renamed the output's `past_key_values` field to `cache` after 5.17; generate reads whichever exists.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class HybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        if self.layer_type == LINEAR:
            self.linear_attn = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = GatedAttention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attn_mask=None, pad_mask=None, cache=None, mlp=None):
        """`mlp` replaces self.mlp for this call (ETD's LoRA experts wrap it); `cache` may be any object with the
        HybridCache layer interface (ETD passes a view with per-iteration slots)."""
        h = self.input_layernorm(hidden_states)
        if self.layer_type == LINEAR:
            h = self.linear_attn(h, pad_mask=pad_mask, cache=cache)
        else:
            h = self.self_attn(h, position_embeddings, attn_mask=attn_mask, cache=cache)
        hidden_states = hidden_states + h
        return hidden_states + (mlp or self.mlp)(self.post_attention_layernorm(hidden_states))


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Random init for training from scratch; converted models overwrite every tensor (see transfer/init.py)."""
        if isinstance(module, RotaryEmbedding):  # non-persistent buffer: recomputed, never loaded
            inv_freq, _ = module.compute_inv_freq(module.inv_freq.device)
            init.copy_(module.inv_freq, inv_freq)
            module.original_inv_freq = inv_freq
            return
        super()._init_weights(module)
        if isinstance(module, RMSNorm):
            init.zeros_(module.weight)  # x̂·(1+w): w = 0 is the identity
        elif isinstance(module, GatedRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, GatedDeltaNet):
            init.zeros_(module.A_log)
            init.ones_(module.dt_bias)


def _padding_mask(attention_mask, cache: HybridCache | None, past: int, T: int, batch: int):
    """(B, past+T) bool mask of real tokens, or None when nothing is padded. Accepts a mask for all tokens or new."""
    if attention_mask is None:
        mask = None if cache is None or cache.attention_mask is None else torch.cat(
            [cache.attention_mask, cache.attention_mask.new_ones(batch, T)], dim=1)
        return mask
    if attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a 2D (batch, sequence) padding mask")
    mask = attention_mask.bool()
    if mask.shape[1] == T and past > 0:  # only the new tokens' mask was given
        prev = cache.attention_mask if cache.attention_mask is not None else mask.new_ones(batch, past)
        mask = torch.cat([prev, mask], dim=1)
    if mask.shape[1] != past + T:
        raise ValueError(f"attention_mask covers {mask.shape[1]} tokens, expected {past + T} (cached + new)")
    return None if bool(mask.all()) else mask


def _attention_mask(pad: torch.Tensor | None, past: int, T: int, device) -> torch.Tensor | None:
    """Boolean (B|1, 1, T, past+T) mask for SDPA, or None when plain causal attention (is_causal) is exact."""
    if pad is None and (past == 0 or T == 1):
        return None
    q_pos = torch.arange(past, past + T, device=device)[:, None]
    k_pos = torch.arange(past + T, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]  # (1, 1, T, S)
    if pad is not None:
        # padded keys are hidden; a padded query still sees itself so that no softmax row is empty
        mask = mask & (pad[:, None, None, :] | (k_pos == q_pos)[None, None])
    return mask


class HybridModel(HybridPreTrainedModel):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        config.validate_architecture()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                output_hidden_states=False):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        pad = _padding_mask(attention_mask, cache, past, T, B)
        if position_ids is None:
            if pad is None:
                position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
            else:  # left padding: real tokens count from 0
                position_ids = (pad.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        attn_mask = _attention_mask(pad, past, T, x.device)
        new_pad = None if pad is None else pad[:, -T:]
        position_embeddings = self.rotary_emb(x, position_ids)
        hidden_states = [x] if output_hidden_states else None
        x = self.run_layers(x, position_embeddings, attn_mask, new_pad, cache, hidden_states)
        if cache is not None:
            cache.seq_length = past + T
            cache.attention_mask = pad
        return self.norm(x), hidden_states

    def run_layers(self, x, position_embeddings, attn_mask, pad_mask, cache, hidden_states: list | None):
        """The decoder stack on the embedded tokens (its own method so that ETD can loop part of it)."""
        for layer in self.layers:
            x = layer(x, position_embeddings, attn_mask=attn_mask, pad_mask=pad_mask, cache=cache)
            if hidden_states is not None:
                hidden_states.append(x)
        return x


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _keys_to_ignore_on_load_unexpected = [r"^mtp\."]  # Qwen3.5 checkpoints' MTP module is not imported

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not build a DynamicCache: prepare_inputs_for_generation makes a HybridCache

    def get_layer_stats(self) -> dict[str, int]:
        """Counts of DeltaNet and gated-attention layers, e.g. 27 / 9 / 36 for Qwen3-8B with the 3:1 pattern."""
        return layer_stats(self.config.layer_types)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, output_hidden_states=False,
                **kwargs) -> CausalLMOutputWithPast:
        """Logits for every (or the last `logits_to_keep`) position; `loss` is the shifted cross-entropy on
        `labels` (−100 ignored). Pass a HybridCache (or `use_cache=True`) to decode incrementally."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache and not self.training:
            cache = HybridCache(self.config)
        hidden, all_hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                        output_hidden_states)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        hidden_states = tuple(all_hidden) if all_hidden is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states, **{_CACHE_FIELD: cache})

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, **kwargs):
        """Feed only the tokens the cache has not seen; the model derives positions from the padding mask."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = HybridCache(self.config)
        inputs = {"attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
        seen = cache.get_seq_length() if cache is not None else 0
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        return inputs


__all__ = ["HybridConfig", "HybridModel", "HybridForCausalLM", "HybridPreTrainedModel"]
