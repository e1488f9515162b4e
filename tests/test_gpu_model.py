"""The hybrid model on CUDA with fla's kernels vs the same model on our PyTorch reference path."""

from __future__ import annotations

import pytest
import torch

from hybridize import HybridCache, HybridConfig, HybridForCausalLM
from hybridize.ops import fla_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not fla_available(), reason="flash-linear-attention (fla) is not installed"),
]


def model_on_cuda(dtype):
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=64, linear_value_head_dim=64)
    return HybridForCausalLM(cfg).to("cuda", dtype).eval()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
def test_model_with_fla_matches_reference_path(monkeypatch, dtype, bound):
    model = model_on_cuda(dtype)
    ids = torch.randint(0, 512, (2, 300), device="cuda")
    with torch.no_grad():
        fast = model(ids).logits
        monkeypatch.setenv("HYBRIDIZE_DISABLE_FLA", "1")
        ref = model(ids).logits
    err = rel(fast, ref)
    print(f"model logits fla vs torch, {dtype}: rel err {err:.2e}")
    assert err < bound


def test_cached_decoding_with_fla_equals_full_forward():
    model = model_on_cuda(torch.float32)
    ids = torch.randint(0, 512, (2, 80), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
        cache = HybridCache(model.config)
        parts = [model(ids[:, :64], cache=cache).logits]
        parts += [model(ids[:, t : t + 1], cache=cache).logits for t in range(64, 80)]
    err = rel(torch.cat(parts, 1), full)
    print(f"cached (fla fused_recurrent) vs full (fla chunk): rel err {err:.2e}")
    assert err < 2e-3


def test_training_step_gradients_with_fla(monkeypatch):
    model = model_on_cuda(torch.float32).train()
    ids = torch.randint(0, 512, (2, 256), device="cuda")

    def grads():
        model.zero_grad()
        model(ids, labels=ids)["loss"].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    fast = grads()
    monkeypatch.setenv("HYBRIDIZE_DISABLE_FLA", "1")
    ref = grads()
    err = rel(fast, ref)
    print(f"model gradients fla vs torch (fp32): rel err {err:.2e}")
    assert err < 1e-2
