"""Resumable checkpoints through torch.distributed.checkpoint (DCP).

A checkpoint is `RUN_DIR/checkpoints/step_XXXXXXXX/`: the sharded model and optimizer (DCP files, any world size
can read them), `trainer_state.json` (step, tokens, data position, scheduler, counters) and one
`rng_rank{r}.safetensors` per rank. It is written under a `.tmp` name and renamed when every rank has finished,
so a kill -9 mid-write leaves the previous checkpoint as the latest complete one. The last `keep` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import HybridizeError

STATE_FILE = "trainer_state.json"
PREFIX = "step_"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (unfinished `.tmp` folders are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, rank: int, device: torch.device, keep: int = 2) -> Path:
    """Write everything a resume needs; collective (every rank calls it)."""
    final = checkpoint_root(run_dir) / f"{PREFIX}{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    save_file(_rng_state(device), str(tmp / f"rng_rank{rank}.safetensors"))
    _barrier()
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                    device: torch.device) -> dict:
    """Restore model, optimizer and this rank's RNG in place; return the trainer state."""
    try:
        trainer_state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise HybridizeError(f"cannot read checkpoint {path}: {e}") from None
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng_rank{rank}.safetensors"
    if rng.is_file():  # absent when resuming on more ranks than saved: those start from the seed
        _set_rng_state(load_file(str(rng)), device)
    return trainer_state
