"""Where source weights come from: a local folder, a config.json, a .gguf file or a Hugging Face hub id.

`read_source_config` reads only the config (for `--dry-run`); `open_source` opens the weights lazily: one tensor at a
time, on CPU, in its stored dtype, so a conversion never holds the whole source model in memory (GGUF excepted:
it is dequantised by transformers, and GGUF models are small).

Every problem a user can fix (unsupported architecture, missing or truncated files, no network) is raised as a
one-line `HybridizeError` before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PretrainedConfig

from ..errors import HybridizeError, one_line
from ..output import GGUF_TMP_PREFIX, TOKENIZER_FILES, remove_stale_temporaries
from .safetensors_io import TensorEntry, read_header, read_tensor

SUPPORTED = (
    "Qwen3 dense (model_type 'qwen3'), the Llama family (model_type 'llama': Llama 2/3, SmolLM; "
    "'mistral' without sliding window) and 'qwen3_5_text' (hybridize's own export format, imported as-is)"
)

# model_type -> family
FAMILIES = {"qwen3": "qwen3", "llama": "llama", "mistral": "llama", "qwen3_5_text": "qwen3_5_text"}
MOE_MODEL_TYPES = {
    "qwen3_moe",
    "qwen2_moe",
    "mixtral",
    "deepseek_v2",
    "deepseek_v3",
    "dbrx",
    "olmoe",
    "granitemoe",
    "jamba",
    "phimoe",
    "qwen3_next",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "gpt_oss",
    "llama4",
    "llama4_text",
}
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------------------------------------------
# config


def validate_config_dict(cfg: dict, where: str) -> str:
    """Return the family of a config.json dict, or raise a one-line HybridizeError saying what is supported."""
    model_type = cfg.get("model_type")
    if not model_type:
        raise HybridizeError(f"{where} has no model_type; supported: {SUPPORTED}")
    if not isinstance(model_type, str):
        raise HybridizeError(f"{where}: model_type must be a string, got {model_type!r}; supported: {SUPPORTED}")
    experts = [k for k in MOE_KEYS if isinstance(cfg.get(k), int) and cfg.get(k) > 0]
    if model_type in MOE_MODEL_TYPES or experts or "moe" in model_type:
        raise HybridizeError(
            f"{where} is a mixture-of-experts model (model_type {model_type!r}), which hybridize does not convert; "
            f"supported: {SUPPORTED}"
        )
    if model_type not in FAMILIES:
        raise HybridizeError(f"unsupported model_type {model_type!r} in {where}; supported: {SUPPORTED}")
    biases = [k for k in ("attention_bias", "mlp_bias") if cfg.get(k)]
    if biases:
        raise HybridizeError(
            f"{where} sets {' and '.join(biases)}: biases we cannot represent in the hybrid; supported: {SUPPORTED}"
        )
    sliding = (model_type == "qwen3" and cfg.get("use_sliding_window")) or (
        model_type == "mistral" and cfg.get("sliding_window", 4096) is not None  # MistralConfig's default is 4096
    )
    if sliding:
        raise HybridizeError(
            f"{where} uses sliding-window attention, which hybridize does not convert; supported: {SUPPORTED}"
        )
    return FAMILIES[model_type]


def config_from_dict(cfg: dict, where: str) -> tuple[PretrainedConfig, str]:
    """Validate a config.json dict and build its transformers config class.

    transformers 5 validates configs as strict dataclasses and raises its own error types (StrictDataclass*Error,
    TypeError, ZeroDivisionError for zero heads, ...); any of them means the file is wrong, so all become one line.
    """
    from transformers import AutoConfig

    family = validate_config_dict(cfg, where)
    for field in (*_SIZES, "num_key_value_heads", "head_dim"):  # before transformers divides by them
        if field in cfg and cfg[field] is not None and not _positive_int(cfg[field]):
            raise HybridizeError(f"{where}: {field} is {cfg[field]!r}, must be an integer >= 1; fix the config")
    kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(cfg["model_type"], **kwargs)
    except Exception as e:  # see the docstring: a bad file, never a bug of ours
        message = f"{where} is not a valid {cfg['model_type']} config ({one_line(e, 200)}); fix it"
        raise HybridizeError(message) from None
    check_config_values(config, family, where)
    if family == "qwen3_5_text":  # imported as a hybrid: its schedule and head layout must build too
        from ..export.qwen3_5 import qwen3_5_to_hybrid_config

        try:
            qwen3_5_to_hybrid_config(config).validate_architecture()
        except ValueError as e:
            raise HybridizeError(f"{where} is not a valid qwen3_5_text config ({one_line(e, 200)}); fix it") from None
    return config, family


# Sizes a model is built from: the first six for every family, the rest for qwen3_5_text.
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "max_position_embeddings", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
          "linear_value_head_dim", "linear_conv_kernel_dim")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_config_values(config: PretrainedConfig, family: str, where: str) -> None:
    """Refuse sizes, head layouts and constants a model cannot be built from, in one line naming the field.

    transformers' own validation lets zero or negative sizes, kv heads that do not divide the query heads, or an
    out-of-range pad token through; those would fail later (or convert to an empty model) with a traceback.
    """
    from ..model.config import check_config_fields

    try:
        check_config_fields(config, _SIZES if family == "qwen3_5_text" else _SIZES[:6])
    except ValueError as e:
        raise HybridizeError(f"{where}: {e}; fix the config") from None


def _load_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise HybridizeError(f"{what} {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, absurd nesting or numbers
        raise HybridizeError(f"{what} {path} is not valid JSON: {one_line(e, 120)}") from None
    except OSError as e:
        raise HybridizeError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise HybridizeError(f"{what} {path} is not a JSON object")
    return data


def is_hub_id(source: str) -> bool:
    """True for `owner/name` strings that are not an existing local path."""
    return bool(_HUB_ID.match(source)) and not os.path.exists(source) and not source.endswith((".gguf", ".json"))


def _local_path(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise HybridizeError(
            f"{source} does not exist (pass a model folder, its config.json, a .gguf file or a hub id owner/name)"
        )
    return path


def _hub_error(repo: str, e: BaseException) -> HybridizeError:
    from huggingface_hub import errors

    if isinstance(e, errors.GatedRepoError):
        return HybridizeError(f"hub model {repo} is gated: accept its license and log in (hf auth login)")
    if isinstance(e, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
        return HybridizeError(
            f"no model {repo!r} on the Hugging Face hub (or it is private: log in with hf auth login)"
        )
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return HybridizeError(f"hub model {repo} is not a model folder: no config.json")
    return HybridizeError(
        f"could not reach the Hugging Face hub for {repo!r} ({type(e).__name__}); check the network or pass a "
        f"local model folder"
    )


def _hub_reachable(timeout: float = 5.0) -> bool:
    """A quick TCP probe of the hub endpoint, so that offline runs fail in seconds instead of minutes of retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _hub_call(repo: str, fn, *args, **kwargs):
    """Run a huggingface_hub download quietly; offline, fall back to the local cache; wrap errors."""
    from huggingface_hub.utils import logging as hf_logging

    if not _hub_reachable():
        kwargs["local_files_only"] = True
    logger = hf_logging.get_logger("huggingface_hub")
    level = logger.level
    logger.setLevel(40)  # ERROR: no retry chatter on stderr
    try:
        return fn(repo, *args, **kwargs)
    except Exception as e:  # network, auth, missing repo: all user-fixable
        raise _hub_error(repo, e) from None
    finally:
        logger.setLevel(level)


def _gguf_config(path: Path) -> tuple[PretrainedConfig, str]:
    require_gguf()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except Exception as e:  # gguf's parser fails on a truncated header with IndexError, struct errors
        raise HybridizeError(f"cannot read GGUF file {path} (truncated or not GGUF?): {one_line(e)}") from None
    return config_from_dict(dict(parsed["config"]), str(path))


def _gguf_state_dict(path: Path, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """Dequantise a GGUF file to float32 tensors with Hugging Face names (transformers' own GGUF reader)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return {k: v.detach() for k, v in model.state_dict().items()}
    # from_pretrained insists on accelerate for GGUF; the tensor reader it relies on does not.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32)
    return dict(parsed["tensors"])


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise HybridizeError("reading .gguf files needs the gguf package: pip install 'hybridize[gguf]'") from None


def read_source_config(source: str) -> tuple[PretrainedConfig, str]:
    """Read only the config of `source` (folder, config.json, .gguf or hub id); return (config, family)."""
    source = str(source)
    if is_hub_id(source):
        from huggingface_hub import hf_hub_download

        config_file = Path(_hub_call(source, hf_hub_download, "config.json"))
        return config_from_dict(_load_json(config_file, "config"), f"{source}/config.json")
    path = _local_path(source)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise HybridizeError(f"{source} is not a model folder: no config.json")
    elif path.suffix == ".gguf":
        return _gguf_config(path)
    elif path.suffix == ".json":
        config_file = path
    else:
        raise HybridizeError(f"{source} is neither a model folder, a config.json nor a .gguf file")
    return config_from_dict(_load_json(config_file, "config"), str(config_file))


# ----------------------------------------------------------------------------------------------------------------
# weights


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Where each tensor of a safetensors file lies; HybridizeError naming the file if it is corrupt or truncated."""
    try:
        return read_header(path)
    except ValueError as e:
        raise HybridizeError(f"{path} {e}") from None
    except OSError as e:
        raise HybridizeError(f"cannot read {path}: {e.strerror or e}") from None


INDEX_FILE = "model.safetensors.index.json"


def _inside(name) -> bool:
    """Whether an index entry names a file inside the model folder: relative, no `..`. Checked on the text, not
    the resolved path, because hub snapshots are symlinks into the cache's blob folder (outside the snapshot)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return False
    parts = Path(name).parts
    return not Path(name).is_absolute() and ".." not in parts and not name.startswith("~")


def index_weight_map(folder: Path) -> dict[str, str] | None:
    """The validated weight_map of `folder`'s model.safetensors.index.json (None without an index).

    Every shard must be a file inside the folder: a crafted index must not pull `../x.safetensors` or an absolute
    path into a conversion or a training run.
    """
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    weight_map = _load_json(index, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise HybridizeError(f"{index} has no weight_map")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise HybridizeError(f"{index}: the weight_map entry for {name!r} is {shard!r}, not a file name")
        if not _inside(shard):
            raise HybridizeError(f"{index} places {name!r} in {shard!r}, outside the model folder; shard paths must "
                                 f"be file names inside {folder}")
    missing = sorted(s for s in set(weight_map.values()) if not (folder / s).is_file())
    if missing:
        raise HybridizeError(f"{folder} is missing weight shard(s) named by its index: {', '.join(missing)}")
    return weight_map


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files that hold `folder`'s weights (validated index, model.safetensors or *.safetensors).

    A folder with only pickles (pytorch_model.bin) is refused: hybridize never loads pickles, for sources, students
    and evaluated models alike.
    """
    weight_map = index_weight_map(folder)
    if weight_map is not None:
        return [folder / s for s in sorted(set(weight_map.values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    others = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if others:
        return others
    if any((folder / p).exists() for p in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise HybridizeError(
            f"{folder} has only pytorch_model.bin: hybridize never loads pickles; convert to safetensors "
            f"with transformers (AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)) "
            f"in an environment you trust"
        )
    raise HybridizeError(f"{folder} has no weights: no model.safetensors or model.safetensors.index.json")


class Source:
    """Lazy, read-only access to a source model's tensors by their Hugging Face names.

    Attributes: `config` (transformers config), `family` ("qwen3" | "llama" | "qwen3_5_text"), `path` (the local
    model folder, or the .gguf file), `names` (sorted tensor names; `lm_head.weight` absent when tied),
    `tokenizer_files` (paths of tokenizer / chat template / generation config files present).
    """

    def __init__(self, config: PretrainedConfig, family: str, path: Path, tokenizer_files: list[Path]):
        self.config = config
        self.family = family
        self.path = path
        self.tokenizer_files = tokenizer_files
        self._where: dict[str, TensorEntry] = {}  # tensor name -> where its bytes lie
        self._state: dict[str, torch.Tensor] | None = None  # GGUF: an in-memory store
        self._tmpdir: str | None = None

    # -- building
    @classmethod
    def _from_folder(cls, folder: Path, config: PretrainedConfig, family: str) -> Source:
        where: dict[str, TensorEntry] = {}
        weight_map = index_weight_map(folder)
        if weight_map is not None:
            index = folder / INDEX_FILE
            headers = {s: read_safetensors_header(folder / s) for s in sorted(set(weight_map.values()))}
            for name, shard in weight_map.items():
                if name not in headers[shard]:
                    raise HybridizeError(f"{folder / shard} lacks tensor {name!r} that {index.name} places there")
                where[name] = headers[shard][name]
        else:
            for shard in safetensors_files(folder):
                where.update(read_safetensors_header(shard))
        src = cls(config, family, folder, [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()])
        src._where = where
        if "model.embed_tokens.weight" not in where and not any(n.endswith("embed_tokens.weight") for n in where):
            raise HybridizeError(f"{folder} has no embedding tensor (model.embed_tokens.weight): not a causal LM")
        return src

    @classmethod
    def _from_gguf(cls, path: Path) -> Source:
        config, family = _gguf_config(path)
        from transformers import AutoTokenizer, GenerationConfig

        parent, name = str(path.parent), path.name
        try:
            tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
            state = _gguf_state_dict(path, config)
        except Exception as e:  # as in _gguf_config: a damaged file, whatever gguf raises
            raise HybridizeError(f"cannot load GGUF file {path}: {one_line(e)}") from None
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        remove_stale_temporaries(Path(tempfile.gettempdir()))  # left by conversions killed with kill -9
        tmpdir = tempfile.mkdtemp(prefix=f"{GGUF_TMP_PREFIX}{os.getpid()}-")
        try:
            tokenizer.save_pretrained(tmpdir)
            GenerationConfig.from_model_config(config).save_pretrained(tmpdir)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
        src = cls(config, family, path, [Path(tmpdir) / f for f in TOKENIZER_FILES if (Path(tmpdir) / f).is_file()])
        src._state, src._tmpdir = state, tmpdir
        return src

    # -- access
    @property
    def names(self) -> list[str]:
        return sorted(self._state if self._state is not None else self._where)

    def has(self, name: str) -> bool:
        return name in (self._state if self._state is not None else self._where)

    def spec(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a stored tensor without reading it (for checks before anything is written)."""
        if self._state is not None:
            t = self._state[name]
            return tuple(t.shape), t.dtype
        entry = self._where[name]
        return entry.shape, entry.dtype

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU, stored dtype). Raises KeyError for an unknown name."""
        if self._state is not None:
            return self._state[name]
        entry = self._where.get(name)
        if entry is None:
            raise KeyError(f"source {self.path} has no tensor {name!r}")
        try:
            return read_tensor(entry)  # plain reads, no mmap: memory holds only what the caller keeps
        except (OSError, ValueError) as e:
            raise HybridizeError(f"cannot read {name} from {entry.path}: {one_line(e)}") from None

    def close(self) -> None:
        self._state = None if self._tmpdir else self._state
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
            self.tokenizer_files = []

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        n = len(self._state if self._state is not None else self._where)
        return f"Source({str(self.path)!r}, family={self.family!r}, tensors={n})"


def check_source_tensors(source: Source, shapes: dict[str, tuple[int, ...]] | None) -> None:
    """Refuse stored tensors whose shape differs from `shapes` (name -> shape the config implies) or that are not
    floating point (None: check every tensor's dtype only). Reads headers only; the message names the tensor."""
    for name in source.names if shapes is None else shapes:
        shape, dtype = source.spec(name)
        if shapes is not None and tuple(shape) != tuple(shapes[name]):
            raise HybridizeError(
                f"{source.path}: tensor {name} is stored with shape {list(shape)} but the config implies "
                f"{list(shapes[name])}; the config and the weights disagree (edited config.json, or another model's "
                f"weights?)"
            )
        if not dtype.is_floating_point:
            raise HybridizeError(f"{source.path}: tensor {name} is stored as {str(dtype).removeprefix('torch.')}; "
                                 f"weights must be floating point")


def open_source(source: str | Path) -> Source:
    """Open a source model (folder, .gguf file or hub id) for lazy tensor reads; validate it before any output."""
    source = str(source)
    if is_hub_id(source):
        read_source_config(source)  # a cheap check before downloading gigabytes of an unsupported model
        from huggingface_hub import snapshot_download

        folder = Path(_hub_call(source, snapshot_download, allow_patterns=HUB_PATTERNS))
    else:
        path = _local_path(source)
        if path.is_file() and path.suffix == ".gguf":
            return Source._from_gguf(path)
        if path.is_file() and path.name == "config.json":
            path = path.parent
        if not path.is_dir():
            raise HybridizeError(f"{source} is neither a model folder nor a .gguf file")
        folder = path
    config, family = read_source_config(str(folder))
    return Source._from_folder(folder, config, family)


__all__ = [
    "SUPPORTED",
    "Source",
    "open_source",
    "read_source_config",
    "read_safetensors_header",
    "validate_config_dict",
    "is_hub_id",
]
