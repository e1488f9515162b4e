"""Loading the language models a training or evaluation run needs, and choosing what trains.

Teachers load through transformers' own classes (Qwen3ForCausalLM, LlamaForCausalLM, Qwen3_5ForCausalLM, from a
folder, hub id or GGUF file) after the same validation `convert` applies; hybridize folders load as
HybridForCausalLM. Using transformers' classes for the teacher keeps it an independent implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import HybridizeError, one_line
from ..model.config import LINEAR
from ..model.modeling import HybridForCausalLM
from ..transfer.sources import is_hub_id, read_source_config, require_gguf


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def load_language_model(source: str | Path, dtype: torch.dtype) -> nn.Module:
    """A causal LM on CPU in `dtype`, in eval mode: hybridize folder, Qwen3 / Llama / qwen3_5_text folder, hub id
    or .gguf file. Never loads pickles."""
    source = str(source)
    path = Path(source).expanduser()
    try:
        if not is_hub_id(source) and path.is_dir() and _model_type(path) == "hybridize":
            model = HybridForCausalLM.from_pretrained(path, dtype=dtype)
        elif path.suffix == ".gguf" and path.is_file():
            require_gguf()
            read_source_config(source)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        else:
            read_source_config(source)  # one-line errors for unsupported or broken sources
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True)
    except HybridizeError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise HybridizeError(f"cannot load model {source}: {one_line(e)}") from None
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


def load_tokenizer(*sources: str | Path):
    """The tokenizer of the first source that has one (a model folder, or the tokenizer inside a GGUF file)."""
    from transformers import AutoTokenizer

    for source in sources:
        path = Path(str(source)).expanduser()
        try:
            if path.suffix == ".gguf" and path.is_file():
                return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            return AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    names = ", ".join(str(s) for s in sources)
    raise HybridizeError(f"no tokenizer found in {names}: copy the tokenizer files into the student folder")


def vocab_size(model: nn.Module) -> int:
    return model.lm_head.weight.shape[0]


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
