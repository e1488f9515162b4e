"""The hybrid's modules: norms, rotary embedding, SwiGLU MLP, gated softmax attention and Gated DeltaNet.

Parameter names, shapes and norm conventions equal transformers' `qwen3_5_text` (Qwen3_5Attention,
Qwen3_5GatedDeltaNet), so a checkpoint moves between the two by renaming `model_type` only. The math of the
linear-attention core lives in `hybridize.ops`; this file only projects, reshapes and gates.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from ..ops.dispatch import always_fused, gated_delta_net, gated_rms_norm, scaled_rms_norm, short_conv, silu_mul
from .config import HybridConfig

_FROZEN_WEIGHTS = ContextVar("hybridize_frozen_weights", default=False)
_FIXED_SHAPES = ContextVar("hybridize_fixed_shapes", default=False)


@contextlib.contextmanager
def _set(var: ContextVar):
    token = var.set(True)
    try:
        yield
    finally:
        var.reset(token)


def frozen_weights():
    """Promise that no weight changes inside: RMSNorm then reuses its float32 1 + w instead of computing it on every
    call, two kernels per norm and ~180 per step of an 8B hybrid. Outside it (training, FSDP's all-gathers into
    reused buffers) the scale is always recomputed."""
    return _set(_FROZEN_WEIGHTS)


@contextlib.contextmanager
def fixed_buffer_step():
    """Inside a fixed-buffer decoding step (DecodeStep, the MTP heads' steps), which runs with the same shapes on
    every replay of its CUDA graph: weights frozen (see `frozen_weights`), fla's fused kernels even for small
    inputs (few launches per replay: `ops.dispatch.always_fused`), and masked attention keeps torch's own backend
    choice (cuDNN's per-shape plan is built once, at capture)."""
    with frozen_weights(), always_fused(), _set(_FIXED_SHAPES):
        yield


class RMSNorm(nn.Module):
    """RMSNorm computing x̂·(1 + w) in float32, as qwen3_5_text does: a source weight w is stored as w − 1."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self._scale: tuple[tuple, torch.Tensor] | None = None  # (weight identity, 1 + w) under frozen_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_rms_norm(x, self.scale(), self.eps)

    def scale(self) -> torch.Tensor:
        """1 + w in float32; kept under `frozen_weights` while the weight's storage and version counter stay."""
        w = self.weight
        if not _FROZEN_WEIGHTS.get() or (torch.is_grad_enabled() and w.requires_grad):
            return 1.0 + w.float()
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._scale is None or self._scale[0] != key:
            self._scale = (key, 1.0 + w.float())
        return self._scale[1]


class GatedRMSNorm(nn.Module):
    """DeltaNet output norm: rmsnorm(o)·w·silu(z), with a plain (not zero-centred) weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, gate, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the source's RoPE (theta and any scaling type transformers knows)."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_inv_freq = inv_freq  # read by transformers' dynamic_rope_update
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings

    def compute_inv_freq(self, device=None) -> tuple[torch.Tensor, float]:
        if self.rope_type != "default":
            return ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device)
        base = self.config.rope_parameters["rope_theta"]
        dim = int(self.config.head_dim * self.config.rope_parameters.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float().to(device) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float)  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of x (B, H, T, d); the rest pass through (partial rotary)."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, rot)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class MLP(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.swiglu = config.hidden_act in ("silu", "swish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class GatedAttention(nn.Module):
    """Softmax attention (GQA, RoPE, optional q/k-norm) with an elementwise sigmoid output gate (arXiv 2505.06708).

    q_proj emits 2·d rows per head, interleaved per head as [q_h; gate_h]; output = o_proj(attn · σ(gate)).
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim * 2, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        if config.attention_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, position_embeddings, attn_mask=None, cache=None):
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, self.num_heads, 2, self.head_dim).unbind(3)  # (B, T, H, d) each
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, d)
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v)
        # attn_mask: None with is_causal for plain prefill, else a boolean (B, 1, T, S) mask (True = attend)
        y = _attend(q, k, v, attn_mask, self.dropout if self.training else 0.0, self.head_dim**-0.5)  # (B, H, T, d)
        y = y.transpose(1, 2).reshape(B, T, -1) * torch.sigmoid(gate.reshape(B, T, -1))
        return self.o_proj(y)


# Eager masked attention on CUDA avoids cuDNN's SDPA: cuDNN builds an execution plan for every new shape (8.6 ms of
# host time per call measured on an H200, torch 2.11), and eager masked calls are where shapes change every call —
# decoding on a dynamic cache, the MTP heads' eager draft chain. There it made speculative decoding 3x slower (63
# against 164-205 tok/s on the healed SmolLM2, 2026-12-03). Flash / memory-efficient kernels need no per-shape
# plan. Unmasked calls (causal prefill, training) and the fixed-buffer step (same shapes every replay) keep torch's
# own choice. The same finding elsewhere: modelscope/FunASR#3705, ml-explore/mlx#2743.
_MASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _attend(q, k, v, attn_mask, dropout: float, scale: float) -> torch.Tensor:
    """SDPA with grouped-query heads. A few query tokens under a mask (decode and verify steps) fold each KV head's
    query heads into the query axis — (B, Hkv, H/Hkv · T, d) against (B, Hkv, S, d) — so a masked kernel reads every
    K/V once, where `enable_gqa` would take the math path and copy K/V out to every query head."""
    if attn_mask is not None and q.is_cuda and not _FIXED_SHAPES.get():
        with sdpa_kernel(_MASKED_BACKENDS):
            return _sdpa(q, k, v, attn_mask, dropout, scale)
    return _sdpa(q, k, v, attn_mask, dropout, scale)


_FOLD_MAX_QUERIES = 16  # the folded mask is H/Hkv times the mask: only for decode/verify-sized queries


def _sdpa(q, k, v, attn_mask, dropout: float, scale: float) -> torch.Tensor:
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    groups = H // Hkv
    if attn_mask is not None and groups > 1 and T <= _FOLD_MAX_QUERIES:
        if T > 1:  # query row (group, t) keeps token t's mask row
            attn_mask = attn_mask.repeat(1, 1, groups, 1)  # row g·T + t is token t's
        y = F.scaled_dot_product_attention(q.reshape(B, Hkv, groups * T, d), k, v, attn_mask=attn_mask,
                                           dropout_p=dropout, scale=scale)
        return y.reshape(B, H, T, d)  # the kernel may return another memory layout
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None and T > 1,
                                          dropout_p=dropout, scale=scale, enable_gqa=groups > 1)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet (arXiv 2412.06464) in the qwen3_5_text layout.

    q,k,v = silu(conv1d(in_proj_qkv(x))), g = −exp(A_log)·softplus(a + dt_bias), β = σ(b),
    S_t = e^{g_t} S_{t−1} + β_t (v_t − e^{g_t} S_{t−1} k_t) k_tᵀ, o_t = S_t q_t,  y = out_proj(rmsnorm(o)·w·silu(z)).
    """

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.head_k_dim = config.linear_key_head_dim
        self.head_v_dim = config.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        hidden = config.hidden_size
        self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, self.num_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, self.num_v_heads, bias=False)
        kernel = config.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel, groups=self.conv_dim, padding=kernel - 1,
                                bias=False)  # depthwise; weight (conv_dim, 1, kernel)
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.norm = GatedRMSNorm(self.head_v_dim, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        if pad_mask is not None:  # zero padded tokens so they leave the conv and recurrent states untouched
            x = x * pad_mask[:, :, None].to(x.dtype)
        conv_state, recurrent_state = cache.linear_state(self.layer_idx) if cache is not None else (None, None)
        every = cache is not None and cache.checkpointing  # speculative verify: keep the state after each token
        mixed, conv_state = short_conv(
            self.in_proj_qkv(x), self.conv1d.weight.squeeze(1), conv_state, output_final_state=cache is not None,
            output_all_states=every,
        )  # (B, T, conv_dim), SiLU applied
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        o, recurrent_state = gated_delta_net(
            q.view(B, T, self.num_k_heads, self.head_k_dim),
            k.view(B, T, self.num_k_heads, self.head_k_dim),
            v.view(B, T, self.num_v_heads, self.head_v_dim),
            a=self.in_proj_a(x), b=self.in_proj_b(x), A_log=self.A_log, dt_bias=self.dt_bias,
            initial_state=recurrent_state, output_final_state=cache is not None, output_all_states=every,
        )  # (B, T, Hv, dv); q/k L2-normalised, decay and β computed inside
        if cache is not None:
            cache.update_linear_state(self.layer_idx, conv_state, recurrent_state)
        z = self.in_proj_z(x).view(B, T, self.num_v_heads, self.head_v_dim)
        return self.out_proj(self.norm(o, z).reshape(B, T, self.value_dim))
