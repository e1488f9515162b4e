"""Loading the language models a training or evaluation run needs, and choosing what trains.

Teachers load through transformers' own classes (Qwen3ForCausalLM, LlamaForCausalLM, Qwen3_5ForCausalLM, from a
folder, hub id or GGUF file) after the same validation `convert` applies; hybridize folders load as
HybridForCausalLM. Using transformers' classes for the teacher keeps it an independent implementation.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..errors import HybridizeError, one_line
from ..model.config import LINEAR
from ..model.modeling import HybridForCausalLM
from ..transfer.sources import FAMILIES, is_hub_id, read_source_config, require_gguf, safetensors_files


def _model_type(path: Path) -> str | None:
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return model_type if isinstance(model_type, str) else None


@contextmanager
def gguf_progress(enabled: bool):
    """transformers' GGUF reader draws its de-quantizing bar with plain tqdm, which its own switch does not reach."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = gguf_utils.tqdm
    if not enabled:
        gguf_utils.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def check_student_folder(folder: str | Path) -> None:
    """Refuse, before anything is loaded, a --student that is not a hybrid (an unconverted source is the likely
    mistake), whose config cannot be built, or whose weights are not safetensors."""
    from ..model.config import HybridConfig

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise HybridizeError(f"{folder} is not a model folder (no config.json): pass a `hybridize convert` output")
    model_type = _model_type(folder)
    if model_type in FAMILIES and FAMILIES[model_type] != "qwen3_5_text":
        raise HybridizeError(f"{folder} is a {model_type} model, not a hybrid: convert it first (hybridize convert "
                             f"{folder} HYBRID_DIR) and pass --student HYBRID_DIR; use {folder} as the --teacher")
    if model_type not in (HybridConfig.model_type, "qwen3_5_text"):
        raise HybridizeError(f"{folder} is not a hybridize model (model_type {model_type!r}): pass a `hybridize "
                             f"convert` output")
    try:
        HybridConfig.from_pretrained(folder).validate_architecture()
    except HybridizeError:
        raise
    except Exception as e:  # transformers' strict-dataclass errors and ours: a bad config.json
        raise HybridizeError(f"{folder / 'config.json'} is not a valid hybrid config ({one_line(e, 200)})") from None
    safetensors_files(folder)


def load_language_model(source: str | Path, dtype: torch.dtype, progress: bool = True) -> nn.Module:
    """A causal LM on CPU in `dtype`, in eval mode: hybridize folder, Qwen3 / Llama / qwen3_5_text folder, hub id
    or .gguf file. Never loads pickles: a local folder must hold safetensors inside it (a validated index)."""
    source = str(source)
    path = Path(source).expanduser()
    local_dir = not is_hub_id(source) and path.is_dir()
    try:
        if local_dir and _model_type(path) == "hybridize":
            check_student_folder(path)
            model = HybridForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
        elif local_dir and _model_type(path) == "hybridize_etd":
            from ..model.etd import ETDForCausalLM

            safetensors_files(path)
            model = ETDForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
        elif path.suffix == ".gguf" and path.is_file():
            require_gguf()
            read_source_config(source)
            from transformers import AutoModelForCausalLM

            with gguf_progress(progress):
                model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        else:
            read_source_config(source)  # one-line errors for unsupported or broken sources
            if local_dir:
                safetensors_files(path)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
    except HybridizeError:
        raise
    except Exception as e:  # reading the user's files: whatever fails is reported in one line
        raise HybridizeError(f"cannot load model {source}: {type(e).__name__}: {one_line(e)}") from None
    return model.eval()


def skeleton_language_model(source: str | Path, dtype: torch.dtype) -> nn.Module:
    """The same architecture `load_language_model(source)` returns, on the meta device (no weights read): what
    ranks other than 0 build, to be filled by a broadcast from rank 0 after sharding."""
    source = str(source)
    path = Path(source).expanduser()
    if not is_hub_id(source) and path.is_dir() and _model_type(path) == "hybridize":
        from ..model.config import HybridConfig

        config, cls = HybridConfig.from_pretrained(path), HybridForCausalLM
    else:
        config, _ = read_source_config(source)
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype) if cls is not HybridForCausalLM else cls(config).to(dtype)
    return model.eval()


_TOKENIZER_DEFINITIONS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(*sources: str | Path):
    """The tokenizer of the first source that has one (a model folder, or the tokenizer inside a GGUF file).

    A folder without tokenizer files does not count: transformers 5 would build an empty tokenizer from its config
    alone, and every document would then tokenize to nothing ("no text found").
    """
    from transformers import AutoTokenizer

    for source in sources:
        path = Path(str(source)).expanduser()
        if path.is_dir() and not any((path / f).is_file() for f in _TOKENIZER_DEFINITIONS):
            continue
        try:
            if path.suffix == ".gguf" and path.is_file():
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            else:
                tokenizer = AutoTokenizer.from_pretrained(str(source))
        except Exception:  # a broken or absent tokenizer: try the next source
            continue
        if len(tokenizer) > max(1, len(set(tokenizer.all_special_ids))):  # more than its special tokens
            return tokenizer
    names = ", ".join(str(s) for s in sources)
    raise HybridizeError(f"no tokenizer found in {names} (no tokenizer.json / tokenizer.model): copy the source "
                         f"model's tokenizer files into the model folder, or give pre-tokenized .npy data")


def vocab_size(model: nn.Module) -> int:
    return model.lm_head.weight.shape[0]


def note_long_sequences(model: nn.Module, seq_len: int, name: str) -> None:
    """Say (one line on stderr) when --seq-len exceeds the positions a model was trained for: it runs, but what
    it computes there is extrapolation."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        print(f"hybridize: note: --seq-len {seq_len} exceeds the {name}'s max_position_embeddings ({limit}); "
              f"positions beyond it were never trained", file=sys.stderr)


def check_pair(teacher: nn.Module, student: nn.Module, align: bool) -> None:
    """Refuse a teacher/student pair whose logits or (for alignment) hidden states cannot be compared."""
    if vocab_size(teacher) != vocab_size(student):
        raise HybridizeError(
            f"teacher and student vocabularies differ ({vocab_size(teacher)} vs {vocab_size(student)} tokens): "
            f"distill from the model the student was converted from"
        )
    if align:
        t, s = teacher.config, student.config
        if (t.num_hidden_layers, t.hidden_size) != (s.num_hidden_layers, s.hidden_size):
            raise HybridizeError(
                f"hidden-state alignment needs equal depth and width: teacher {t.num_hidden_layers}×{t.hidden_size}, "
                f"student {s.num_hidden_layers}×{s.hidden_size}; use --align-weight 0"
            )


def select_trainable(student: nn.Module, which: str) -> int:
    """Freeze all but `which` ("all", "mixers": every layer's token mixer, "linear": DeltaNet layers only).
    Returns the number of trainable parameters."""
    student.requires_grad_(which == "all")
    if which != "all":
        for layer in student.model.layers:
            mixer = getattr(layer, "linear_attn", None) if layer.layer_type == LINEAR else None
            if which == "mixers" and mixer is None:
                mixer = layer.self_attn
            if mixer is not None:
                mixer.requires_grad_(True)
    count = sum(p.numel() for p in student.parameters() if p.requires_grad)
    if count == 0:
        raise HybridizeError(f"--train {which} leaves nothing to train in this student (no DeltaNet layers?)")
    return count
