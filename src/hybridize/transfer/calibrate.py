"""Calibrated DeltaNet init (`convert --calibrate DATA`): each DeltaNet layer fitted to the attention it replaces.

Why: the plain init (`transfer/init.py`) starts every DeltaNet layer as a no-op, so a fresh 3:1 SmolLM2-135M hybrid
has thousands of times the teacher's perplexity (measured 4,047x on corpus2 val, 16 x 512 tokens, 2026-12-02) and
distillation must rebuild 23 of 30 token mixers from nothing. Fitting each layer to the output of the teacher's own
attention, on the teacher's own layer inputs, costs minutes and no backward pass through the model.

The recipe, per DeltaNet layer i, in layer order (the teacher runs one decoder layer at a time, so memory holds one
layer plus the residual stream of the calibration windows, whatever the model's size; CUDA when available):
1. Teacher: h = input_layernorm(x), a = self_attn(h), x <- layer(x), with transformers' own layer class.
2. Decay: per head, the median distance t - s of the teacher's attention mass (second half of each window) sets a
   constant decay alpha with half-life ln 2 / -ln alpha = that distance (in_proj_a = 0): DeltaNet's memory matches
   how far each head looks. ("mean" matches alpha / (1 - alpha) to the mean distance; "mamba" keeps the plain init.)
3. Output gate z: in_proj_z fitted so z ~ 2 on every token (silu(2) = 1.76): the gate opens uniformly instead of
   being closed (z = 0 makes the features below zero, so nothing could be fitted).
4. out_proj: ridge least squares from DeltaNet's gated, normed output to a over all fit tokens (closed form).
5. Optional (--calibrate-steps N, default 0): a short Adam "attention transfer" fit of all the layer's parameters
   on |DeltaNet(h) - a|^2 / |a|^2 (warmup, cosine), N steps of --calibrate-batch-size windows.
Attention layers and every non-DeltaNet tensor are left bit-identical to the uncalibrated conversion; the windows
(seeded sample of documents) and the Adam batches are seeded, so a seed gives identical tensors.

Why these defaults (SmolLM2-135M-Instruct Q4_1, CPU, 2 cores shared with another engineer's jobs, 2026-12-02;
docs/BENCHMARKS.md "Calibrated init (SmolLM2-135M, CPU)"): the closed form alone (steps 1-4, 16k tokens = 32
windows of 512) takes the fresh 3:1 hybrid from 4,047x to 8.7x the teacher's perplexity on corpus2 val in
512-token windows (10.9x in 2048-token windows; holdout 4,344x -> 9.4x, KL 8.54 -> 2.30; per-layer
relative error 1.0 -> 0.04..0.67, mean 0.42) in 9-12 minutes; Adam steps help each layer (layer 0: 0.04 -> 0.030
with 100 steps of 4 x 512) but cost ~0.4 s each per layer on this CPU (23 layers x 100 steps = 15+ minutes), so
they are opt-in: worth it on a GPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..device import resolve_device
from ..errors import HybridizeError
from ..model.config import LINEAR, HybridConfig
from ..model.layers import GatedDeltaNet

DECAY_INITS = ("mamba", "mean", "median")
Z_INITS = ("zero", "const", "hmf", "v")


@dataclass
class Recipe:
    """The calibration's parts, each switchable for the ablation benchmark (defaults: the documented recipe)."""

    decay: str = "median"  # per-head decay from the teacher's attention distance ("mamba": keep the plain init)
    z: str = "const"  # output gate init
    lstsq: bool = True  # least-squares out_proj on the teacher's attention output
    steps: int = 0  # Adam steps of the attention-transfer fit per DeltaNet layer (0 = closed-form only, the default)
    lr: float = 1e-3
    batch_size: int = 4  # windows per Adam step
    stats_windows: int = 2  # windows whose full attention maps give the decay statistics
    trace_every: int = 0  # record the held-out error every N Adam steps (diagnostics)


def _sample_stream(paths, tokenizer, eos_token_id: int, tokens: int, seed: int) -> np.ndarray | None:
    """Token stream of documents drawn by a seeded permutation until about `tokens` tokens, or None when the data
    holds pre-tokenized .npy arrays. Reads the text twice (cheap) and tokenizes only the chosen documents, so
    calibrating on a multi-GB corpus costs seconds rather than its full tokenization."""
    from ..train.data import _encode, _iter_sources, iter_documents

    lengths = []
    for item in _iter_sources(paths):
        if not isinstance(item, str):
            return None
        lengths.append(len(item))
    if not lengths:
        return None  # the full path below raises the usual "no text found"
    order = np.random.default_rng([seed, 1]).permutation(len(lengths))
    budget = 6 * tokens  # characters; ~3-4 per token for English and code, so usually one round
    while True:
        chosen = order[: int(np.searchsorted(np.cumsum(np.asarray(lengths)[order]), budget)) + 1]
        keep = set(chosen.tolist())
        docs = {j: d for j, d in enumerate(iter_documents(paths)) if j in keep}
        stream = _encode(tokenizer, [docs[j] for j in chosen], eos_token_id)
        if len(stream) >= tokens or len(chosen) == len(lengths):
            return stream
        budget *= 2


def calibration_windows(paths, tokenizer, eos_token_id: int, tokens: int, seq_len: int, seed: int) -> torch.Tensor:
    """(n, seq_len) token windows, n = ceil(tokens / seq_len), cut from documents drawn by a seeded permutation so
    that they spread over every input rather than the first documents."""
    from ..train.data import tokenize_corpus

    need = max(1, math.ceil(tokens / seq_len))
    stream = _sample_stream(paths, tokenizer, eos_token_id, need * seq_len, seed)
    sampled = stream is not None
    if not sampled:
        stream = tokenize_corpus(list(paths), tokenizer, eos_token_id, progress=False)
    available = len(stream) // seq_len
    if available < 1:
        raise HybridizeError(f"the calibration data has {len(stream):,} tokens, fewer than one window of "
                             f"--calibrate-seq-len {seq_len}; give more text or a shorter window")
    if not sampled and available > need:  # a pre-tokenized stream: seeded windows over all of it
        pick = np.sort(np.random.default_rng([seed, 1]).permutation(available)[:need])
    else:
        pick = np.arange(min(need, available))
    windows = np.stack([np.asarray(stream[j * seq_len:(j + 1) * seq_len], dtype=np.int64) for j in pick])
    return torch.from_numpy(windows)


class TeacherLayers:
    """The source model run one decoder layer at a time with transformers' own classes, built from the source's
    tensors on demand: memory holds one layer (plus the embedding), whatever the model's size."""

    def __init__(self, source, device: torch.device):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        self.source, self.device = source, device
        self.config = source.config.__class__.from_dict(source.config.to_dict())
        self.config._attn_implementation = "sdpa"
        with torch.device("meta"):
            skeleton = MODEL_FOR_CAUSAL_LM_MAPPING[type(self.config)](self.config)
        self.layer_class = type(skeleton.model.layers[0])
        self.rotary = type(skeleton.model.rotary_emb)(config=self.config).to(device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.source.tensor("model.embed_tokens.weight")
        return F.embedding(ids, table.float()).to(self.device)

    def position_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(x.shape[1], device=x.device)[None]
        return self.rotary(x, pos)

    def layer(self, i: int) -> nn.Module:
        with torch.device("meta"):
            layer = self.layer_class(self.config, i)
        prefix = f"model.layers.{i}."
        state = {n: self.source.tensor(prefix + n).float() for n in layer.state_dict()}
        layer.load_state_dict(state, assign=True)
        return layer.to(self.device).eval()


@torch.no_grad()
def run_teacher_layer(layer: nn.Module, x: torch.Tensor, pe, batch: int = 8):
    """(layer input normed, attention output, layer output) for every window of x, through the layer's forward."""
    seen = {}
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, a, out: seen.__setitem__("h", out)),
             layer.self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("a", out[0]))]
    hs, attn, outs = [], [], []
    try:
        for s in range(0, x.shape[0], batch):
            xb = x[s:s + batch]
            cos, sin = pe
            out = layer(xb, attention_mask=None, position_embeddings=(cos.expand(len(xb), -1, -1),
                                                                      sin.expand(len(xb), -1, -1)))
            out = out[0] if isinstance(out, tuple) else out
            hs.append(seen["h"])
            attn.append(seen["a"])
            outs.append(out)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(hs), torch.cat(attn), torch.cat(outs)


@torch.no_grad()
def attention_distance(layer: nn.Module, config, h: torch.Tensor, pe) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head: mean and median distance t − s under the teacher's attention probabilities (second half of
    each window, where the context is long enough to tell heads apart)."""
    B, T, _ = h.shape
    mask = torch.full((T, T), float("-inf"), device=h.device).triu(1)[None, None]
    old = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        cos, sin = pe
        _, w = layer.self_attn(hidden_states=h, attention_mask=mask,
                               position_embeddings=(cos.expand(B, -1, -1), sin.expand(B, -1, -1)))
    finally:
        config._attn_implementation = old
    w = w.float()[:, :, T // 2:, :]  # (B, H, Tq, T)
    t = torch.arange(T // 2, T, device=h.device)[:, None]
    dist = (t - torch.arange(T, device=h.device)[None, :]).clamp(min=0).float()  # (Tq, T)
    mean = (w * dist).sum(-1).mean(dim=(0, 2))
    # median: probability mass accumulated from the current token backwards
    rev = w.flip(-1)  # index j of the flipped row = key T-1-j; distance = t - (T-1-j)
    cum = rev.cumsum(-1)
    first = (cum >= 0.5).float().argmax(-1)  # flipped index where half the mass is reached
    med = (first - (T - 1 - t.squeeze(-1))).clamp(min=0).float().mean(dim=(0, 2))
    return mean, med


def _softplus_inv(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def decay_from_distance(distance: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_log, dt_bias) giving each head a constant decay α whose memory matches the attention distance:
    mean of a geometric weighting α/(1−α) = m, or its median ln 2 / −ln α = m."""
    m = distance.double().clamp(min=0.5)
    alpha = m / (1 + m) if kind == "mean" else torch.exp(-math.log(2) / m)
    alpha = alpha.clamp(0.3, 0.9995)
    A_log = torch.zeros_like(alpha)
    return A_log.float(), _softplus_inv(-torch.log(alpha)).float()


@torch.no_grad()
def ridge(x: torch.Tensor, y: torch.Tensor, rel: float = 1e-4) -> torch.Tensor:
    """W (out, in) minimising |x Wᵀ − y|² + λ|W|², x (N, in), y (N, out); λ = rel · mean diagonal of xᵀx."""
    x, y = x.double(), y.double()
    g = x.T @ x
    lam = rel * g.diagonal().mean().clamp(min=1e-12)
    g.diagonal().add_(lam)
    return torch.linalg.solve(g, x.T @ y).T.float()


class DeltaNetCalibrator:
    """Fits each DeltaNet layer, in order, to the teacher's attention output on the teacher's own layer inputs.

    Used as the layer hook of `mapping.iter_hybrid_tensors`: called with each layer's freshly transferred tensors
    in layer order, it advances the teacher's residual stream by one layer and, for DeltaNet layers, returns
    calibrated tensors. Attention layers pass through untouched.
    """

    def __init__(self, source, cfg: HybridConfig, windows: torch.Tensor, recipe: Recipe, seed: int = 0,
                 device: str | torch.device | None = None, progress: bool = False):
        start = time.perf_counter()
        self.cfg, self.recipe, self.seed = cfg, recipe, seed
        self.windows = tuple(windows.shape)
        self.seconds = 0.0  # calibration time (teacher layers + fits), added to by each call
        self.device = resolve_device(device)
        self.teacher = TeacherLayers(source, self.device)
        self.x = self.teacher.embed(windows)  # (n, T, D) the teacher's residual stream
        self.pe = self.teacher.position_embeddings(self.x[:1])
        n = self.x.shape[0]
        self.n_check = max(1, n // 16) if n > 1 else 0  # held-out windows for the per-layer report
        self.report: dict[int, dict] = {}
        n_linear = sum(t == LINEAR for t in cfg.layer_types)
        self.bar = tqdm(total=n_linear * max(recipe.steps, 1), desc="calibrate", disable=not progress,
                        unit="step")
        self.seconds += time.perf_counter() - start

    def summary(self) -> dict:
        """What the calibration did: time, data, and each DeltaNet layer's relative error on held-out windows
        (|y − attention|² / |attention|²) before and after."""
        after = [r["after"] for r in self.report.values() if r["after"] is not None]
        return {
            "seconds": round(self.seconds, 1),
            "device": str(self.device),
            "windows": self.windows[0],
            "seq_len": self.windows[1],
            "steps_per_layer": self.recipe.steps,
            "mean_rel_err": round(sum(after) / len(after), 4) if after else None,
            "layers": {i: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()
                           if k in ("before", "after")} for i, r in self.report.items()},
        }

    def __call__(self, i: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        layer = self.teacher.layer(i)
        h, attn, out = run_teacher_layer(layer, self.x, self.pe)
        if self.cfg.layer_types[i] == LINEAR:
            tensors = self._calibrate(i, layer, h, attn, tensors)
        self.x = out
        del layer
        if i == self.cfg.num_hidden_layers - 1:
            self.bar.close()
            self.x = None  # the last layer's output is not needed
        self.seconds += time.perf_counter() - start
        return tensors

    # -------------------------------------------------------------------------------------------------------
    def _module(self, i: int, tensors: dict[str, torch.Tensor]) -> GatedDeltaNet:
        prefix = f"model.layers.{i}.linear_attn."
        with torch.device("meta"):
            gdn = GatedDeltaNet(self.cfg, i)
        state = {n: tensors[prefix + n].float() for n in gdn.state_dict()}
        gdn.load_state_dict(state, assign=True)
        return gdn.to(self.device).float()

    def _calibrate(self, i, layer, h, attn, tensors):
        r = self.recipe
        gdn = self._module(i, tensors)
        fit_h, fit_a = h[self.n_check:], attn[self.n_check:]
        chk_h, chk_a = h[: self.n_check], attn[: self.n_check]
        if len(fit_h) == 0:
            fit_h, fit_a = h, attn
        scale = fit_a.pow(2).mean().clamp(min=1e-12)
        rep = {"before": self._rel_err(gdn, chk_h, chk_a) if self.n_check else None}
        with torch.no_grad():
            if r.decay != "mamba":
                mean, med = attention_distance(layer, self.teacher.config, fit_h[: r.stats_windows], self.pe)
                A_log, dt_bias = decay_from_distance(mean if r.decay == "mean" else med, r.decay)
                gdn.A_log.copy_(A_log)
                gdn.dt_bias.copy_(dt_bias)
                gdn.in_proj_a.weight.zero_()
                rep["distance_median"] = [round(v, 1) for v in med.tolist()]
            if r.z != "zero":
                gdn.in_proj_z.weight.copy_(self._z_init(r.z, gdn, layer, fit_h))
            if r.lstsq:
                gdn.out_proj.weight.copy_(self._lstsq_out(gdn, fit_h, fit_a))
        if r.steps:
            rep["trace"] = self._adam(i, gdn, fit_h, fit_a, scale, chk_h, chk_a)
        else:
            self.bar.update(1)
        rep["after"] = self._rel_err(gdn, chk_h, chk_a) if self.n_check else None
        self.report[i] = rep
        self.bar.set_postfix(layer=i, rel_err=f"{rep['after']:.3f}" if rep["after"] is not None else "-")
        prefix = f"model.layers.{i}.linear_attn."
        out = dict(tensors)
        for n, p in gdn.state_dict().items():
            out[prefix + n] = p.detach().float().cpu()
        return out

    def _z_init(self, kind, gdn, layer, h):
        rows = gdn.in_proj_z.weight.shape[0]
        D = h.shape[-1]
        if kind == "const":  # z ≈ 2 for every token: ridge fit of a constant on the layer input
            flat = h.reshape(-1, D)
            w = ridge(flat, torch.full((flat.shape[0], 1), 2.0, device=flat.device), rel=1e-3)
            return w.expand(rows, D).clone()
        Hv, dv = gdn.num_v_heads, gdn.head_v_dim
        src = layer.self_attn
        kv = src.v_proj.weight.float()  # (Hkv·d, D)
        v = kv.view(-1, dv, D).repeat_interleave(Hv // (kv.shape[0] // dv), dim=0).reshape(rows, D)
        if kind == "v":
            return v
        return 0.5 * (src.o_proj.weight.float().T + v)  # HMF: ½(W_Oᵀ + W_V repeated)

    def _features(self, gdn, h):
        """Inputs of out_proj (the gated, normed DeltaNet output), captured from the module's own forward."""
        feats = []
        hook = gdn.out_proj.register_forward_pre_hook(lambda m, a: feats.append(a[0].reshape(-1, a[0].shape[-1])))
        try:
            with torch.no_grad():
                for s in range(0, h.shape[0], 8):
                    gdn(h[s:s + 8])
        finally:
            hook.remove()
        return torch.cat(feats)

    def _lstsq_out(self, gdn, h, attn):
        x = self._features(gdn, h)
        return ridge(x, attn.reshape(-1, attn.shape[-1]))

    @torch.no_grad()
    def _rel_err(self, gdn, h, attn) -> float:
        y = torch.cat([gdn(h[s:s + 8]) for s in range(0, h.shape[0], 8)])
        return ((y - attn).pow(2).mean() / attn.pow(2).mean().clamp(min=1e-12)).item()

    def _adam(self, i, gdn, h, attn, scale, chk_h, chk_a) -> list:
        r = self.recipe
        gen = torch.Generator().manual_seed(self.seed * 100_003 + i)
        params = [p for p in gdn.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=r.lr)
        warm = max(1, r.steps // 10)
        trace = []
        with torch.enable_grad():
            for step in range(r.steps):
                lr = r.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / r.steps)))
                for g in opt.param_groups:
                    g["lr"] = lr
                idx = torch.randint(h.shape[0], (min(r.batch_size, h.shape[0]),), generator=gen).to(h.device)
                loss = (gdn(h[idx]) - attn[idx]).pow(2).mean() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                self.bar.update(1)
                if r.trace_every and self.n_check and (step + 1) % r.trace_every == 0:
                    trace.append((step + 1, round(self._rel_err(gdn, chk_h, chk_a), 4)))
        gdn.requires_grad_(False)
        return trace


def calibrator_for(source, cfg: HybridConfig, transfer, progress: bool = False,
                   device: str | torch.device | None = None) -> DeltaNetCalibrator | None:
    """The layer hook that calibrates a conversion per `transfer` (a CrossArchTransferConfig), or None when it asks
    for no calibration or the hybrid has no DeltaNet layer. Reads and tokenizes the data now, before any output."""
    if not transfer.calibrate_data:
        return None
    if source.family == "qwen3_5_text":
        raise HybridizeError(f"{source.path} is already a hybrid (qwen3_5_text): calibration needs an attention "
                             "source (Qwen3 / Llama) as the teacher")
    if LINEAR not in cfg.layer_types:
        return None
    from ..train.models import load_tokenizer

    folders = list(dict.fromkeys(str(f.parent) for f in source.tokenizer_files)) or [str(source.path)]
    tokenizer = load_tokenizer(*folders)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id
    if eos is None:
        raise HybridizeError(f"the tokenizer of {source.path} has no EOS token to separate calibration documents")
    windows = calibration_windows(transfer.calibrate_data, tokenizer, int(eos), transfer.calibrate_tokens,
                                  transfer.calibrate_seq_len, transfer.seed)
    if int(windows.max()) >= cfg.vocab_size:
        raise HybridizeError(f"the calibration tokens reach id {int(windows.max())}, outside the model's "
                             f"vocabulary of {cfg.vocab_size}")
    recipe = Recipe(steps=transfer.calibrate_steps, lr=transfer.calibrate_lr, batch_size=transfer.calibrate_batch_size)
    return DeltaNetCalibrator(source, cfg, windows, recipe, seed=transfer.seed, device=device, progress=progress)
