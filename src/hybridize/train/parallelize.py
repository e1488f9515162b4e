"""Process group, device and FSDP2 sharding, kept out of the models (the torchtitan split).

A single process without torchrun gets a world of one, so gradient reduction and checkpoints run the same code
everywhere. CPU runs use gloo, CUDA runs NCCL. N processes shard student and teacher with FSDP2; one process
can train plain modules instead (`DistillConfig.sharding` "none"), with the same mixed-precision contract.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..errors import HybridizeError
from .config import SHARDINGS


@dataclass
class DistEnv:
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_started = False  # whether this process ever joined a process group (see started_process_group)


def started_process_group() -> bool:
    """Whether init_distributed ran in this process: its gloo / NCCL worker threads may outlive the group."""
    return _started


def init_distributed(device: str | None = None) -> DistEnv:
    """Join torchrun's process group (or make a world of one) and pick this rank's device.

    device: "cuda" / "cpu" / None (CUDA when available). Idempotent.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("CUDA was asked for but is not available")
    backend = "nccl" if use_cuda else "gloo"
    global _started
    _started = True
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


def resolve_sharding(sharding: str, world_size: int) -> str:
    """"fsdp" or "none" for DistillConfig.sharding: "auto" shards only when there is more than one process.

    One process has nothing to shard: FSDP2 there only adds per-layer gathers, casts and hooks (thousands of
    kernel launches per step at SmolLM2 sizes, a CPU-bound step), so "auto" trains it as plain modules. (Not the
    default yet: see DistillConfig.sharding.)"""
    if sharding not in SHARDINGS:
        raise HybridizeError(f"sharding must be one of {', '.join(SHARDINGS)}, got {sharding!r}")
    if sharding == "none" and world_size > 1:
        raise HybridizeError(f"--sharding none trains in one process, but this run has {world_size}: use --sharding "
                             f"fsdp (or auto), or run without torchrun")
    if sharding == "auto":
        return "fsdp" if world_size > 1 else "none"
    return sharding


class Parallelized:
    """How `parallelize` laid the objective out for training; the trainer's one handle on it.

    The trainer wraps every optimizer step (and evaluation) in `compute_weights()`, and each micro-batch's forward
    and backward in `micro_step(last)`; both paths keep the same contract: float32 master weights, gradients and
    optimizer state, compute in `compute_dtype`, gradients summed in float32 over micro-batches."""

    sharding = "fsdp"

    def __init__(self, objective: nn.Module, compute_dtype: torch.dtype):
        self.objective, self.compute_dtype = objective, compute_dtype

    @property
    def sharded(self) -> bool:
        return self.sharding == "fsdp"

    @contextmanager
    def compute_weights(self):
        """FSDP2 gathers and casts each unit's weights itself, around its forward and backward."""
        yield

    @contextmanager
    def micro_step(self, last: bool):
        """Reduce-scatter the gradients once per step, after the last micro-batch's backward."""
        self.objective.set_requires_gradient_sync(last)
        yield


class Unsharded(Parallelized):
    """One process, plain modules: FSDP2's mixed precision (MixedPrecisionPolicy(param_dtype=compute,
    reduce_dtype=float32)) without its per-layer machinery.

    The teacher is frozen, so `parallelize` stores its parameters in the compute dtype once: no per-step cast at
    all. The student keeps float32 masters (what the optimizer, clipping, checkpoints and the export see); inside
    `compute_weights()` its parameters hold compute-dtype copies, refreshed from the masters with one foreach copy
    per step, as FSDP2's unsharded parameters do; each micro-batch's gradients (in the compute dtype) are added
    to float32 buffers with one foreach add, and on exit the masters come back with those float32 gradients.
    Why not torch.autocast: it casts every weight at every use (again in each recomputation and micro-batch), and
    each linear's float32 input and the gradients back, a few kernels per matmul per micro-batch, where this needs
    one foreach copy per step and one foreach add per micro-batch (one call each; at worst one kernel per tensor);
    and autocast keeps the residual stream in float32 where FSDP's bf16 parameters give bf16, so the two paths
    would not compute the same model (this one matches FSDP2 in a world of one bit for bit on a CPU, tested). With
    float32 compute (the CPU default) or bf16 compute and bf16 master weights nothing is copied: the modules train
    as they are."""

    sharding = "none"

    def __init__(self, objective: nn.Module, compute_dtype: torch.dtype):
        super().__init__(objective, compute_dtype)
        self.params = [p for p in objective.student.parameters()
                       if p.is_floating_point() and p.dtype != compute_dtype]
        self.copies = [torch.empty_like(p, dtype=compute_dtype) for p in self.params]
        self.grads: list[torch.Tensor | None] | None = None  # this step's float32 gradients (views of one buffer)
        self.swapped = False

    @contextmanager
    def compute_weights(self):
        if not self.params or self.swapped:
            yield
            return
        masters = [p.data for p in self.params]
        torch._foreach_copy_(self.copies, masters)
        for p, copy in zip(self.params, self.copies, strict=True):
            p.data = copy
        self.swapped = True
        try:
            yield
        finally:
            grads = self.grads or [None] * len(self.params)
            for p, master, grad in zip(self.params, masters, grads, strict=True):
                p.data = master
                if grad is not None:
                    p.grad = grad.to(master.dtype)  # no copy for float32 masters
            self.swapped, self.grads = False, None

    def _float32_grads(self) -> list[torch.Tensor | None]:
        """Zeroed float32 gradients of the trainable parameters, views of one buffer for the step (freed with the
        gradients after the optimizer step)."""
        trainable = [p for p in self.params if p.requires_grad]
        flat = torch.zeros(sum(p.numel() for p in trainable), dtype=torch.float32, device=self.params[0].device)
        views = iter(flat.split([p.numel() for p in trainable]))
        return [next(views).view_as(p) if p.requires_grad else None for p in self.params]

    @contextmanager
    def micro_step(self, last: bool):
        """Add this micro-batch's compute-dtype gradients to the step's float32 ones (one process: no reduction)."""
        yield
        if not self.swapped:  # float32 compute: gradients already accumulate in float32 on the parameters
            return
        fresh = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not fresh:
            return
        if self.grads is None:
            self.grads = self._float32_grads()
        torch._foreach_add_([self.grads[i] for i in fresh], [self.params[i].grad for i in fresh])
        for i in fresh:
            self.params[i].grad = None


def parallelize(objective: nn.Module, env: DistEnv, param_dtype: torch.dtype, grad_checkpointing: bool = False,
                sharding: str = "auto") -> Parallelized:
    """Lay out `objective` (student + frozen teacher) for training: activation checkpointing per block, then
    FSDP2 over the world, or plain modules in one process (`resolve_sharding` decides; see `Unsharded`).

    FSDP2: one unit per decoder layer of student and teacher, and the root (embeddings, final norms, lm_heads, and
    the student's MTP module when it has one) as the objective itself. The MTP module (one decoder layer, run once
    per depth inside the objective's forward) stays in the root unit: it is used while the root's parameters are
    gathered anyway, and a unit of its own would be gathered and freed once per depth. Compute in `param_dtype`,
    gradients reduced in float32; the student's master weights stay in their stored dtype (float32 for training)."""
    if grad_checkpointing:  # transformers' per-layer checkpointing, renamed after 5.17
        student, kwargs = objective.student, {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if resolve_sharding(sharding, env.world_size) == "none":
        if objective.teacher is not None:  # frozen: the compute dtype is all it needs (buffers such as RoPE stay)
            with torch.no_grad():
                for p in objective.teacher.parameters():
                    p.data = p.data.to(param_dtype)
        return Unsharded(objective, param_dtype)
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
    return Parallelized(objective, param_dtype)


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
