"""Multi-token prediction (MTP) heads in Qwen3.5's `mtp.*` layout, their training loss, and lossless
self-speculative decoding with them.

One module predicts one token further each time it is applied (as Qwen3.5 / Qwen3-Next and vLLM's
`qwen3_5_mtp` loader define it)::

    h^k_i = norm(layer(fc([pre_fc_norm_embedding(embed(x_{i+k})); pre_fc_norm_hidden(h^{k-1}_i)])))
    logits^k_i = lm_head(h^k_i)  ->  x_{i+k+1}

h^0 is the backbone's final (normed) hidden state, `embed` and `lm_head` are the backbone's, `layer` is one
gated-attention decoder layer, and the same module is reused for every depth k = 1..num_predict_tokens, so the
checkpoint exports as `mtp.{fc, pre_fc_norm_embedding, pre_fc_norm_hidden, layers.0.*, norm}` with
`mtp_num_hidden_layers: 1`, which vLLM and SGLang serve with their own MTP speculative decoding.

Speculative decoding (`MTPDecoder.generate`): draft K tokens with the heads, verify all of them in one forward of
the backbone over K+1 tokens, keep the longest prefix the backbone agrees with (greedy) or accepts by rejection
sampling (Leviathan et al. 2023 / Chen et al. 2023: the output distribution is exactly the backbone's), and roll
the cache back with `HybridCache.rollback`, which picks per-position DeltaNet checkpoints instead of replaying
(greedy on a static cache: `StaticHybridCache.rollback_in_place`, a graph replay that leaves the accepted counts on
the device, so a verify step copies to the host once, at its end).
On a StaticHybridCache (the default on CUDA) the verify forward is the fixed-buffer T-token step, a CUDA graph per T
(`hybridize.model.decode_step`): eagerly, a verify step costs several one-token steps in kernel launches alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HybridizeError
from .cache import HybridCache
from .config import FULL, HybridConfig
from .decode_step import forward_new_tokens
from .layers import RMSNorm, RotaryEmbedding
from .modeling import HybridDecoderLayer, prepare_step
from .mtp_step import FixedMTPHeads, fixed_heads_for
from .static_cache import StaticHybridCache, static_cache_for


class MultiTokenPredictor(nn.Module):
    """Qwen3.5's MTP module: one application predicts one token further (see the module docstring)."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        D = config.hidden_size
        self.pre_fc_norm_embedding = RMSNorm(D, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(D, eps=config.rms_norm_eps)
        self.fc = nn.Linear(2 * D, D, bias=False)  # input: [embedding; hidden], in that order (vLLM, Qwen3-Next)
        self.layers = nn.ModuleList([HybridDecoderLayer(config, 0, layer_type=FULL)])
        self.norm = RMSNorm(D, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, hidden: torch.Tensor, next_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: HybridCache | None = None) -> torch.Tensor:
        """One depth. hidden (B, T, D): h^{k-1} at positions i; next_embeds (B, T, D): embeddings of the tokens
        one further; returns h^k (B, T, D), normed, ready for lm_head. `attention_mask`/`cache` as the backbone's
        (the cache must be attention-only: `mtp_cache`)."""
        x = self.fuse(hidden, next_embeds)
        step = prepare_step(x, attention_mask, None, cache, self.rotary_emb)
        x = self.layers[0](x, step.position_embeddings, attn_mask=step.attn_mask, pad_mask=step.new_pad, cache=cache)
        if cache is not None:
            cache.advance(step.seq_length, step.pad)
        return self.norm(x)

    def fuse(self, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        """The decoder layer's input: fc over [norm(embedding of the next token); norm(hidden)]."""
        return self.fc(torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))


def mtp_cache() -> HybridCache:
    """A cache for the MTP module's one attention layer (attention-only, so `crop` works)."""
    return HybridCache(SimpleNamespace(layer_types=[FULL]))


# ------------------------------------------------------------------------------------------------------ training


def mtp_depth_states(mtp: MultiTokenPredictor, hidden: torch.Tensor, embeds: torch.Tensor,
                     attention_mask: torch.Tensor | None, depths: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(k, h^k) for k = 1..depths, teacher-forced: depth k at position i reads h^{k-1}_i and the embedding of
    x_{i+k}, so h^k covers positions 0..T-k-1 (those whose input token exists) and predicts x_{i+k+1}. Stops at
    the first depth with no position left. hidden (B, T, D): the backbone's normed final hidden state (h^0).

    The one recursion both losses share: `mtp_depth_losses` (full logits) and the distillation objective's
    chunked, fused cross-entropy (train/objective.py)."""
    T, h = hidden.shape[1], hidden
    for k in range(1, depths + 1):
        n = T - k
        if n < 1:
            return
        mask = None if attention_mask is None else attention_mask[:, :n]
        h = mtp(h[:, :n], embeds[:, k:], attention_mask=mask)
        yield k, h


def mtp_depth_losses(mtp: MultiTokenPredictor, lm_head: nn.Module, hidden: torch.Tensor, embeds: torch.Tensor,
                     labels: torch.Tensor, attention_mask: torch.Tensor | None, depths: int) -> torch.Tensor:
    """Cross-entropy of each depth k = 1..depths, shape (depths,): depth k at position i (see `mtp_depth_states`)
    is scored on labels_{i+k+1} (−100 ignored; a depth with no target scores 0). hidden (B, T, D) is the
    backbone's normed final hidden state."""
    losses = [hidden.new_zeros((), dtype=torch.float32) for _ in range(depths)]
    for k, h in mtp_depth_states(mtp, hidden, embeds, attention_mask, depths):
        logits = lm_head(h[:, :-1]).float()  # (B, n-1, V): the last position has no target
        target = labels[:, k + 1 :]
        total = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
        losses[k - 1] = total / (target != -100).sum().clamp(min=1)
    return torch.stack(losses)


def mtp_loss_weights(config: HybridConfig) -> torch.Tensor:
    """λ·decay^(k−1) for k = 1..num_predict_tokens: farther tokens are harder to predict and weigh less."""
    k = torch.arange(config.num_predict_tokens, dtype=torch.float32)
    return config.mtp_loss_weight * config.mtp_loss_decay**k


def add_mtp_loss(model, loss: torch.Tensor | None, hidden: torch.Tensor, input_ids: torch.Tensor | None,
                 inputs_embeds: torch.Tensor | None, labels: torch.Tensor | None,
                 attention_mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(task loss + Σ_k λ·decay^(k−1)·L_k, the L_k) when the model has MTP heads and labels; else (loss, None)."""
    if model.mtp is None or labels is None:
        return loss, None
    embeds = model.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    mask = None if attention_mask is None else attention_mask.bool()
    losses = mtp_depth_losses(model.mtp, model.lm_head, hidden, embeds, labels, mask, model.config.num_predict_tokens)
    return loss + (mtp_loss_weights(model.config).to(losses.device) * losses).sum(), losses.detach()


# ------------------------------------------------------------------------------------------------------ decoding


class MTPDecoder:
    """Self-speculative decoding of a HybridForCausalLM with its MTP heads.

    `stats` describes the last call: `tokens_per_verify` (mean tokens committed per verify forward and active
    row: accepted drafts + the backbone's own token), `mean_accepted_drafts`, `verify_steps` (row-steps), and
    `accepted` (per verify step, the drafts each row accepted), `cuda_graph` (whether the verify steps were
    replayed as CUDA graphs; False on the dynamic cache, on a CPU, or when the capture failed),
    `heads_cuda_graph` (the same for the MTP heads' draft and update steps, `hybridize.model.mtp_step`: greedy on
    a static cache) and, when `time_phases` is set, `phase_seconds`: wall time in drafting, the verify forward,
    the rollback and the heads' update (the device synced at every boundary, which slows the call: for profiling,
    not for speed numbers)."""

    time_phases = False

    def __init__(self, model):
        if model.mtp is None:
            raise HybridizeError("this model has no MTP heads (config mtp_num_hidden_layers is 0); build it with "
                                 "mtp_num_hidden_layers=1 and train them (hybridize distill --mtp)")
        self.model = model
        self.stats: dict = {}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, num_draft_tokens: int | None = None, eos_token_id: int | list[int] | None
                 = None, pad_token_id: int | None = None, temperature: float = 1.0,
                 generator: torch.Generator | None = None, cache_implementation: str | None = None) -> torch.Tensor:
        """Tokens as `model.generate` returns them, (B, prompt + new): the prompt, then each row's new tokens,
        padded with `pad_token_id` after its EOS. Greedy output equals `model.generate(do_sample=False)`; sampled
        output follows the model's own distribution at `temperature`. Rows accept different numbers of drafts:
        the cache keeps each row's rejected tokens as masked holes. `num_draft_tokens` defaults to
        config.num_predict_tokens; 0 is plain decoding. `cache_implementation` is the backbone's cache: "static"
        (a StaticHybridCache; verify steps run the fixed-buffer step, a CUDA graph on CUDA) or "dynamic" (a
        HybridCache, eager); default "static" on CUDA, else "dynamic"."""
        K = self.model.config.num_predict_tokens if num_draft_tokens is None else num_draft_tokens
        if not isinstance(K, int) or K < 0:
            raise HybridizeError(f"num_draft_tokens is {K!r}; it must be an integer >= 0")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise HybridizeError(f"max_new_tokens is {max_new_tokens!r}; it must be an integer >= 1")
        if cache_implementation is None:
            cache_implementation = "static" if self.model.device.type == "cuda" else "dynamic"
        if cache_implementation not in ("static", "dynamic"):
            raise HybridizeError(f"cache_implementation is {cache_implementation!r}; it must be 'static' or "
                                 "'dynamic'")
        cache = (static_cache_for(self.model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens + K + 1)
                 if cache_implementation == "static" else HybridCache(self.model.config))
        run = _Run(self.model, input_ids, attention_mask, do_sample, temperature, generator, cache,
                   _PhaseClock(self.time_phases, self.model.device))
        eos = eos_token_id if eos_token_id is not None else self.model.config.eos_token_id
        out = _Output(input_ids, max_new_tokens, eos, pad_token_id, self.model.config)
        tok = run.prefill()
        out.commit([[t] for t in tok.tolist()])
        verifies = committed = 0
        accepted: list[list[int]] = []
        while not out.all_done():
            k = min(K, out.max_remaining() - 1)
            active = out.active()
            run.make_room(k + 1, out.max_remaining() + K + 1)  # first: the fixed heads draft into the next slots
            with run.clock("draft"):
                drafts, q = run.draft(tok, k)
            n_acc, tok = run.verify(tok, drafts, q)
            # one device-to-host copy per verify step (each is a sync): [drafts | accepted | next token] per row
            rows = torch.cat([drafts, n_acc[:, None], tok[:, None]], dim=1).tolist()
            n_host = [row[k] for row in rows]
            accepted.append(n_host)
            committed += sum(n_host[b] + 1 for b in active)
            verifies += len(active)
            out.commit([row[: row[k]] + [row[k + 1]] for row in rows])
            run.reclaim(max(n_host))
        step = getattr(cache, "decode_step", None)
        self.stats = {"verify_steps": verifies, "tokens_per_verify": committed / max(verifies, 1),
                      "mean_accepted_drafts": committed / max(verifies, 1) - 1.0, "accepted": accepted,
                      "cuda_graph": bool(step is not None and step.use_graph),
                      "heads_cuda_graph": bool(run.fixed_heads is not None and run.fixed_heads.policy.use_graph),
                      **({"phase_seconds": run.clock.seconds} if self.time_phases else {})}
        return out.tensor()


class _PhaseClock:
    """Wall time per decoding phase when `on`, the device synced at each boundary; otherwise it does nothing."""

    def __init__(self, on: bool, device: torch.device):
        self.on, self.device, self.seconds = on, device, {}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str):
        if not self.on:
            yield
            return
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class _Run:
    """The decoding state of one `generate` call: backbone cache, MTP cache, the MTP hidden state of each row's
    last kept position."""

    def __init__(self, model, input_ids, attention_mask, do_sample, temperature, generator, cache: HybridCache,
                 clock: _PhaseClock):
        if do_sample and not temperature > 0:
            raise HybridizeError(f"temperature is {temperature!r}; it must be > 0 when sampling")
        self.model, self.ids, self.mask = model, input_ids, attention_mask
        self.do_sample, self.temperature, self.generator = do_sample, temperature, generator
        self.cache, self.mtp_cache, self.clock = cache, mtp_cache(), clock
        self.h_mtp: torch.Tensor | None = None  # (B, D) MTP output at each row's last kept position
        self.fixed_heads: FixedMTPHeads | None = None  # greedy on a static cache: the heads' graphed steps
        self.verify_start = 0  # the first slot of the last verify step

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Greedy: argmax, no probabilities. Sampling: a token drawn from softmax(logits / T) and those probs."""
        if not self.do_sample:
            return logits.argmax(-1), None
        p = self.probs(logits)
        return _sample(p, self.generator), p

    def advance_mtp(self, hidden: torch.Tensor, next_ids: torch.Tensor, last: torch.Tensor) -> None:
        """Feed the MTP the (hidden, next token) pair of every slot the backbone just kept, so its cache mirrors
        the backbone's slots, and keep its output at each row's last kept slot `last` (B,)."""
        embeds = self.model.model.embed_tokens(next_ids)
        h = self.model.mtp(hidden, embeds, attention_mask=self.cache.attention_mask, cache=self.mtp_cache)
        self.h_mtp = h[torch.arange(h.shape[0], device=h.device), last]

    def prefill(self) -> torch.Tensor:
        hidden, _ = self.model.model(self.ids, self.mask, cache=self.cache)
        tok, _ = self.choose(self.model.lm_head(hidden[:, -1]))
        next_ids = torch.cat([self.ids[:, 1:], tok[:, None]], dim=1)
        if isinstance(self.cache, StaticHybridCache) and not self.do_sample:
            self.fixed_heads = fixed_heads_for(self.model, self.cache)
            self.fixed_heads.prefill(hidden, next_ids)
        else:
            self.advance_mtp(hidden, next_ids, torch.full_like(tok, hidden.shape[1] - 1))
        return tok

    def draft(self, tok: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k drafted tokens (B, k) after `tok` and, when sampling, their draft distributions (B, k, V). The MTP
        cache is returned to its length afterwards: drafts are not part of the sequence yet."""
        if self.fixed_heads is not None:
            return (self.fixed_heads.draft(k) if k else tok.new_zeros(tok.shape[0], 0)), None
        length, h, drafts, qs = self.mtp_cache.get_seq_length(), self.h_mtp, [], []
        for j in range(k):
            d, q = self.choose(self.model.lm_head(h))
            drafts.append(d)
            qs.append(q)
            if j < k - 1:
                h = self.model.mtp(h[:, None], self.model.model.embed_tokens(d)[:, None], cache=self.mtp_cache)[:, 0]
        self.mtp_cache.crop(length)
        drafts = torch.stack(drafts, 1) if drafts else tok.new_zeros(tok.shape[0], 0)
        return drafts, (torch.stack(qs, 1) if self.do_sample and qs else None)

    def make_room(self, tokens: int, ahead: int) -> None:
        """A static cache must hold the next `tokens` slots; when it does not (rejected tokens leave holes, so slots
        can outrun the tokens kept), it grows to hold `ahead` more."""
        cache = self.cache
        if isinstance(cache, StaticHybridCache) and cache.seq_length + tokens > cache.max_cache_len:
            cache.grow(cache.seq_length + max(tokens, ahead))

    def verify(self, tok: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One backbone forward over [tok, drafts] (the fixed-buffer step on a static cache); returns the drafts
        accepted per row (B,) and the token that follows them (B,): the backbone's correction, or its bonus token
        when every draft was accepted."""
        self.cache.checkpointing = True
        start = self.verify_start = self.cache.seq_length
        with self.clock("verify"):
            hidden, logits = forward_new_tokens(self.model, self.cache, torch.cat([tok[:, None], drafts], dim=1))
            n_acc, new = (self._accept_sampled(logits, drafts, q) if self.do_sample
                          else _accept_greedy(logits, drafts))
        with self.clock("rollback"):
            if self.fixed_heads is not None:  # no host sync until the step's one copy (`reclaim`, after it)
                self.cache.rollback_in_place(n_acc + 1)
            else:
                self.cache.rollback(n_acc + 1)
        self.cache.checkpointing = False
        with self.clock("heads"):
            # slots up to the last kept one (eager) or all verified ones (fixed heads: rows' holes are masked)
            keep = drafts.shape[1] + 1 if self.fixed_heads is not None else int(n_acc.max()) + 1
            slots = torch.arange(keep, device=drafts.device)[None, :]  # next token of slot i: drafts[i] or `new`
            nxt = torch.where(slots < n_acc[:, None], F.pad(drafts, (0, 1))[:, :keep], new[:, None])
            if self.fixed_heads is not None:
                self.fixed_heads.update(start, hidden, nxt, n_acc)
            else:
                self.advance_mtp(hidden[:, :keep], nxt, n_acc)
        return n_acc, new

    def reclaim(self, most_accepted: int) -> None:
        """After the step's host copy, on the fixed-buffer path: the verified slots past the longest kept row hold
        no token; the next step reuses them (so batch 1 leaves no holes)."""
        if self.fixed_heads is not None:
            self.cache.reclaim(self.verify_start + most_accepted + 1)

    def _accept_sampled(self, logits, drafts, q) -> tuple[torch.Tensor, torch.Tensor]:
        """Leviathan/Chen: accept draft d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection
        draw from normalise(max(p_i − q_i, 0)), after K acceptances from p_K: every token follows p exactly."""
        p = self.probs(logits)  # (B, k+1, V)
        B, k = drafts.shape
        rows = torch.arange(B, device=logits.device)
        if k:
            pd = p[:, :k].gather(-1, drafts[..., None])[..., 0]
            qd = q.gather(-1, drafts[..., None])[..., 0]
            u = torch.rand(B, k, generator=self.generator, device=logits.device)
            n_acc = (u * qd < pd).long().cumprod(-1).sum(-1)  # u < p/q without dividing by q
            residual = torch.cat([(p[:, :k] - q).clamp(min=0), p[:, k:]], dim=1)[rows, n_acc]  # (B, V)
            target = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, n_acc])
        else:
            n_acc, target = torch.zeros(B, dtype=torch.long, device=logits.device), p[:, 0]
        return n_acc, _sample(target / target.sum(-1, keepdim=True), self.generator)


def _accept_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts accepted while they equal the backbone's argmax; the next token is the argmax after them."""
    target = logits.argmax(-1)  # (B, k+1)
    n_acc = (drafts == target[:, :-1]).long().cumprod(-1).sum(-1)
    return n_acc, target[torch.arange(target.shape[0], device=target.device), n_acc]


def _sample(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(p, 1, generator=generator)[:, 0]


class _Output:
    """Each row's new tokens: stops a row at EOS or max_new_tokens, so drafts past either are dropped."""

    def __init__(self, input_ids, max_new_tokens, eos, pad, config):
        self.ids, self.max_new = input_ids, max_new_tokens
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = pad if pad is not None else config.pad_token_id
        self.pad = pad if pad is not None else (min(self.eos) if self.eos else 0)
        self.rows: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        self.done = [False] * input_ids.shape[0]

    def commit(self, new: list[list[int]]) -> None:
        for b, tokens in enumerate(new):
            for t in tokens:
                if self.done[b]:
                    break
                self.rows[b].append(t)
                self.done[b] = t in self.eos or len(self.rows[b]) >= self.max_new

    def active(self) -> list[int]:
        return [b for b, d in enumerate(self.done) if not d]

    def all_done(self) -> bool:
        return all(self.done)

    def max_remaining(self) -> int:
        return max(self.max_new - len(self.rows[b]) for b in self.active())

    def tensor(self) -> torch.Tensor:
        B, P = self.ids.shape
        out = self.ids.new_full((B, P + max(len(r) for r in self.rows)), self.pad)
        out[:, :P] = self.ids
        for b, r in enumerate(self.rows):
            out[b, P : P + len(r)] = torch.tensor(r, dtype=out.dtype)
        return out


__all__ = ["MTPDecoder", "MultiTokenPredictor", "add_mtp_loss", "mtp_cache", "mtp_depth_losses", "mtp_depth_states",
           "mtp_loss_weights"]
