"""Conversion entry points: an in-memory model (`create_hybrid_from_qwen3`) or a folder on disk (`convert_to_folder`).

Both stream the same tensors from `mapping.iter_hybrid_tensors`. The folder path never holds the model in memory:
the shard layout comes from a meta-device model, then each tensor goes straight to its place on disk, inside a
temporary folder that is renamed into place only when everything is written.
"""

from __future__ import annotations

import os
import resource
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..errors import HybridizeError
from ..model.config import HybridConfig, layer_stats
from ..model.modeling import HybridForCausalLM
from .config import CrossArchTransferConfig, HybridAttentionConfig, hybrid_config_from_source
from .mapping import iter_hybrid_tensors
from .safetensors_io import ShardedWriter
from .sources import open_source

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _resolve_dtype(dtype, source) -> torch.dtype:
    if dtype is None:
        dtype = getattr(source.config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise HybridizeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return dtype


def _transfer_config(config: CrossArchTransferConfig | HybridAttentionConfig | None) -> CrossArchTransferConfig:
    if config is None:
        return CrossArchTransferConfig()
    if isinstance(config, HybridAttentionConfig):
        return CrossArchTransferConfig(hybrid_attention=config)
    return config


def _hybrid_config(source, transfer: CrossArchTransferConfig, dtype: torch.dtype) -> HybridConfig:
    cfg = hybrid_config_from_source(source.config, source.family, transfer.hybrid_attention)
    cfg.architectures = ["HybridForCausalLM"]
    cfg.dtype = dtype
    return cfg


def _meta_model(cfg: HybridConfig) -> HybridForCausalLM:
    with torch.device("meta"):
        return HybridForCausalLM(cfg)


def create_hybrid_from_qwen3(source, config: CrossArchTransferConfig | HybridAttentionConfig | None = None,
                             device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                             progress: bool = False) -> HybridForCausalLM:
    """Convert a Qwen3 or Llama-family model (local HF folder, hub id or .gguf file) into a hybrid in memory.

    `config` is a CrossArchTransferConfig (or just its HybridAttentionConfig); None = the 3:1 pattern with the
    function-preserving "ones" gate. `dtype` None keeps the source checkpoint's dtype.
    """
    transfer = _transfer_config(config)
    with open_source(source) as src:
        dtype = _resolve_dtype(dtype, src)
        cfg = _hybrid_config(src, transfer, dtype)
        model = _meta_model(cfg).to_empty(device=device).to(dtype)
        params = dict(model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            tensors = iter_hybrid_tensors(src, cfg, transfer.gate_init_strategy, transfer.seed, dtype)
            for name, tensor in tqdm(tensors, desc="transfer", disable=not progress, total=len(params)):
                params[name].copy_(tensor)
        model.tie_weights()
        model.model.rotary_emb.inv_freq.copy_(model.model.rotary_emb.compute_inv_freq(device)[0])
        model.model.rotary_emb.original_inv_freq = model.model.rotary_emb.inv_freq.clone()
    model.config.name_or_path = str(source)
    return model.eval()


def create_full_hybrid_model(config: CrossArchTransferConfig, device: str | torch.device = "cpu",
                             dtype: torch.dtype | str | None = None) -> HybridForCausalLM:
    """The whole conversion described by one CrossArchTransferConfig (its `source_model` is the source)."""
    if not config.source_model:
        raise HybridizeError("CrossArchTransferConfig.source_model is empty: name a folder, hub id or .gguf file")
    return create_hybrid_from_qwen3(config.source_model, config, device=device, dtype=dtype)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def _write_side_files(src, cfg: HybridConfig, folder: Path) -> None:
    cfg.save_pretrained(folder)
    for f in src.tokenizer_files:
        if f.name != "config.json":
            shutil.copy2(f, folder / f.name)
    if not (folder / "generation_config.json").exists():
        GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                         pad_token_id=cfg.pad_token_id).save_pretrained(folder)


def prepare_output(output: Path, force: bool) -> Path:
    """Check OUTPUT can be written and return a fresh temporary folder beside it."""
    if output.exists() and not force:
        raise HybridizeError(f"{output} already exists; pass --force (force=True) to replace it")
    if not output.parent.exists():
        raise HybridizeError(f"the parent folder of {output} does not exist")
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_output(tmp: Path, output: Path) -> None:
    """Rename the finished temporary folder into place, replacing an old OUTPUT only now."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_to_folder(source: str, output: str | Path, config: CrossArchTransferConfig | None = None,
                      dtype: torch.dtype | str | None = None, force: bool = False, progress: bool = True,
                      max_shard_bytes: int = 2 * 1024**3) -> dict:
    """Convert `source` into an HF folder at `output` (config, sharded safetensors, tokenizer, generation config).

    Returns a summary (seconds, peak RSS, layer stats, parameter count). Nothing is left behind on failure.
    """
    start = time.perf_counter()
    transfer = _transfer_config(config)
    output = Path(output).absolute()
    if output.exists() and not force:
        raise HybridizeError(f"{output} already exists; pass --force (force=True) to replace it")
    with open_source(source) as src:
        dtype = _resolve_dtype(dtype, src)
        cfg = _hybrid_config(src, transfer, dtype)
        meta = _meta_model(cfg)
        specs = [(n, tuple(p.shape), dtype) for n, p in meta.state_dict().items()
                 if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
        tmp = prepare_output(output, force)
        try:
            writer = ShardedWriter(tmp, specs, max_shard_bytes)
            tensors = iter_hybrid_tensors(src, cfg, transfer.gate_init_strategy, transfer.seed, dtype)
            with tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
                for name, tensor in tensors:
                    writer.write(name, tensor)
                    bar.update(tensor.numel() * tensor.element_size())
                    del tensor  # let it go before the next layer is read (the embedding alone is ~1.2 GB at 8B)
            writer.finish()
            _write_side_files(src, cfg, tmp)
            commit_output(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {
        "output": str(output),
        "seconds": round(time.perf_counter() - start, 2),
        "peak_rss_gb": round(_peak_rss_gb(), 3),
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for n, p in meta.named_parameters()),
        "bytes_written": writer.total_bytes,
        "layer_stats": layer_stats(cfg.layer_types),
    }
