"""`hybridize train-mtp`: train a hybrid's MTP heads alone, backbone frozen, on the backbone's own predictions.

Retrofitted heads get their acceptance from self-distillation: what speculative decoding accepts is the
backbone's own next token, not the corpus's, so depth k at position i is trained on the backbone's argmax at
position i+k (teacher-forced on the corpus tokens). The backbone runs once per batch under no_grad; only `mtp.*`
has gradients. A model without heads gets fresh ones (mtp_num_hidden_layers = 1). Not resumable (yet): a run is
short next to `distill`, and is repeated from the start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import HybridizeError
from ..model.modeling import HybridForCausalLM
from ..model.mtp import MultiTokenPredictor, mtp_depth_losses
from ..output import TOKENIZER_FILES, atomic_output_folder, check_not_an_input, copy_side_files
from .data import PackedBatches, load_or_build_tokens
from .models import load_tokenizer


@dataclass
class TrainMTPConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-3
    num_predict_tokens: int | None = None  # None: keep the model's
    seed: int = 0


def self_distillation_labels(model: HybridForCausalLM, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the backbone's normed hidden states, labels whose position j+1 holds the backbone's argmax at j): with
    these labels `mtp_depth_losses` scores depth k at i on the token the backbone itself predicts at i+k."""
    with torch.no_grad():
        hidden, _ = model.model(input_ids)
        predicted = model.lm_head(hidden).argmax(-1)  # (B, T): the backbone's next token after each position
    return hidden, torch.cat([input_ids[:, :1], predicted[:, :-1]], dim=1)


def add_mtp_heads(model: HybridForCausalLM, num_predict_tokens: int | None) -> None:
    """Give a model without MTP heads fresh ones (random, as `_init_weights` makes them) on the model's device and
    in its dtype (a meta-device skeleton gets meta heads, filled by rank 0's broadcast); set the depth count.
    Shared by `train-mtp` and `distill --mtp` (DistillationTrainer)."""
    if num_predict_tokens is not None:
        model.config.num_predict_tokens = num_predict_tokens
    if model.mtp is None:
        model.config.mtp_num_hidden_layers = 1
        weight = model.lm_head.weight
        with torch.device(weight.device):
            mtp = MultiTokenPredictor(model.config)
        mtp.apply(model._init_weights)
        model.mtp = mtp.to(weight.dtype)
    model.config.validate_mtp()


def train_mtp(model: HybridForCausalLM, batches: PackedBatches, config: TrainMTPConfig,
              progress: bool = False) -> list[list[float]]:
    """Train `model.mtp` in place, backbone frozen; returns each step's per-depth losses."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("mtp."))
    opt = torch.optim.AdamW(model.mtp.parameters(), lr=config.lr, weight_decay=0.0)
    model.train()
    history = []
    for step in range(config.steps):
        ids = torch.cat(batches.next_step()).long()
        hidden, labels = self_distillation_labels(model, ids)
        losses = mtp_depth_losses(model.mtp, model.lm_head, hidden, model.model.embed_tokens(ids), labels, None,
                                  model.config.num_predict_tokens)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        opt.step()
        history.append(losses.tolist())
        if progress and (step % 10 == 0 or step == config.steps - 1):
            print(f"step {step + 1}/{config.steps}: " + " ".join(f"L{k + 1} {v:.3f}" for k, v in
                                                                enumerate(history[-1])), flush=True)
    model.eval()
    return history


def run_train_mtp(model_dir: str | Path, data: list[str], out: str | Path, config: TrainMTPConfig,
                  force: bool = False, progress: bool = True) -> dict:
    """Load MODEL, train its MTP heads on `data`, write the whole model (heads included) to `out`."""
    start = time.perf_counter()
    model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser().absolute()
    check_not_an_input(out, [model_dir, *data], what="--out")
    if out.exists() and not force:
        raise HybridizeError(f"{out} already exists; pass --force to replace it")
    if not (model_dir / "config.json").is_file():
        raise HybridizeError(f"{model_dir} is not a model folder: no config.json")
    torch.manual_seed(config.seed)
    model = HybridForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_mtp_heads(model, config.num_predict_tokens)
    tokenizer = load_tokenizer(model_dir)
    tokens = load_or_build_tokens(data, tokenizer, model.config.eos_token_id, None, progress=progress,
                                  vocab_size=model.config.vocab_size)
    batches = PackedBatches(tokens, config.seq_len, config.batch_size, seed=config.seed)
    history = train_mtp(model, batches, config, progress)
    with atomic_output_folder(out, force, inputs=[model_dir]) as tmp:
        model.save_pretrained(tmp)
        copy_side_files((model_dir / f for f in TOKENIZER_FILES), tmp, model.config)
    return {"output": str(out), "seconds": round(time.perf_counter() - start, 2), "steps": config.steps,
            "first_losses": [round(v, 4) for v in history[0]], "last_losses": [round(v, 4) for v in history[-1]]}


__all__ = ["TrainMTPConfig", "add_mtp_heads", "run_train_mtp", "self_distillation_labels", "train_mtp"]
