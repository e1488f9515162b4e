"""Shared test fixtures: tiny random Qwen3 / Llama source folders written exactly like real checkpoints.

Use the factory directly for custom shapes:

    def test_x(make_tiny_source, tmp_path):
        folder = make_tiny_source(tmp_path / "m", family="llama", tie=True, num_hidden_layers=8)

or the ready-made fixtures `tiny_qwen3_dir`, `tiny_qwen3_tied_dir`, `tiny_llama_dir` (tied, like SmolLM),
`tiny_llama_untied_dir`, and `tiny_source_dir` (parametrised over all four). Config overrides reach the
ready-made fixtures through indirect parametrisation:

    @pytest.mark.parametrize("tiny_qwen3_dir", [{"num_hidden_layers": 8}], indirect=True)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"

TINY_SHAPES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(family: str = "qwen3", tie: bool = False, **overrides):
    """A tiny transformers config of `family` ("qwen3", "llama" or "mistral" without sliding window)."""
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    kwargs = {**TINY_SHAPES, "tie_word_embeddings": tie, **overrides}
    if family == "qwen3":
        kwargs.setdefault("rope_theta", 1_000_000.0)
        return Qwen3Config(**kwargs)
    if family == "llama":
        kwargs.setdefault("rope_theta", 100_000.0)
        return LlamaConfig(**kwargs)
    if family == "mistral":
        kwargs.setdefault("sliding_window", None)
        return MistralConfig(**kwargs)
    raise ValueError(f"unknown tiny family {family!r}")


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `vocab_size` tokens plus a generation config, so tokenizer files exist."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)


def build_tiny_source(
    folder: str | Path,
    family: str = "qwen3",
    tie: bool = False,
    max_shard_size: int | str | None = None,
    seed: int = 0,
    randomize_norms: bool = True,
    tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> Path:
    """Build a random tiny causal LM with transformers and `save_pretrained` it (safetensors) into `folder`.

    Norm weights are drawn around 1 (1 + 0.1·N(0,1)) so that conventions such as Qwen3.5's `(1 + w)` are really
    exercised. `max_shard_size` (e.g. "20KB") writes a sharded checkpoint with a model.safetensors.index.json.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    config = tiny_config(family, tie=tie, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    if randomize_norms:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kwargs)  # transformers 5 always writes safetensors
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(folder)
    if tokenizer:
        _write_tokenizer(folder, config.vocab_size)
    return folder


def load_tiny_source(folder: str | Path):
    """The transformers model saved in `folder` (float32, eval mode): the reference a conversion is checked against."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture
def make_tiny_source(tmp_path_factory):
    """Factory: make_tiny_source(folder=None, family="qwen3", tie=False, max_shard_size=None, **config_overrides)."""

    def make(folder: str | Path | None = None, **kwargs) -> Path:
        if folder is None:
            folder = tmp_path_factory.mktemp("tiny") / "source"
        return build_tiny_source(folder, **kwargs)

    return make


def _overrides(request) -> dict:
    return dict(getattr(request, "param", None) or {})


@pytest.fixture
def tiny_qwen3_dir(make_tiny_source, request) -> Path:
    """Tiny untied Qwen3 folder (4 layers, 4 q heads / 2 kv heads of 16); indirect-parametrise to override."""
    kw = {"tie": False, **_overrides(request)}
    return make_tiny_source(family="qwen3", **kw)


@pytest.fixture
def tiny_qwen3_tied_dir(make_tiny_source, request) -> Path:
    kw = {"tie": True, **_overrides(request)}
    return make_tiny_source(family="qwen3", **kw)


@pytest.fixture
def tiny_llama_dir(make_tiny_source, request) -> Path:
    """Tiny Llama folder with tied embeddings (like SmolLM); indirect-parametrise to override."""
    kw = {"tie": True, **_overrides(request)}
    return make_tiny_source(family="llama", **kw)


@pytest.fixture
def tiny_llama_untied_dir(make_tiny_source, request) -> Path:
    kw = {"tie": False, **_overrides(request)}
    return make_tiny_source(family="llama", **kw)


@pytest.fixture(
    params=[("qwen3", False), ("qwen3", True), ("llama", False), ("llama", True)],
    ids=["qwen3-untied", "qwen3-tied", "llama-untied", "llama-tied"],
)
def tiny_source_dir(make_tiny_source, request) -> Path:
    """Every tiny family × tie combination."""
    family, tie = request.param
    return make_tiny_source(family=family, tie=tie)


@pytest.fixture
def qwen3_8b_config_path() -> Path:
    """The real Qwen3-8B config.json (no weights)."""
    return FIXTURES / "qwen3_8b_config.json"
