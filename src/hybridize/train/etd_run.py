"""`hybridize train-etd MODEL OUT --data PATH --part routers|experts`: train ETD's routers or experts, base frozen.

MODEL is an ETD folder, or a plain hybrid that is wrapped first (`--iterations`, `--split`, expert flags). The
windows are the first `--tokens` tokens of --data, batch k of step s is fixed by s, and OUT/model holds the model
plus `trainer_state.pt` (step, optimizer, losses), replaced atomically every `--save-every` steps: `--resume`
continues exactly where the last save left off. Routers: per-batch greedy route search, then one focal-loss step
(train/etd.py); experts: one CE step, or KL to `--teacher`'s logits (the source, or the base hybrid), then the
balance-bias update. On CUDA the forwards run under bfloat16 autocast and the teacher in bfloat16 (the trained
routers and experts and AdamW stay float32).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..device import resolve_device
from ..errors import HybridizeError
from ..model.etd import ETDConfig, ETDForCausalLM, etd_from_hybrid
from .data import first_windows
from .etd import PARTS, expert_step, freeze_for, router_step, search_routes

STATE = "trainer_state.pt"


@dataclass
class TrainETDConfig:
    """`hybridize train-etd` settings; fields map 1:1 onto its flags."""

    part: str = "experts"
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 4
    seq_len: int = 256
    tokens: int = 65_536
    gamma: float = 2.0
    skip_bonus: float = 0.0
    balance_rate: float = 1e-3
    save_every: int = 50
    iterations: int = 2
    split: list[int] | None = None
    num_experts: int = 4
    lora_rank: int = 8
    seed: int = 0
    teacher: str | None = None
    data: list[str] = field(default_factory=list)
    device: str = "auto"  # the GPU when there is one (see hybridize.device)

    def __post_init__(self):
        if self.part not in PARTS:
            raise HybridizeError(f"unknown part {self.part!r}; choose one of {', '.join(PARTS)}")
        if self.split is not None and len(self.split) != 3:
            raise HybridizeError(f"--split takes three numbers E,K,D (encoder, think, decoder), got {self.split}")
        if min(self.steps, self.batch_size, self.tokens, self.save_every) < 1 or self.lr <= 0 or self.seq_len < 2:
            raise HybridizeError("need steps, batch_size, tokens, save_every >= 1, seq_len >= 2 and lr > 0")

    def etd_config(self) -> ETDConfig:
        enc, think, dec = self.split or (None, None, None)
        return ETDConfig(enc, think, dec, max_think_iterations=self.iterations, num_lora_experts=self.num_experts,
                         lora_rank=self.lora_rank, lora_alpha=2.0 * self.lora_rank)


def _load(model_path: str, cfg: TrainETDConfig) -> ETDForCausalLM:
    from .models import load_language_model

    model = load_language_model(model_path, torch.float32, progress=False)
    if isinstance(model, ETDForCausalLM):
        return model
    torch.manual_seed(cfg.seed)  # the new routers' and experts' init: a run is reproducible
    return etd_from_hybrid(model, cfg.etd_config())


def _save(model: ETDForCausalLM, tokenizer, state: dict, out: Path) -> None:
    """Write OUT/model next to itself, then swap it in: a crash leaves the previous save intact."""
    tmp, final = out / "model.tmp", out / "model"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(state, tmp / STATE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _step(model, batch, optimizer, cfg: TrainETDConfig, teacher=None) -> float:
    if cfg.part == "routers":
        model.eval()
        routes, _ = search_routes(model, batch, cfg.skip_bonus)
        return router_step(model, batch, routes, optimizer, cfg.gamma)
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(batch).logits
    return expert_step(model, batch, optimizer, teacher_logits, balance_rate=cfg.balance_rate)


def train_etd(model_path: str, out: str | Path, cfg: TrainETDConfig, resume: bool = False, force: bool = False,
              progress: bool = True) -> dict:
    """Train `cfg.part` of an ETD model (base frozen); returns the step count and first/last losses."""
    from .models import load_tokenizer

    out = Path(out).expanduser()
    saved = out / "model"
    if resume and not (saved / STATE).is_file():
        raise HybridizeError(f"nothing to resume in {out} (no model/{STATE})")
    if out.exists() and not resume and not force:
        raise HybridizeError(f"{out} already exists; pass --resume to continue it or --force to replace it")
    if not cfg.data:
        raise HybridizeError("--data is required: text to train on")
    device = resolve_device(cfg.device)
    windows = first_windows(model_path, cfg.data, cfg.tokens, cfg.seq_len).to(device)
    tokenizer = load_tokenizer(model_path)
    model = (ETDForCausalLM.from_pretrained(saved) if resume else _load(model_path, cfg)).to(device)
    teacher = None
    if cfg.teacher and cfg.part == "experts":
        from .models import load_language_model

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # inference only: bf16 on a GPU
        teacher = load_language_model(cfg.teacher, dtype, progress=False).to(device).eval()
    freeze_for(model, cfg.part)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    state = {"step": 0, "losses": []}
    if resume:
        state = torch.load(saved / STATE, map_location="cpu", weights_only=True)  # AdamW moves it to the params
        optimizer.load_state_dict(state.pop("optimizer"))
    elif out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    for step in tqdm(range(state["step"], cfg.steps), desc=f"train-etd {cfg.part}", disable=not progress):
        first = (step * cfg.batch_size) % len(windows)
        batch = windows[first:first + cfg.batch_size]
        state["losses"].append(_step(model, batch, optimizer, cfg, teacher))
        state["step"] = step + 1
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.steps:
            _save(model, tokenizer, {**state, "optimizer": optimizer.state_dict()}, out)
    losses = state["losses"]
    return {"out": str(saved), "part": cfg.part, "steps": state["step"],
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}


__all__ = ["TrainETDConfig", "train_etd"]
