"""Where to split a model into ETD's encoder / think block / decoder: `hybridize analyze-layers MODEL --data PATH`.

ETD (arXiv 2510.07358) reads the split off the angular distance between consecutive layers' hidden states,
d_i = mean over tokens of arccos(cos(h_i, h_{i+1})) / π (h_0 the embedding, h_{i+1} layer i's output): the first
layers change the residual stream a lot, then the curve flattens (the knee ends the encoder); read from the end,
the last layers rise again (the knee from the end starts the decoder). Between the knees is the think block, the
part that repeats best. We find each knee with Kneedle (the point farthest below the chord of the normalised,
decreasing curve) on each half of the depth; when a half shows no clear knee the proposal is the 25/50/25% split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..device import resolve_device
from ..errors import HybridizeError
from ..model.etd import default_split
from ..train.data import first_windows

KNEE_MIN = 0.2  # Kneedle's distance below the chord (normalised units) that counts as a knee
MIN_HALF = 3  # fewer points than this per half: no knee can be told from noise


@dataclass
class AnalyzeConfig:
    """`hybridize analyze-layers` settings; fields map 1:1 onto its flags."""

    tokens: int = 8192
    seq_len: int = 512
    batch_size: int = 4
    dtype: str = "float32"
    data: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.tokens < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise HybridizeError("need tokens >= 1, seq_len >= 2 and batch_size >= 1")


def _decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise HybridizeError(f"cannot find the decoder layers of {type(model).__name__} (expected model.layers)")
    return layers


@torch.no_grad()
def layer_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """[h_0, h_1, …, h_L]: the first layer's input and every decoder layer's output (B, T, D), via hooks, so the
    final norm never enters (transformers' output_hidden_states differs between models on that)."""
    layers = _decoder_layers(model)
    states: list[torch.Tensor] = []
    hooks = [layers[0].register_forward_pre_hook(lambda m, args, kwargs: states.append(
        (args[0] if args else kwargs["hidden_states"]).float()), with_kwargs=True)]
    hooks += [layer.register_forward_hook(lambda m, args, out: states.append(
        (out[0] if isinstance(out, tuple) else out).float())) for layer in layers]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return states


def angular_distance_sums(states: list[torch.Tensor]) -> torch.Tensor:
    """(L,) sums over tokens of arccos(cos(h_i, h_{i+1})) / π."""
    return torch.stack([
        torch.arccos(torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)).sum() / torch.pi
        for a, b in zip(states[:-1], states[1:], strict=True)
    ])


def knee(values: list[float]) -> int | None:
    """Kneedle on a decreasing curve: the index farthest below the chord from first to last point (normalised),
    or None when the curve does not decrease or bends less than KNEE_MIN."""
    n = len(values)
    if n < MIN_HALF or values[0] <= values[-1]:
        return None
    low, high = min(values), max(values)
    y = [(v - low) / (high - low) for v in values]
    below = [(1 - i / (n - 1)) - y[i] for i in range(n)]
    best = max(range(n), key=below.__getitem__)
    return best if below[best] >= KNEE_MIN and best > 0 else None


def propose_split(distances: list[float]) -> dict:
    """Encoder = the layers before the knee of the first half; decoder = the layers after the knee of the second
    half read backwards; else 25/50/25%."""
    L = len(distances)
    enc, dec = knee(distances[: L // 2]), knee(distances[L // 2:][::-1])
    if enc is None or dec is None or L - enc - dec < 1:
        enc, _, dec = default_split(L)
        method = "default 25/50/25%"
    else:
        method = "knee"
    return {"n_encoder_layers": enc, "n_think_layers": L - enc - dec, "n_decoder_layers": dec, "method": method}


def analyze_layers(model_path: str, cfg: AnalyzeConfig, progress: bool = True) -> dict:
    """Angular distance per layer on `cfg.data` and the proposed ETD split, as a JSON-ready report."""
    from ..train.models import load_language_model
    from .convert import DTYPES

    if not cfg.data:
        raise HybridizeError("--data is required: text to measure the layers on")
    windows = first_windows(model_path, cfg.data, cfg.tokens, cfg.seq_len)
    device = resolve_device()
    model = load_language_model(model_path, DTYPES[cfg.dtype], progress=progress).to(device)
    total, tokens = None, 0
    batches = [windows[i:i + cfg.batch_size] for i in range(0, len(windows), cfg.batch_size)]
    for batch in tqdm(batches, desc="analyze", disable=not progress):
        sums = angular_distance_sums(layer_states(model, batch.to(device))).cpu()
        total = sums if total is None else total + sums
        tokens += batch.numel()
    distances = [round(float(d), 6) for d in total / tokens]
    split = propose_split(distances)
    flags = {k: v for k, v in split.items() if k != "method"}
    return {"model": str(model_path), "tokens": tokens, "angular_distance": distances, "split": split,
            "etd_config": f"ETDConfig({', '.join(f'{k}={v}' for k, v in flags.items())})"}


__all__ = ["AnalyzeConfig", "analyze_layers", "angular_distance_sums", "knee", "layer_states", "propose_split"]
