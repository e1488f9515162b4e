"""Resumable checkpoints through torch.distributed.checkpoint (DCP), in a layout that is read without pickle.

A checkpoint is `RUN_DIR/checkpoints/step_XXXXXXXX/`:

    state/shard-0000R-model-00001-of-00001.safetensors   each rank's shards of the model and the optimizer state
    rng_rank{r}.safetensors                              each rank's RNG state
    trainer_state.json                                   step, tokens, data position, scheduler, counters, config,
                                                         the optimizer's hyperparameters and the list of files

DCP's default FileSystemReader unpickles `.metadata` (and non-tensor values), so a crafted run folder could run code
on `--resume`. Here the tensors go through DCP's safetensors storage (`HuggingFaceStorageWriter/Reader`: each rank
writes its own shards with their offsets, and any world size can read them back), the few non-tensor values go to
JSON, and nothing is ever unpickled: what `--resume` trusts in a run folder is only that its numbers are the ones
a run wrote. The JSON is validated, the files must be exactly those listed with the listed sizes, and every tensor
must be covered by the shards, so a damaged checkpoint is refused in one line instead of loading stale values.

A checkpoint is written under a `.tmp` name and renamed when every rank has finished, so a kill -9 mid-write leaves
the previous checkpoint as the latest complete one; a failed write (disk full) removes the `.tmp` and says so. The
last `keep` are kept.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..errors import HybridizeError, one_line

STATE_FILE = "trainer_state.json"
PREFIX = "step_"
TENSORS = "state"  # the DCP folder inside a checkpoint
FORMAT = 2  # 1: DCP's pickle-based default layout (refused), 2: this one


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


def remove_unfinished(run_dir: Path) -> None:
    """Delete `step_N.tmp` folders that a killed or failed save left behind (rank 0, before training)."""
    root = checkpoint_root(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(PREFIX) and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ errors


def _causes(e: BaseException) -> list[BaseException]:
    """`e` and what it wraps (DCP's CheckpointException carries each rank's exception)."""
    out, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is y for y in out):
            continue
        out.append(x)
        if isinstance(x, CheckpointException):
            todo += [pair[0] for pair in x.failures.values()]
        todo += [x.__cause__, x.__context__]
    return out


def _root_message(e: BaseException) -> str:
    """The innermost useful message: DCP's own text is a multi-rank traceback."""
    causes = [c for c in _causes(e) if not isinstance(c, CheckpointException)]
    return one_line(causes[0] if causes else e, 200)


def _no_space(e: BaseException) -> bool:
    return any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in _causes(e))


def _all_ok(ok: bool, device: torch.device) -> bool:
    """Whether every rank succeeded, so that all ranks raise together instead of some waiting forever."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor(1.0 if ok else 0.0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# ------------------------------------------------------------------------------------------------ state dicts


def _storage_key(t: torch.Tensor) -> tuple:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape)


def _deduplicated(model_sd: dict) -> tuple[dict, dict[str, str]]:
    """(state dict with each tensor once, alias -> kept name): tied weights (lm_head = embed_tokens) share memory,
    which safetensors refuses to write twice."""
    kept, aliases, seen = {}, {}, {}
    for name, t in model_sd.items():
        key = _storage_key(t)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key], kept[name] = name, t
    return kept, aliases


_HYPER_TYPES = (bool, int, float, str, type(None))


def _hyperparameters(param_groups: list[dict]) -> list[dict]:
    """The optimizer's per-group settings (lr, betas, ...) as JSON; the tensors travel through DCP."""
    out = []
    for group in param_groups:
        out.append({k: list(v) if isinstance(v, tuple) else v for k, v in group.items()
                    if k != "params" and isinstance(v, (*_HYPER_TYPES, tuple))})
    return out


def _restore_hyperparameters(current: list[dict], saved, path: Path) -> list[dict]:
    """`current` param groups with the saved settings put back: only keys the optimizer has, of the same type."""
    if not isinstance(saved, list) or len(saved) != len(current):
        raise HybridizeError(f"checkpoint {path} has optimizer settings for another set of parameters; it is not "
                             f"from this run's --train choice")
    groups = []
    for group, stored in zip(current, saved, strict=True):
        group = dict(group)
        if not isinstance(stored, dict):
            raise HybridizeError(f"checkpoint {path}: its optimizer settings are damaged")
        for key, value in stored.items():
            if key == "params" or key not in group:
                continue
            mine = group[key]
            if isinstance(mine, tuple) and isinstance(value, list) and len(value) == len(mine):
                value = tuple(value)
            same = type(value) is type(mine) or (isinstance(mine, float) and type(value) is int)
            if not same or (isinstance(value, float) and not math.isfinite(value)):
                raise HybridizeError(f"checkpoint {path}: optimizer setting {key!r} is {value!r}; it is damaged")
            group[key] = value
        groups.append(group)
    return groups


# ------------------------------------------------------------------------------------------------ save


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, rank: int, device: torch.device, keep: int = 2) -> Path:
    """Write everything a resume needs; collective (every rank calls it). A failure (disk full, ...) removes the
    partial `step_N.tmp` and raises a one-line HybridizeError on every rank."""
    final = checkpoint_root(run_dir) / f"{PREFIX}{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    error: BaseException | None = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    if _all_ok(error is None, device):
        model_sd, optim_sd = get_state_dict(model, optimizer)
        tensors, _ = _deduplicated(model_sd)
        try:  # collective: DCP reports any rank's failure on every rank
            writer = HuggingFaceStorageWriter(str(tmp / TENSORS), save_distributed=True)
            dcp.save({"model": tensors, "optim": {"state": optim_sd["state"]}}, storage_writer=writer)
        except (Exception, CheckpointException) as e:  # reported below, in one line
            error = e
        if error is None:
            try:
                save_file(_rng_state(device), str(tmp / f"rng_rank{rank}.safetensors"))
            except OSError as e:
                error = e
        if _all_ok(error is None, device) and rank == 0:
            try:
                state = {**trainer_state, "format": FORMAT, "optimizer": _hyperparameters(optim_sd["param_groups"]),
                         "files": _listing(tmp)}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError as e:
                error = e
    if not _all_ok(error is None, device):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is not None and _no_space(error):
            raise HybridizeError(f"no space left on the device holding {checkpoint_root(run_dir)}: checkpoint "
                                 f"{final.name} was not written (its partial {tmp.name} is removed); free space and "
                                 f"continue with --resume")
        why = _root_message(error) if error is not None else "another rank failed"
        raise HybridizeError(f"could not write checkpoint {final} ({why}); its partial {tmp.name} is removed")
    return final


def _listing(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file in a checkpoint folder (written by rank 0 once all ranks are done)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ load


def read_trainer_state(path: Path) -> dict:
    """The validated trainer_state.json of checkpoint `path` (a one-line HybridizeError when it cannot be used)."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise HybridizeError(f"cannot read checkpoint {path}: {one_line(e, 150)}; delete it to resume from the "
                             f"previous one") from None
    if not isinstance(state, dict):
        raise HybridizeError(f"checkpoint {path} is damaged ({STATE_FILE} is not an object); delete it")
    if state.get("format") != FORMAT:
        raise HybridizeError(
            f"checkpoint {path} is in a format read with pickle (written by an older hybridize), which could run "
            f"code from the run folder; hybridize no longer unpickles run folders: start the run again, or finish "
            f"it with the hybridize version that wrote it"
        )
    counts = ("step", "tokens", "bad_steps")
    if not all(isinstance(state.get(k), int) and not isinstance(state[k], bool) and state[k] >= 0 for k in counts):
        raise HybridizeError(f"checkpoint {path} is damaged (step / tokens / bad_steps are not counts); delete it")
    data = state.get("data")
    if not (isinstance(data, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in data.values())):
        raise HybridizeError(f"checkpoint {path} is damaged (its data position is not a set of counts); delete it")
    for key in ("scheduler", "config", "files"):
        if not isinstance(state.get(key), dict):
            raise HybridizeError(f"checkpoint {path} is damaged (no {key}); delete it")
    return state


def _check_files(path: Path, listed: dict) -> None:
    """The checkpoint's files must be exactly the ones its save listed, with their sizes (a missing or truncated
    shard would otherwise load as stale values)."""
    have = _listing(path)
    have.pop(STATE_FILE, None)
    wrong = sorted(set(have) ^ set(listed)) + sorted(n for n in set(have) & set(listed) if have[n] != listed[n])
    if wrong:
        raise HybridizeError(f"checkpoint {path} is damaged ({wrong[0]} is missing, truncated or unexpected); delete "
                             f"it to resume from the previous one")


class _CheckedReader(HuggingFaceStorageReader):
    """DCP's safetensors reader (no pickle), refusing a tensor that its shards do not cover completely."""

    def read_metadata(self, *args, **kwargs):
        metadata = super().read_metadata(*args, **kwargs)
        for name, md in metadata.state_dict_metadata.items():
            covered = sum(math.prod(c.sizes) for c in md.chunks)
            if covered != math.prod(md.size):
                raise ValueError(f"{name}: the shards hold {covered} of its {math.prod(md.size)} values")
        return metadata


def _not_dcp_fallback_warning(record: logging.LogRecord) -> bool:
    return not (record.levelno < logging.ERROR and record.pathname.endswith("state_dict_loader.py"))


@contextmanager
def _quiet_dcp_loader():
    """DCP's loader logs a traceback (a warning with exc_info, on the root logger) before it falls back from global
    to rank-local metadata; a damaged checkpoint must end in our one line, not in torch's tracebacks on stderr."""
    root = logging.getLogger()
    root.addFilter(_not_dcp_fallback_warning)
    try:
        yield
    finally:
        root.removeFilter(_not_dcp_fallback_warning)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int,
                    device: torch.device) -> dict:
    """Restore model, optimizer and this rank's RNG in place; return the trainer state."""
    trainer_state = read_trainer_state(path)
    _check_files(path, trainer_state["files"])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    tensors, aliases = _deduplicated(model_sd)
    state = {"model": tensors, "optim": {"state": optim_sd["state"]}}
    try:
        with _quiet_dcp_loader():
            dcp.load(state, storage_reader=_CheckedReader(str(path / TENSORS)))
    except (Exception, CheckpointException) as e:  # a damaged or foreign checkpoint, in one line
        raise HybridizeError(f"cannot load checkpoint {path} ({_root_message(e)}); delete it to resume from the "
                             f"previous one") from None
    model_state = {**state["model"], **{alias: state["model"][kept] for alias, kept in aliases.items()}}
    groups = _restore_hyperparameters(optim_sd["param_groups"], trainer_state.get("optimizer"), path)
    set_state_dict(model, optimizer, model_state_dict=model_state,
                   optim_state_dict={"state": state["optim"]["state"], "param_groups": groups})
    rng = path / f"rng_rank{rank}.safetensors"
    if rng.is_file():  # absent when resuming on more ranks than saved: those start from the seed
        try:
            _set_rng_state(load_file(str(rng)), device)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise HybridizeError(f"cannot load checkpoint {path} ({rng.name}: {one_line(e, 150)}); delete it") from None
    return trainer_state


def load_scheduler_state(scheduler, saved: dict, path: Path) -> None:
    """Put a saved LR-scheduler state back, accepting only the keys (and value types) the scheduler has: a crafted
    state must not set arbitrary attributes."""
    mine = scheduler.state_dict()
    clean = {}
    for key, value in saved.items():
        if key not in mine or key == "lr_lambdas":
            continue
        expected = mine[key]
        if isinstance(expected, list) and isinstance(value, list) and len(value) == len(expected):
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        else:
            ok = type(value) is type(expected) or (isinstance(expected, float) and type(value) is int)
        if not ok:
            raise HybridizeError(f"checkpoint {path}: scheduler value {key!r} is {value!r}; it is damaged")
        clean[key] = value
    scheduler.load_state_dict({**mine, **clean})


# ------------------------------------------------------------------------------------------------ RNG


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
