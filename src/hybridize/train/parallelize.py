"""Process group, device and FSDP2 sharding, kept out of the models (the torchtitan split).

One code path for 1 and N processes: a single process without torchrun gets a world of one, so mixed precision,
gradient reduction and checkpoints behave the same everywhere. CPU runs use gloo, CUDA runs NCCL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistEnv:
    """Join torchrun's process group (or make a world of one) and pick this rank's device.

    device: "cuda" / "cpu" / None (CUDA when available). Idempotent.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("CUDA was asked for but is not available")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
            device_id = None
            if use_cuda:
                device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(device_id)
            dist.init_process_group(backend, device_id=device_id)
        else:
            if use_cuda:
                torch.cuda.set_device(0)
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    return DistEnv(dist.get_rank(), dist.get_world_size(), dev, mesh)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _layers(lm: nn.Module) -> list[nn.Module]:
    return list(lm.model.layers)


def parallelize(objective: nn.Module, env: DistEnv, param_dtype: torch.dtype,
                grad_checkpointing: bool = False) -> nn.Module:
    """Activation checkpointing per block, then FSDP2: one unit per decoder
    layer of student and teacher, and the root (embeddings, final norms, lm_heads) as the objective itself.
    Compute in `param_dtype`, gradients reduced in float32; the student's master weights stay in their stored
    dtype (float32 for training)."""
    if grad_checkpointing:  # transformers' per-layer checkpointing, renamed after 5.17
        student, kwargs = objective.student, {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    models = [objective.student] + ([objective.teacher] if objective.teacher is not None else [])
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # One unit per decoder layer, also in one process. (A single root unit for one process, to save FSDP's
    # per-layer hooks, stalled the first CUDA backward on an H200 on 2026-11-28; not adopted until understood.)
    for lm in models:
        layers = _layers(lm)
        for i, layer in enumerate(layers):
            # the student's last layer stays gathered after forward: its backward starts right away (torchtitan)
            keep = lm is objective.student and i == len(layers) - 1
            fully_shard(layer, mesh=env.mesh, mp_policy=policy, reshard_after_forward=not keep)
    fully_shard(objective, mesh=env.mesh, mp_policy=policy)
    return objective


def full_states(objective: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Rank 0's full (unsharded) weights of student and teacher, taken before sharding: references, no copies."""
    models = {"student": objective.student, "teacher": objective.teacher}
    return {name: lm.state_dict() for name, lm in models.items() if lm is not None}


def broadcast_from_rank0(objective: nn.Module, env: DistEnv, states: dict | None) -> None:
    """Fill every rank's shards from rank 0's weights (`states`), after `parallelize`.

    Only rank 0 reads the checkpoints; the other ranks built meta-device skeletons, so host memory holds one copy
    of each model, not one per GPU. Buffers (RoPE frequencies) are not sharded: they are copied whole.
    """
    if env.world_size == 1:
        return
    if not env.is_main:
        objective.to_empty(device=env.device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for name, lm in (("student", objective.student), ("teacher", objective.teacher)):
        if lm is not None:
            set_model_state_dict(lm, states[name] if env.is_main else {}, options=options)
    for buffer in objective.buffers():
        dist.broadcast(buffer, src=0)
    for module in objective.modules():  # RoPE keeps a plain-attribute copy of its frequencies for dynamic scaling
        if hasattr(module, "original_inv_freq") and hasattr(module, "inv_freq"):
            module.original_inv_freq = module.inv_freq.clone()
