"""Encode–Think–Decode (ETD, arXiv 2510.07358) on the hybrid: encoder layers once, a think block re-applied with
tied weights, decoder layers once; a Dr.LLM layer router (arXiv 2510.12773) and MoDr LoRA experts on the think block.

Layout: `model.layers[:E]` encoder, `model.layers[E:E+K]` think block, the rest decoder; the base weights keep
their names, so a base hybrid loads into an ETD model unchanged and one plain iteration *is* the base model. The
additions live under `model.etd.*`: `layer_router.{t}.{j}` (one per iteration t and think layer j),
`expert_router.{t}.{j}` and `lora.{j}` (experts shared by the iterations, chosen per token and iteration).

Routing semantics (why a SKIP still runs the layer). Every decision is a function of one token's hidden state,
so it is causal. A think layer at iteration t always runs on the whole sequence, writing its cache slot; each token
then *selects* its output: SKIP keeps its input residual, EXECUTE takes the layer's output y, REPEAT takes a second
application of the layer to y (its own cache slot). Because every slot sees every token, a DeltaNet state or a KV
cache never depends on which tokens skipped — the state a decoding step reads is the one the full forward built,
so cached decoding equals the full forward and speculative verification stays lossless. The price: this reference
saves no FLOPs; `think_executions` counts what a router would save in an engine that runs only the selected
tokens' MLP (attention/DeltaNet state updates must still run). No input injection: iteration t+1 starts from
iteration t's output only.

Cache slots: iteration t of layer i uses cache index `t·L + i`, its REPEAT pass `(T + t)·L + i` (L layers, T
iterations), on the ordinary HybridCache (its stores are dicts keyed by layer index).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from ..errors import HybridizeError
from ..ops.dispatch import silu_mul
from .config import HybridConfig
from .modeling import HybridForCausalLM, HybridModel

SKIP, EXECUTE, REPEAT = 0, 1, 2
ROUTES = ("SKIP", "EXECUTE", "REPEAT")
ROUTER_HIDDEN = 128  # Dr.LLM's router width
EXECUTE_PRIOR = 4.0  # a fresh router's logit margin for EXECUTE: an untrained router leaves the model unchanged


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass
class ETDConfig:
    """How to loop a hybrid. Layer counts: give all three (they must sum to the model's layers) or none (25/50/25%,
    or the split `hybridize analyze-layers` proposes). `confidence_threshold`: a token leaves EXECUTE only when
    the router's probability for SKIP/REPEAT is at least this (0 = plain argmax)."""

    n_encoder_layers: int | None = None
    n_think_layers: int | None = None
    n_decoder_layers: int | None = None
    max_think_iterations: int = 2
    use_layer_router: bool = True
    use_lora_experts: bool = True
    num_lora_experts: int = 4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    confidence_threshold: float = 0.0

    def __post_init__(self):
        for name in ("n_encoder_layers", "n_think_layers", "n_decoder_layers"):
            value = getattr(self, name)
            if value is not None and not _is_int(value, 1 if name == "n_think_layers" else 0):
                low = 1 if name == "n_think_layers" else 0
                raise HybridizeError(f"ETDConfig.{name} is {value!r}; it must be an integer >= {low} (or None)")
        for name in ("max_think_iterations", "num_lora_experts", "lora_rank"):
            if not _is_int(getattr(self, name), 1):
                raise HybridizeError(f"ETDConfig.{name} is {getattr(self, name)!r}; it must be an integer >= 1")
        for name in ("use_layer_router", "use_lora_experts"):
            if not isinstance(getattr(self, name), bool):
                raise HybridizeError(f"ETDConfig.{name} is {getattr(self, name)!r}; it must be True or False")
        alpha, conf = self.lora_alpha, self.confidence_threshold
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise HybridizeError(f"ETDConfig.lora_alpha is {alpha!r}; it must be a positive number")
        if isinstance(conf, bool) or not isinstance(conf, (int, float)) or not 0 <= conf <= 1:
            raise HybridizeError(f"ETDConfig.confidence_threshold is {conf!r}; it must lie in [0, 1]")

    def resolve(self, num_layers: int) -> ETDConfig:
        """This config with explicit layer counts for a model of `num_layers` layers (checked)."""
        counts = (self.n_encoder_layers, self.n_think_layers, self.n_decoder_layers)
        if all(c is None for c in counts):
            counts = default_split(num_layers)
        elif any(c is None for c in counts):
            raise HybridizeError("ETDConfig: give all three of n_encoder_layers, n_think_layers, n_decoder_layers, "
                                 "or none (25/50/25% split)")
        if sum(counts) != num_layers:
            raise HybridizeError(f"ETDConfig: {counts[0]} encoder + {counts[1]} think + {counts[2]} decoder layers "
                                 f"= {sum(counts)}, but the model has {num_layers}")
        enc, think, dec = counts
        return ETDConfig(**{**asdict(self), "n_encoder_layers": enc, "n_think_layers": think,
                            "n_decoder_layers": dec})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> ETDConfig:
        if not isinstance(data, dict):
            raise HybridizeError(f"the etd config must be an object, got {data!r}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise HybridizeError(f"unknown ETDConfig fields: {', '.join(unknown)}")
        return cls(**data)


def default_split(num_layers: int) -> tuple[int, int, int]:
    """25/50/25%: (encoder, think, decoder) layer counts; the think block always gets at least one layer."""
    outer = num_layers // 4
    return outer, num_layers - 2 * outer, outer


class ETDHybridConfig(HybridConfig):
    """A HybridConfig plus `etd` (an ETDConfig as a dict, layer counts resolved): its own model_type, so that
    Auto classes build an ETDForCausalLM and `export` can tell an ETD model from a plain hybrid."""

    model_type = "hybridize_etd"
    etd: dict | None = None

    def etd_config(self) -> ETDConfig:
        return ETDConfig.from_dict(self.etd or {}).resolve(self.num_hidden_layers)

    def validate_architecture(self):
        super().validate_architecture()
        self.etd_config()


# ------------------------------------------------------------------------------------------------------- modules


class LayerRouter(nn.Module):
    """Dr.LLM's router for one think layer and iteration: Linear d→128, GELU, Linear 128→3 (SKIP, EXECUTE,
    REPEAT) on one token's hidden state (no pooling over the sequence: pooling would break causality)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, ROUTER_HIDDEN), nn.GELU(), nn.Linear(ROUTER_HIDDEN, len(ROUTES)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, T, 3)


class ExpertRouter(nn.Module):
    """Top-1 choice among the LoRA experts per token, balanced DeepSeek-V3 style: `balance_bias` shifts the choice
    only (not the gate) and is moved by `update_expert_bias` from the observed load, outside the gradient."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.register_buffer("balance_bias", torch.zeros(num_experts))
        self.load: torch.Tensor | None = None  # tokens routed to each expert since the last bias update

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.proj(x).float().softmax(-1)  # (B, T, E)
        choice = (scores + self.balance_bias).argmax(-1)  # (B, T)
        if self.training:
            with torch.no_grad():
                counts = F.one_hot(choice.flatten(), scores.shape[-1]).sum(0).float()  # bincount syncs on CUDA
                self.load = counts if self.load is None else self.load + counts
        return choice, scores.gather(-1, choice[..., None])[..., 0].to(x.dtype)


class LoRAExperts(nn.Module):
    """`E` LoRA experts on one think layer's MLP projections (gate, up, down). B starts at zero, so an untrained
    expert adds exactly nothing. Shapes: `{proj}_A` (E, r, in), `{proj}_B` (E, out, r)."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, rank: int, alpha: float):
        super().__init__()
        self.scaling = alpha / rank
        for name, (n_in, n_out) in {"gate": (hidden, intermediate), "up": (hidden, intermediate),
                                    "down": (intermediate, hidden)}.items():
            setattr(self, f"{name}_A", nn.Parameter(torch.empty(num_experts, rank, n_in)))
            setattr(self, f"{name}_B", nn.Parameter(torch.zeros(num_experts, n_out, rank)))

    def delta(self, name: str, x: torch.Tensor, choice: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """scaling · gate · B_e A_e x for each token's expert e = choice; x (B, T, in) -> (B, T, out).

        Every expert's rank-r projection A_e x is computed (E·r columns, a few % of the MLP's own matmul), the
        unchosen ones are zeroed, and one matmul with all B_e side by side adds the chosen one: two dense matmuls,
        no host sync. A gather and scatter per expert (the way before 2026-12-03) needed the set of chosen experts
        and each one's rows on the host: several syncs per projection, think layer and iteration."""
        A, B = getattr(self, f"{name}_A"), getattr(self, f"{name}_B")  # (E, r, in), (E, out, r)
        E, r = A.shape[:2]
        low = (x @ A.reshape(E * r, -1).T).unflatten(-1, (E, r))  # (B, T, E, r)
        low = low * F.one_hot(choice, E).to(low.dtype)[..., None]
        out = low.flatten(-2) @ B.transpose(1, 2).reshape(E * r, -1)  # (B, T, E·r) @ (E·r, out)
        return out * (self.scaling * gate)[..., None]


def mlp_with_experts(mlp: nn.Module, experts: LoRAExperts, router: ExpertRouter, record: list | None = None):
    """The MLP with each token's chosen LoRA expert on gate_proj, up_proj and down_proj (a drop-in for mlp)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        choice, gate = router(x)
        if record is not None:
            record.append(choice)
        g = mlp.gate_proj(x) + experts.delta("gate", x, choice, gate)
        u = mlp.up_proj(x) + experts.delta("up", x, choice, gate)
        a = silu_mul(g, u) if mlp.swiglu else mlp.act_fn(g) * u
        return mlp.down_proj(a) + experts.delta("down", a, choice, gate)

    return run


class ETDModules(nn.Module):
    """Everything ETD adds to a hybrid: routers per (iteration, think layer), experts per think layer."""

    def __init__(self, config: ETDHybridConfig):
        super().__init__()
        etd = self.settings = config.etd_config()
        d, grid = config.hidden_size, range(etd.max_think_iterations)
        if etd.use_layer_router:
            self.layer_router = nn.ModuleList(
                nn.ModuleList(LayerRouter(d) for _ in range(etd.n_think_layers)) for _ in grid)
        if etd.use_lora_experts:
            self.expert_router = nn.ModuleList(
                nn.ModuleList(ExpertRouter(d, etd.num_lora_experts) for _ in range(etd.n_think_layers)) for _ in grid)
            self.lora = nn.ModuleList(
                LoRAExperts(d, config.intermediate_size, etd.num_lora_experts, etd.lora_rank, etd.lora_alpha)
                for _ in range(etd.n_think_layers))


def init_etd_module(module: nn.Module, std: float) -> None:
    """Init table of the ETD additions: routers' first Linear N(0, std²); layer routers' last Linear weight 0 with a
    bias favouring EXECUTE (an untrained router changes nothing); LoRA A Kaiming-uniform (as PEFT), B 0."""
    if isinstance(module, LayerRouter):
        first, last = module.net[0], module.net[2]
        init.normal_(first.weight, std=std)
        init.zeros_(first.bias)
        init.zeros_(last.weight)
        init.copy_(last.bias, torch.tensor([0.0, EXECUTE_PRIOR, 0.0]))
    elif isinstance(module, ExpertRouter):
        init.normal_(module.proj.weight, std=std)
        init.zeros_(module.balance_bias)
    elif isinstance(module, LoRAExperts):
        for name, p in module.named_parameters():
            if name.endswith("_A"):
                bound = 1 / math.sqrt(p.shape[-1])
                init.uniform_(p, -bound, bound)
            else:
                init.zeros_(p)


# ------------------------------------------------------------------------------------------------------- model


class CacheSlots:
    """A view of a HybridCache that shifts layer indices by `offset`: one think pass's own states."""

    def __init__(self, cache, offset: int):
        self.cache, self.offset = cache, offset

    @property
    def checkpointing(self) -> bool:
        """Speculative verify steps keep every position's state in each slot too (see HybridCache.rollback)."""
        return self.cache.checkpointing

    def update_kv(self, layer_idx: int, k, v):
        return self.cache.update_kv(layer_idx + self.offset, k, v)

    def linear_state(self, layer_idx: int):
        return self.cache.linear_state(layer_idx + self.offset)

    def update_linear_state(self, layer_idx: int, conv_state, recurrent_state) -> None:
        self.cache.update_linear_state(layer_idx + self.offset, conv_state, recurrent_state)


def _slot(cache, offset: int):
    return cache if cache is None or offset == 0 else CacheSlots(cache, offset)


class _ETDInitMixin:
    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_etd_module(module, self.config.initializer_range)


class ETDModel(_ETDInitMixin, HybridModel):
    """HybridModel whose decoder stack runs encode → think × T → decode.

    `forced_routes` (B, T, K) long, set by router search/training, overrides the routers' decisions per sequence;
    `last_routing` holds the last forward's router logits, decisions and expert choices, in (iteration, layer)
    order, for losses and statistics."""

    graph_capturable = False  # `last_routing` is a Python-side record of each forward: a CUDA graph would freeze it

    config_class = ETDHybridConfig

    def __init__(self, config: ETDHybridConfig):
        super().__init__(config)
        self.etd = ETDModules(config)
        self.forced_routes: torch.Tensor | None = None
        self.last_routing: dict[str, list[torch.Tensor]] = {}
        self.post_init()

    def run_layers(self, x, position_embeddings, attn_mask, pad_mask, cache, hidden_states: list | None):
        etd = self.etd.settings
        self.last_routing = {"router_logits": [], "decisions": [], "expert_choice": []}

        def step(layer, x, slot, mlp=None):
            return layer(x, position_embeddings, attn_mask=attn_mask, pad_mask=pad_mask, cache=slot, mlp=mlp)

        begin, end = etd.n_encoder_layers, etd.n_encoder_layers + etd.n_think_layers
        schedule = [(None, i) for i in range(begin)]
        schedule += [(t, i) for t in range(etd.max_think_iterations) for i in range(begin, end)]
        schedule += [(None, i) for i in range(end, len(self.layers))]
        for t, i in schedule:
            layer = self.layers[i]
            x = step(layer, x, cache) if t is None else self._think(t, i - begin, layer, x, step, cache)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def _think(self, t: int, j: int, layer, x, step, cache):
        """Think layer j at iteration t: run, then each token selects SKIP / EXECUTE / REPEAT (see module doc)."""
        L, T = self.config.num_hidden_layers, self.etd.settings.max_think_iterations
        mlp = None
        if self.etd.settings.use_lora_experts:
            mlp = mlp_with_experts(layer.mlp, self.etd.lora[j], self.etd.expert_router[t][j],
                                   self.last_routing["expert_choice"])
        decision = self._decide(t, j, x)
        y = step(layer, x, _slot(cache, t * L), mlp)
        if decision is None:
            return y
        y2 = step(layer, y, _slot(cache, (T + t) * L), mlp)
        decision = decision[..., None]  # (B, T, 1)
        return torch.where(decision == SKIP, x, torch.where(decision == EXECUTE, y, y2))

    def _decide(self, t: int, j: int, x: torch.Tensor) -> torch.Tensor | None:
        """(B, T) route per token from the router (argmax; EXECUTE unless confident), or the forced routes."""
        if not self.etd.settings.use_layer_router:
            return None
        logits = self.etd.layer_router[t][j](x)  # (B, T, 3)
        if self.forced_routes is not None:
            decision = self.forced_routes[:, t, j, None].expand(x.shape[:2]).to(x.device)
        else:
            confidence, decision = logits.detach().float().softmax(-1).max(-1)
            decision = torch.where(confidence < self.etd.settings.confidence_threshold, EXECUTE, decision)
        self.last_routing["router_logits"].append(logits)
        self.last_routing["decisions"].append(decision)
        return decision


class ETDForCausalLM(_ETDInitMixin, HybridForCausalLM):
    """HybridForCausalLM with an ETDModel inside; same head, loss, cache and `generate`."""

    config_class = ETDHybridConfig
    backbone_class = ETDModel

    def think_executions(self) -> dict[str, float]:
        """Think-layer executions of the last forward against always-EXECUTE (per token; REPEAT counts twice)."""
        decisions = self.model.last_routing.get("decisions") or []
        if not decisions:
            return {"executions": 1.0, "saved": 0.0}
        d = torch.stack([x.reshape(-1) for x in decisions]).long()
        runs = ((d == EXECUTE).float() + 2 * (d == REPEAT).float()).mean().item()
        return {"executions": runs, "saved": 1.0 - runs}


def etd_from_hybrid(model: HybridForCausalLM, etd: ETDConfig) -> ETDForCausalLM:
    """An ETD model that reuses `model`'s modules (no copy), with freshly initialised routers and experts: one plain
    iteration of it computes exactly what `model` computes. `model` should not be used on its own afterwards."""
    if isinstance(model, ETDForCausalLM):
        raise HybridizeError("the model is already an ETD model")
    if not isinstance(etd, ETDConfig):
        raise HybridizeError(f"etd_config must be an ETDConfig, got {type(etd).__name__}")
    base = model.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        base.pop(key, None)
    config = ETDHybridConfig(**base, etd=etd.resolve(model.config.num_hidden_layers).to_dict())
    config.architectures = ["ETDForCausalLM"]
    with torch.device("meta"):
        out = ETDForCausalLM(config)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        setattr(out.model, name, getattr(model.model, name))
    out.lm_head, out.mtp = model.lm_head, model.mtp  # MTP heads (if any) read the ETD backbone's last hidden state
    param = next(model.parameters())
    out.model.etd.to_empty(device=param.device)
    out.model.etd.to(param.dtype)
    for module in out.model.etd.modules():
        init_etd_module(module, config.initializer_range)
    out.generation_config = model.generation_config
    return out.train(model.training)


__all__ = ["ETDConfig", "ETDHybridConfig", "ETDModel", "ETDForCausalLM", "etd_from_hybrid", "default_split",
           "SKIP", "EXECUTE", "REPEAT"]
