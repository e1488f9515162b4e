"""Decoder layer, HybridModel and HybridForCausalLM: a first-class transformers model (generate, save/load, Auto*)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import HybridCache
from .config import LINEAR, HybridConfig, layer_stats
from .decode_step import is_decode_step, static_decode
from .layers import MLP, GatedAttention, GatedDeltaNet, GatedRMSNorm, RMSNorm, RotaryEmbedding
from .static_cache import StaticHybridCache, static_cache_for

# transformers renamed the output's `past_key_values` field to `cache` after 5.17; generate reads whichever exists.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


class HybridDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HybridConfig, layer_idx: int, layer_type: str | None = None):
        super().__init__()
        self.layer_type = layer_type or config.layer_types[layer_idx]
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


class StepInputs(NamedTuple):
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attn_mask: torch.Tensor | None  # SDPA mask, (B|1, 1, T, past+T)
    new_pad: torch.Tensor | None  # (B, T) real new tokens, None = all real
    pad: torch.Tensor | None  # (B, past+T) for the cache, None = no padding
    seq_length: int  # past + T


def prepare_step(x: torch.Tensor, attention_mask, position_ids, cache: HybridCache | None, rotary_emb) -> StepInputs:
    """What a stack of decoder layers needs for the T new tokens `x` (B, T, D) on top of `cache`: rotary tables,
    masks and positions. Shared by the backbone and the MTP module, so both read padding the same way (left
    padding and speculative-decoding holes count as absent tokens: positions skip them)."""
    B, T = x.shape[:2]
    past = cache.get_seq_length() if cache is not None else 0
    pad = _padding_mask(attention_mask, cache, past, T, B)
    if position_ids is None:
        if pad is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        else:  # left padding: real tokens count from 0
            position_ids = (pad.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    new_pad = None if pad is None else pad[:, -T:]
    return StepInputs(rotary_emb(x, position_ids), _attention_mask(pad, past, T, x.device), new_pad, pad, past + T)


class HybridModel(HybridPreTrainedModel):
    graph_capturable = True  # its fixed-buffer step has no host-side state: a CUDA graph can replay it (decode_step.py)

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
        step = prepare_step(x, attention_mask, position_ids, cache, self.rotary_emb)
        hidden_states = [x] if output_hidden_states else None
        x = self.run_layers(x, step.position_embeddings, step.attn_mask, step.new_pad, cache, hidden_states)
        if cache is not None:
            cache.advance(step.seq_length, step.pad)
        return self.norm(x), hidden_states

    def run_layers(self, x, position_embeddings, attn_mask, pad_mask, cache, hidden_states: list | None):
        """The decoder stack on the embedded tokens (its own method so that ETD can loop part of it)."""
        for layer in self.layers:
            x = layer(x, position_embeddings, attn_mask=attn_mask, pad_mask=pad_mask, cache=cache)
            if hidden_states is not None:
                hidden_states.append(x)
        return x


@dataclass
class HybridCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus `mtp_losses` (num_predict_tokens,): the unweighted cross-entropy of each MTP
    depth (t+2, t+3, ...), already added into `loss` with their weights; None without labels or MTP heads."""

    mtp_losses: torch.FloatTensor | None = None


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # a Qwen3.5 checkpoint imported with mtp_num_hidden_layers = 0 carries `mtp.*` tensors nothing reads
    _keys_to_ignore_on_load_unexpected = [r"^mtp\."]
    backbone_class = HybridModel  # ETDForCausalLM swaps in its looped backbone; heads and MTP stay the same

    def __init__(self, config: HybridConfig):
        from .mtp import MultiTokenPredictor  # mtp.py builds on this module's decoder layer

        super().__init__(config)
        self.model = self.backbone_class(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MultiTokenPredictor(config) if config.mtp_num_hidden_layers else None
        self._mtp_decoder = None
        self.post_init()

    @property
    def mtp_decoder(self):
        """Lossless self-speculative decoding with the MTP heads (`hybridize.model.mtp.MTPDecoder`)."""
        from .mtp import MTPDecoder

        if self._mtp_decoder is None:
            self._mtp_decoder = MTPDecoder(self)
        return self._mtp_decoder

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
        `labels` (−100 ignored), plus the weighted MTP losses when the model has MTP heads (`mtp_losses` holds each
        depth's). Pass a HybridCache (or `use_cache=True`) to decode incrementally."""
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache and not self.training:
            cache = HybridCache(self.config)
        if is_decode_step(cache, input_ids, inputs_embeds, position_ids, labels, output_hidden_states):
            # the fixed-buffer step (a CUDA graph on CUDA); it takes the new tokens as real, the past's padding from
            # the cache, as generate's masks always say
            return HybridCausalLMOutput(logits=static_decode(self, cache, input_ids)[1], **{_CACHE_FIELD: cache})
        hidden, all_hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                        output_hidden_states)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        from .mtp import add_mtp_loss

        loss, mtp_losses = add_mtp_loss(self, loss, hidden, input_ids, inputs_embeds, labels, attention_mask)
        hidden_states = tuple(all_hidden) if all_hidden is not None else None
        return HybridCausalLMOutput(loss=loss, logits=logits, hidden_states=hidden_states, mtp_losses=mtp_losses,
                                    **{_CACHE_FIELD: cache})

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`cache_implementation="static"` makes a StaticHybridCache for generate's longest sequence; other values
        are transformers' own handling (this model then builds its HybridCache in prepare_inputs_for_generation)."""
        parent = super()._prepare_cache_for_generation
        if generation_config.cache_implementation != "static" or model_kwargs.get(_CACHE_FIELD) is not None:
            return parent(generation_config, model_kwargs, *args, **kwargs)
        bound = inspect.signature(parent).bind(generation_config, model_kwargs, *args, **kwargs).arguments
        length = max(bound["max_cache_length"], generation_config.max_cache_len or 0) + 1
        # generate expands each prompt to max(num_beams, num_return_sequences) rows after this call
        rows = bound["batch_size"] * max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        model_kwargs[_CACHE_FIELD] = static_cache_for(self, rows, length)

    def release_static_cache(self) -> None:
        """Free the StaticHybridCache that `generate(cache_implementation="static")` and `mtp_decoder.generate` keep
        between calls (its buffers and the CUDA graphs captured on them)."""
        self._reusable_static_cache = None

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


__all__ = ["HybridCausalLMOutput", "HybridConfig", "HybridModel", "HybridForCausalLM", "HybridPreTrainedModel",
           "StaticHybridCache"]
