"""What `hybridize distill` and `hybridize eval` do, as library calls (the CLI only parses flags).

    run_distill: check the run folder → load student (float32 master weights) and teacher → tokenize the data once
                 (rank 0, cached in RUN_DIR/data) → DistillationTrainer.fit → RUN_DIR/final
    run_eval:    load model (+ teacher) → tokenize → evaluate → metrics dict
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..device import resolve_device
from ..errors import HybridizeError, one_line
from ..model.modeling import HybridForCausalLM
from ..ops.dispatch import note_if_slow_path
from ..output import TOKENIZER_FILES, check_not_an_input
from .config import DistillConfig
from .data import PackedBatches, eval_windows, load_or_build_tokens, needs_tokenizer
from .evaluate import evaluate
from .models import (
    check_pair,
    check_student_folder,
    load_language_model,
    load_tokenizer,
    note_long_sequences,
    select_trainable,
    skeleton_language_model,
)
from .objective import DistillationObjective
from .parallelize import init_distributed, shutdown_distributed
from .trainer import DistillationTrainer, check_run_dir


def _stored_dtype(folder: Path) -> torch.dtype:
    """The dtype a model folder was saved in (the final student is written back in it)."""
    try:
        config = json.loads((folder / "config.json").read_text())
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
    except (OSError, ValueError):
        name = "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


def _load_student(student_dir: Path) -> HybridForCausalLM:
    check_student_folder(student_dir)
    try:
        model = HybridForCausalLM.from_pretrained(student_dir, dtype=torch.float32, use_safetensors=True)
    except Exception as e:  # reading the user's files: whatever fails is reported in one line
        raise HybridizeError(f"cannot load student {student_dir}: {type(e).__name__}: {one_line(e)}") from None
    return model


def _skeleton_student(student_dir: Path) -> HybridForCausalLM:
    """What `_load_student` builds, on the meta device (ranks > 0 receive the weights from rank 0)."""
    from ..model.config import HybridConfig

    with torch.device("meta"):
        return HybridForCausalLM(HybridConfig.from_pretrained(student_dir)).to(torch.float32)


def tokenize_cached(paths, tokenizer, cache_dir: Path | None, is_main: bool, progress: bool, vocab_size: int):
    """Rank 0 tokenizes (or reuses the cache); the others wait, then read the cache. `tokenizer` None: .npy only."""
    eos = None if tokenizer is None else tokenizer.eos_token_id
    if tokenizer is not None and eos is None:
        raise HybridizeError("the tokenizer has no EOS token to separate documents with")
    if is_main:
        tokens = load_or_build_tokens(paths, tokenizer, eos, cache_dir, progress=progress, vocab_size=vocab_size)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
        if not is_main:
            tokens = load_or_build_tokens(paths, tokenizer, eos, cache_dir, progress=False, vocab_size=vocab_size)
    return tokens


def tokenizer_for(paths: list[str], *sources):
    """The tokenizer for text data; None when every input is pre-tokenized (.npy), which needs none."""
    return load_tokenizer(*sources) if needs_tokenizer(paths) else None


def _check_outputs(run_dir: Path, inputs: list) -> None:
    """RUN_DIR/final is replaced at the end of a run: it must not be (or hold) an input; and a run folder inside a
    model folder would write checkpoints into it."""
    check_not_an_input(run_dir / "final", inputs, what="RUN_DIR/final")
    run = run_dir.resolve()
    for given in inputs:
        path = Path(given).expanduser().resolve()
        if path.is_dir() and (run == path or path in run.parents):
            raise HybridizeError(f"--out {run_dir} lies inside the model folder {given}; choose a run folder "
                                 f"outside it")


def run_distill(teacher: str, student: str, data: list[str], out: str, config: DistillConfig,
                eval_data: list[str] | None = None, resume: bool = False, progress: bool = True,
                override: bool = False) -> dict:
    """The whole `hybridize distill` run; returns a summary (rank 0's view). `override`: see check_run_dir."""
    start = time.perf_counter()
    run_dir, student_dir = Path(out).expanduser().absolute(), Path(student).expanduser().absolute()
    check_run_dir(run_dir, resume, config, override)  # before loading gigabytes
    check_student_folder(student_dir)
    _check_outputs(run_dir, [student_dir, teacher])
    for path in [*data, *(eval_data or [])]:
        if not Path(path).expanduser().exists():
            raise HybridizeError(f"data path {path} does not exist")
    if config.eval_every and not eval_data:
        raise HybridizeError("--eval-every needs --eval-data (held-out text to evaluate on)")
    torch.manual_seed(config.seed)
    env = init_distributed()
    if env.is_main:
        note_if_slow_path(env.device)
    try:
        save_dtype = _stored_dtype(student_dir)
        teacher_dtype = config.compute_dtype(env.device.type)  # frozen: no float32 master copy needed
        if env.is_main:  # only rank 0 reads weights; the others get them by broadcast after sharding
            model = _load_student(student_dir)
            teacher_model = load_language_model(teacher, teacher_dtype, progress=progress)
            note_long_sequences(model, config.seq_len, "student")
        else:
            model = _skeleton_student(student_dir)
            teacher_model = skeleton_language_model(teacher, teacher_dtype)
        select_trainable(model, config.train)
        trainer = DistillationTrainer(teacher_model, model, config)  # with --mtp: adds (and unfreezes) the heads
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tokenizer = tokenizer_for([*data, *(eval_data or [])], student_dir, teacher)
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        vocab = model.config.vocab_size
        tokens = tokenize_cached(data, tokenizer, run_dir / "data", env.is_main, progress, vocab)
        batches = PackedBatches(tokens, config.seq_len, config.batch_size, config.grad_accum, env.rank,
                                env.world_size, config.seed)
        windows = None
        if eval_data:
            eval_tokens = tokenize_cached(eval_data, tokenizer, run_dir / "eval_data", env.is_main, progress, vocab)
            windows = eval_windows(eval_tokens, config.seq_len, config.eval_tokens)
        last = trainer.fit(batches, run_dir, windows, resume=resume, progress=progress, override=override)
        if trainer.finished:
            side_files = [student_dir / f for f in TOKENIZER_FILES if (student_dir / f).is_file()]
            trainer.save_final(run_dir / "final", save_dtype, side_files)
    finally:
        shutdown_distributed()
    final = str(run_dir / "final") if trainer.finished else "not yet: stopped at --stop-at; continue with --resume"
    return {"run_dir": str(run_dir), "final": final, "world_size": env.world_size,
            "trainable_parameters": trainable, "steps": last.get("step"), "tokens": last.get("tokens"),
            "last": last, "seconds": round(time.perf_counter() - start, 1)}


def run_eval(model: str, data: list[str], teacher: str | None = None, seq_len: int = 2048,
             max_tokens: int | None = 262_144, batch_size: int = 4, dtype: str = "auto",
             chunk_tokens: int = 1024, progress: bool = True) -> dict:
    """Perplexity of `model` on `data`; with a teacher also its perplexity, per-token KL and greedy agreement."""
    for path in data:
        if not Path(path).expanduser().exists():
            raise HybridizeError(f"data path {path} does not exist")
    device = resolve_device()
    compute = DistillConfig(dtype=dtype).compute_dtype(device.type)
    student = load_language_model(model, compute, progress=progress)
    teacher_model = load_language_model(teacher, compute, progress=progress) if teacher else None
    if teacher_model is not None:
        check_pair(teacher_model, student, align=False)
    note_long_sequences(student, seq_len, "model")
    tokenizer = tokenizer_for(data, model, *([teacher] if teacher else []))
    tokens = tokenize_cached(data, tokenizer, None, True, progress, student.config.vocab_size)
    windows = eval_windows(tokens, seq_len, max_tokens)
    objective = DistillationObjective(student, teacher_model, chunk_tokens=chunk_tokens).to(device)
    result = evaluate(objective, windows, batch_size, progress=progress)
    return {"model": str(model), "teacher": teacher, "seq_len": seq_len, "dtype": str(compute).removeprefix("torch."),
            **result}
