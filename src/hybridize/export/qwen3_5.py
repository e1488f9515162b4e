"""Export to, and import from, the stock Qwen3.5 text checkpoint format (`qwen3_5_text`, `Qwen3_5ForCausalLM`).

Our parameter names and norm conventions equal transformers' `Qwen3_5ForCausalLM`, so the export is a streamed copy
of every tensor plus a config rewrite, and the import is the reverse. What `qwen3_5_text` cannot express is refused
with one line before anything is written (see `qwen3_5_config_dict`); docs/EXPORT.md lists what was checked against
transformers and vLLM.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import HybridizeError
from ..model.config import HybridConfig, layer_stats
from ..model.modeling import HybridForCausalLM
from ..output import TOKENIZER_FILES, atomic_output_folder, check_not_an_input, copy_side_files
from ..transfer.safetensors_io import ShardedWriter
from ..transfer.sources import Source

QWEN3_5_MODEL_TYPE = "qwen3_5_text"
QWEN3_5_ARCHITECTURE = "Qwen3_5ForCausalLM"

# Fields whose name and meaning are the same in HybridConfig and Qwen3_5TextConfig (rope_parameters is handled apart).
SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "tie_word_embeddings", "attention_bias", "attention_dropout", "linear_conv_kernel_dim",
    "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "layer_types",
    "pad_token_id", "bos_token_id", "eos_token_id",
)  # fmt: skip
# Keys of our config.json that are bookkeeping, not architecture (PreTrainedConfig's generic keys included).
_GENERIC_KEYS = {
    "model_type", "architectures", "dtype", "torch_dtype", "transformers_version", "_name_or_path", "name_or_path",
    "rope_parameters", "rope_theta", "attention_qk_norm", "source_model_type", "chunk_size_feed_forward",
    "id2label", "label2id", "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type",
    "return_dict", "mtp_num_hidden_layers", "num_predict_tokens", "mtp_loss_weight", "mtp_loss_decay",
}  # fmt: skip
# MTP: Qwen3.5's config keys for its one `mtp.*` module (transformers keeps them as plain attributes; vLLM's
# qwen3_5_mtp reads mtp_num_hidden_layers). Our num_predict_tokens and loss weights are training/decoding knobs:
# engines choose the number of drafts at serve time (vLLM: num_speculative_tokens).
MTP_PREFIX = "mtp."

# RoPE types both transformers' Qwen3_5TextRotaryEmbedding and vLLM's get_rope compute the same way, with the keys
# each needs. Others are refused: "dynamic" (transformers rescales per sequence length, vLLM once for the maximum
# length), "longrope" (vLLM's Phi3LongRoPEScaledRotaryEmbedding and transformers differ in when they switch factors
# and in the attention factor), and anything vLLM's get_rope does not know.
ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate"},
}
ROPE_REQUIRED = {
    "linear": {"factor"},
    "llama3": ROPE_KEYS["llama3"],
    "yarn": {"factor", "original_max_position_embeddings"},
}
_ROPE_COMMON = {"rope_type", "rope_theta", "partial_rotary_factor"}



# ------------------------------------------------------------------------------------------------------ config


def _refuse(what: str) -> HybridizeError:
    return HybridizeError(f"cannot export to qwen3_5: {what}; nothing was written")


def _export_rope(rope: dict | None) -> dict:
    rope = dict(rope or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_KEYS:
        raise _refuse(
            f"rope_type {rope_type!r} is not one that transformers' Qwen3.5 and vLLM compute alike "
            f"(supported: {', '.join(ROPE_KEYS)})"
        )
    extra = sorted(set(rope) - _ROPE_COMMON - ROPE_KEYS[rope_type])
    if extra:
        raise _refuse(f"rope_parameters of type {rope_type!r} set {', '.join(extra)}, which vLLM's get_rope ignores")
    missing = sorted(ROPE_REQUIRED.get(rope_type, set()) - set(rope))
    if missing:
        raise _refuse(f"rope_type {rope_type!r} lacks {', '.join(missing)}, which vLLM's get_rope requires")
    if "rope_theta" not in rope:
        raise _refuse("rope_parameters has no rope_theta")
    rope["rope_type"] = rope_type
    rope["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", 1.0))  # qwen3_5_text defaults to 0.25
    return rope


def qwen3_5_config_dict(config: HybridConfig, raw: dict | None = None) -> dict:
    """The config.json of the export, or a one-line HybridizeError saying what `qwen3_5_text` cannot express.

    `raw` is our config.json as stored (to find fields qwen3_5_text lacks); None checks `config.to_dict()`.
    """
    raw = dict(raw if raw is not None else config.to_dict())
    if not config.attention_qk_norm:
        raise _refuse(
            "the model has no q/k-norm (a Llama-family source); qwen3_5_text always applies q_norm/k_norm as "
            "x*(1+w), which is not the identity for any weight"
        )
    try:
        config.validate_architecture()
    except ValueError as e:
        raise _refuse(str(e)) from None
    unknown = sorted(k for k in set(raw) - set(SHARED_FIELDS) - _GENERIC_KEYS if raw[k] not in (None, False, 0, [], {}))
    if unknown:
        raise _refuse(f"qwen3_5_text has no field for {', '.join(unknown)}")
    out = {"architectures": [QWEN3_5_ARCHITECTURE], "model_type": QWEN3_5_MODEL_TYPE}
    out.update({k: getattr(config, k) for k in SHARED_FIELDS})
    out["layer_types"] = list(config.layer_types)
    out["rope_parameters"] = _export_rope(config.rope_parameters)
    if config.mtp_num_hidden_layers:
        out["mtp_num_hidden_layers"] = config.mtp_num_hidden_layers
        out["mtp_use_dedicated_embeddings"] = False  # the MTP module reads the backbone's embed_tokens and lm_head
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    if dtype is not None:
        out["dtype"] = str(dtype).removeprefix("torch.")
    return out


def _config_dict(config) -> dict:
    return dict(config) if isinstance(config, dict) else config.to_dict()


def qwen3_5_to_hybrid_config(cfg_dict: dict) -> HybridConfig:
    """Read a `qwen3_5_text` config (a config.json dict or a Qwen3_5TextConfig) as a HybridConfig.

    transformers' Qwen3_5TextConfig interprets the dict first, so its defaults apply exactly: `layer_types` from
    `full_attention_interval` when absent, `partial_rotary_factor` 0.25 when absent. `mtp_num_hidden_layers: 1`
    keeps the checkpoint's `mtp.*` module (our MTP heads); any other value imports without MTP heads (`mtp.*` is
    then ignored: separate modules per depth are not supported).
    """
    from transformers import Qwen3_5TextConfig

    cfg_dict = _config_dict(cfg_dict)
    if cfg_dict.get("model_type") != QWEN3_5_MODEL_TYPE:
        raise HybridizeError(f"expected a {QWEN3_5_MODEL_TYPE!r} config, got model_type {cfg_dict.get('model_type')!r}")
    if cfg_dict.get("attn_output_gate", True) is False:
        raise HybridizeError("this qwen3_5_text config sets attn_output_gate false; hybridize always gates attention")
    try:
        q = Qwen3_5TextConfig.from_dict({k: v for k, v in cfg_dict.items() if k != "transformers_version"})
    except Exception as e:  # transformers' strict-dataclass errors are not ValueErrors
        raise HybridizeError(f"cannot read the qwen3_5_text config: {' '.join(str(e).split())}") from None
    kwargs = {k: getattr(q, k) for k in SHARED_FIELDS}
    kwargs["layer_types"] = list(q.layer_types)
    cfg = HybridConfig(
        **kwargs,
        rope_parameters=dict(q.rope_parameters),
        attention_qk_norm=True,
        source_model_type=cfg_dict.get("source_model_type") or QWEN3_5_MODEL_TYPE,
        mtp_num_hidden_layers=1 if cfg_dict.get("mtp_num_hidden_layers") == 1 else 0,
    )
    cfg.architectures = ["HybridForCausalLM"]
    if getattr(q, "dtype", None) is not None:
        cfg.dtype = q.dtype
    return cfg


# ------------------------------------------------------------------------------------------------------ tensors


def _expected_specs(qdict: dict, config: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor transformers' Qwen3_5ForCausalLM loads for this config (meta device), plus
    the `mtp.*` tensors (transformers skips them; vLLM's qwen3_5_mtp loads them, names checked in tests)."""
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5ForCausalLM

    qcfg = Qwen3_5TextConfig.from_dict(qdict)
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(qcfg)
    specs = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if qcfg.tie_word_embeddings:
        specs.pop("lm_head.weight", None)
    return specs | {n: s for n, s in _hybrid_specs(config).items() if n.startswith(MTP_PREFIX)}


def _hybrid_specs(cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor HybridForCausalLM(cfg) stores (meta device)."""
    with torch.device("meta"):
        model = HybridForCausalLM(cfg)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return expected


def _shapes(source) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a Source's tensors, from the safetensors headers (nothing is read)."""
    return {n: tuple(source.spec(n)[0]) for n in source.names}


def _check_tensors(folder: Path, have: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                   ignore_prefixes: tuple[str, ...] = ()) -> None:
    missing = sorted(set(expected) - set(have))
    if missing:
        raise HybridizeError(f"{folder} lacks {len(missing)} tensor(s) the format needs, e.g. {', '.join(missing[:3])}")
    extra = sorted(n for n in set(have) - set(expected) if not n.startswith(ignore_prefixes))
    if extra:
        raise HybridizeError(
            f"{folder} has {len(extra)} tensor(s) qwen3_5_text has no place for, e.g. {', '.join(extra[:3])}"
        )
    bad = [n for n in expected if have[n] != expected[n]]
    if bad:
        n = bad[0]
        raise HybridizeError(f"{folder}: tensor {n} has shape {list(have[n])}, the format needs {list(expected[n])}")


def check_qwen3_5_source(source, cfg: HybridConfig) -> dict[str, tuple[int, ...]]:
    """Refuse a qwen3_5_text checkpoint whose tensors (names, shapes) are not what `cfg` builds; returns the
    expected name -> shape map (`mtp.*` included when `cfg` has MTP heads, else ignored). Headers only: called
    before any output exists."""
    expected = _hybrid_specs(cfg)
    ignore = () if cfg.mtp_num_hidden_layers else (MTP_PREFIX,)
    _check_tensors(Path(source.path), _shapes(source), expected, ignore_prefixes=ignore)
    return expected


def iter_qwen3_5_tensors(source, cfg: HybridConfig, dtype: torch.dtype | None = None
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """Import: yield (name, tensor) of a qwen3_5_text checkpoint for HybridForCausalLM(cfg) (`mtp.*` included when
    cfg has MTP heads).

    `source` is a `hybridize.transfer.sources.Source`. Names and conventions are identical, so this is a copy.
    """
    for name in check_qwen3_5_source(source, cfg):
        t = source.tensor(name)
        yield name, t if dtype is None else t.to(dtype)


# ------------------------------------------------------------------------------------------------------ export


def _read_hybrid(hybrid_dir) -> tuple[Path, dict, HybridConfig]:
    folder = Path(hybrid_dir).expanduser()
    if not folder.exists():
        raise HybridizeError(f"{hybrid_dir} does not exist")
    if not folder.is_dir():
        raise HybridizeError(f"{hybrid_dir} is not a folder (pass a hybridize model folder)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HybridizeError(f"{hybrid_dir} is not a model folder: no config.json")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON, not UTF-8, absurd nesting
        raise HybridizeError(f"{config_file} is not valid JSON: {e}") from None
    if isinstance(raw, dict) and raw.get("model_type") == "hybridize_etd":
        raise _refuse("it is an Encode-Think-Decode model (looped think block, layer routers, LoRA experts), which "
                      "no serving engine runs yet")
    if not isinstance(raw, dict) or raw.get("model_type") != HybridConfig.model_type:
        got = raw.get("model_type") if isinstance(raw, dict) else None
        raise HybridizeError(
            f"{hybrid_dir} is not a hybridize model (model_type {got!r}, expected {HybridConfig.model_type!r})"
        )
    try:
        config = HybridConfig.from_dict({k: v for k, v in raw.items() if k != "transformers_version"})
        config.validate_architecture()
    except HybridizeError:
        raise
    except Exception as e:  # transformers' strict-dataclass errors are not ValueErrors
        raise HybridizeError(f"cannot read {config_file}: {' '.join(str(e).split())}") from None
    return folder, raw, config


def export_qwen3_5(hybrid_dir, out, force: bool = False, max_shard_bytes: int = 2 * 1024**3) -> dict:
    """Write the hybridize model in `hybrid_dir` as a stock `qwen3_5_text` checkpoint at `out`.

    The result loads with `transformers.AutoModelForCausalLM` (Qwen3_5ForCausalLM) and vLLM. Tensors are streamed
    one at a time in their stored dtype; the folder is written to a temporary sibling and renamed into place, so a
    failure or a refusal leaves nothing behind. Returns a summary dict.
    """
    start = time.perf_counter()
    out = Path(out).expanduser().absolute()
    folder, raw, config = _read_hybrid(hybrid_dir)
    check_not_an_input(out, [folder], what="OUT")  # resolved: `sub/../DIR` and symlinks are the folder too
    if out.exists() and not force:
        raise HybridizeError(f"{out} already exists; pass --force (force=True) to replace it")
    qdict = qwen3_5_config_dict(config, raw)  # refusals happen here, before any output
    source = Source._from_folder(folder, config, "hybridize")  # headers only
    try:
        expected = _expected_specs(qdict, config)
    except Exception as e:  # transformers' strict config validation: a value the format refuses
        raise _refuse(" ".join(str(e).split())) from None
    _check_tensors(folder, _shapes(source), expected)
    specs = [(n, expected[n], source._where[n].dtype) for n in expected]
    with atomic_output_folder(out, force, inputs=[folder]) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes)
        for name, _, _ in specs:
            writer.write(name, source.tensor(name))
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(qdict, indent=2, sort_keys=True) + "\n")
        copy_side_files((folder / f for f in TOKENIZER_FILES), tmp, config)
    return {
        "output": str(out),
        "format": "qwen3_5",
        "architecture": QWEN3_5_ARCHITECTURE,
        "seconds": round(time.perf_counter() - start, 2),
        "tensors": len(specs),
        "bytes_written": writer.total_bytes,
        "layer_stats": layer_stats(config.layer_types),
    }


__all__ = [
    "export_qwen3_5",
    "check_qwen3_5_source",
    "iter_qwen3_5_tensors",
    "qwen3_5_config_dict",
    "qwen3_5_to_hybrid_config",
]
