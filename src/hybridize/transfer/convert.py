"""Conversion entry points: an in-memory model (`create_hybrid_from_qwen3`) or a folder on disk (`convert_to_folder`).

Both stream the same tensors from `mapping.iter_hybrid_tensors`. The folder path never holds the model in memory:
the shard layout comes from a meta-device model, then each tensor goes straight to its place on disk, inside a
temporary folder that is renamed into place only when everything is written.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import HybridizeError
from ..export.qwen3_5 import check_qwen3_5_source, iter_qwen3_5_tensors, qwen3_5_to_hybrid_config
from ..model.config import HybridConfig, layer_stats
from ..model.etd import ETDConfig, etd_from_hybrid
from ..model.modeling import HybridForCausalLM
from ..output import atomic_output_folder, check_output_folder, copy_side_files
from .calibrate import calibrator_for
from .config import CrossArchTransferConfig, HybridAttentionConfig, hybrid_config_from_source
from .mapping import iter_hybrid_tensors, required_source_tensors, source_tensor_shapes
from .safetensors_io import ShardedWriter
from .sources import check_source_tensors, open_source

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(dtype: torch.dtype | str | None, source_config) -> torch.dtype:
    """The dtype asked for (a torch dtype or its name), else the source checkpoint's stored dtype, else float32."""
    if dtype is None:
        stored = getattr(source_config, "dtype", None)
        stored = str(stored).removeprefix("torch.") if stored is not None else None
        return DTYPES.get(stored, torch.float32)
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPES:
            raise HybridizeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype.removeprefix("torch.")]
    return dtype


def _transfer_config(config: CrossArchTransferConfig | HybridAttentionConfig | None) -> CrossArchTransferConfig:
    if config is None:
        return CrossArchTransferConfig()
    if isinstance(config, HybridAttentionConfig):
        return CrossArchTransferConfig(hybrid_attention=config)
    return config


def hybrid_config_for(source_config, family: str, attention: HybridAttentionConfig, dtype: torch.dtype
                      ) -> HybridConfig:
    """The hybrid's config for a source config (used by conversion and by `--dry-run`)."""
    if family == "qwen3_5_text":  # already this layout (Qwen3.5, or our own export): an exact import
        cfg = qwen3_5_to_hybrid_config(source_config)
    else:
        cfg = hybrid_config_from_source(source_config, family, attention)
    cfg.architectures = ["HybridForCausalLM"]
    cfg.dtype = dtype
    return cfg


def _hybrid_tensors(source, cfg: HybridConfig, transfer: CrossArchTransferConfig, dtype: torch.dtype,
                    calibrator=None):
    if source.family == "qwen3_5_text":
        return iter_qwen3_5_tensors(source, cfg, dtype)
    return iter_hybrid_tensors(source, cfg, transfer.gate_init_strategy, transfer.seed, dtype, layer_hook=calibrator)


def _check_complete(source, cfg: HybridConfig) -> None:
    """Refuse a source that lacks tensors the transfer needs, or whose tensors disagree with its config, before any
    output exists."""
    if source.family == "qwen3_5_text":
        check_qwen3_5_source(source, cfg)
        check_source_tensors(source, None)
        return
    missing = [n for n in required_source_tensors(cfg) if not source.has(n)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise HybridizeError(f"{source.path} lacks tensors the conversion needs: {', '.join(missing[:3])}{more}")
    check_source_tensors(source, source_tensor_shapes(cfg))


def _meta_model(cfg: HybridConfig) -> HybridForCausalLM:
    with torch.device("meta"):
        return HybridForCausalLM(cfg)


def create_hybrid_from_qwen3(source, config: CrossArchTransferConfig | HybridAttentionConfig | None = None,
                             device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                             progress: bool = False) -> HybridForCausalLM:
    """Convert a Qwen3 or Llama-family model (local HF folder, hub id or .gguf file) into a hybrid in memory.

    `config` is a CrossArchTransferConfig (or just its HybridAttentionConfig); None = the 3:1 pattern with the
    function-preserving "ones" gate. `dtype` None keeps the source checkpoint's dtype. With
    `config.calibrate_data` set, DeltaNet layers are calibrated on that text first (see transfer/calibrate.py).
    """
    transfer = _transfer_config(config)
    with open_source(source) as src:
        dtype = resolve_dtype(dtype, src.config)
        cfg = hybrid_config_for(src.config, src.family, transfer.hybrid_attention, dtype)
        _check_complete(src, cfg)
        calibrator = calibrator_for(src, cfg, transfer, progress)
        model = _meta_model(cfg).to_empty(device=device).to(dtype)
        params = dict(model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            tensors = _hybrid_tensors(src, cfg, transfer, dtype, calibrator)
            for name, tensor in tqdm(tensors, desc="transfer", disable=not progress, total=len(params)):
                params[name].copy_(tensor)
        model.tie_weights()
        model.model.rotary_emb.inv_freq.copy_(model.model.rotary_emb.compute_inv_freq(device)[0])
        model.model.rotary_emb.original_inv_freq = model.model.rotary_emb.inv_freq.clone()
    model.config.name_or_path = str(source)
    return model.eval()


def create_full_hybrid_model(config: CrossArchTransferConfig | str, device: str | torch.device = "cpu",
                             dtype: torch.dtype | str | None = None, use_etd: bool = False,
                             etd_config: ETDConfig | None = None) -> HybridForCausalLM:
    """The whole conversion described by one CrossArchTransferConfig (its `source_model` is the source; a plain
    source path means the default transfer). `use_etd=True` wraps the hybrid in Encode–Think–Decode looping
    (`etd_config`, default ETDConfig(): 25/50/25% split, 2 iterations, router, 4 LoRA experts); untrained, its
    routers always EXECUTE and its experts add zero, so it differs from the hybrid only by the repeated iterations."""
    if isinstance(config, (str, Path)):
        config = CrossArchTransferConfig(source_model=str(config))
    if not config.source_model:
        raise HybridizeError("CrossArchTransferConfig.source_model is empty: name a folder, hub id or .gguf file")
    if etd_config is not None and not use_etd:
        raise HybridizeError("etd_config is given but use_etd is False; pass use_etd=True to build an ETD model")
    model = create_hybrid_from_qwen3(config.source_model, config, device=device, dtype=dtype)
    return etd_from_hybrid(model, etd_config or ETDConfig()).eval() if use_etd else model


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def convert_to_folder(source: str, output: str | Path, config: CrossArchTransferConfig | None = None,
                      dtype: torch.dtype | str | None = None, force: bool = False, progress: bool = True,
                      max_shard_bytes: int = 2 * 1024**3) -> dict:
    """Convert `source` into an HF folder at `output` (config, sharded safetensors, tokenizer, generation config).

    Returns a summary (seconds, peak RSS, layer stats, parameter count). Nothing is left behind on failure.
    """
    start = time.perf_counter()
    transfer = _transfer_config(config)
    output = check_output_folder(output, force, [source])  # fail before reading a large source
    with open_source(source) as src:
        dtype = resolve_dtype(dtype, src.config)
        cfg = hybrid_config_for(src.config, src.family, transfer.hybrid_attention, dtype)
        _check_complete(src, cfg)
        calibrator = calibrator_for(src, cfg, transfer, progress)  # reads the data: fails before any output
        meta = _meta_model(cfg)
        specs = [(n, tuple(p.shape), dtype) for n, p in meta.state_dict().items()
                 if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
        with atomic_output_folder(output, force, inputs=[source, src.path]) as tmp:
            writer = ShardedWriter(tmp, specs, max_shard_bytes)
            tensors = _hybrid_tensors(src, cfg, transfer, dtype, calibrator)
            with tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
                for name, tensor in tensors:
                    writer.write(name, tensor)
                    bar.update(tensor.numel() * tensor.element_size())
                    del tensor  # let it go before the next layer is read (the embedding alone is ~1.2 GB at 8B)
            writer.finish()
            cfg.save_pretrained(tmp)
            copy_side_files(src.tokenizer_files, tmp, cfg)
    summary = {
        "output": str(output),
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_gb": round(_peak_rss_gb(), 3),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for n, p in meta.named_parameters()),
        "bytes_written": writer.total_bytes,
        "layer_stats": layer_stats(cfg.layer_types),
    }
    if calibrator is not None:
        summary["calibration"] = calibrator.summary()
    return summary
