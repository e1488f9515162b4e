"""GPU parity of the fused layer ops (hybridize.ops.dispatch) with the PyTorch reference path, values and gradients.

Each op runs twice on the same CUDA inputs: with fla (fused Triton kernels) and with HYBRIDIZE_DISABLE_FLA=1 (our
PyTorch ops, which tests/test_ops.py pins to float64 loops). Run ``pytest -m gpu -s tests/test_gpu_fused.py``.
"""

from __future__ import annotations

import pytest
import torch

from hybridize.ops import dispatch
from hybridize.ops.dispatch import fla_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not fla_available(), reason="flash-linear-attention (fla) is not installed"),
]
BOUND = {torch.float32: 2e-3, torch.bfloat16: 2e-2}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def both_paths(monkeypatch, fn, inputs):
    """(fused, reference) lists of [outputs..., input grads...] for a random projection of the outputs."""
    results = []
    for disable in ("0", "1"):
        monkeypatch.setenv("HYBRIDIZE_DISABLE_FLA", disable)
        xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
        outs = [o for o in fn(*xs) if o is not None]
        gen = torch.Generator(device="cuda").manual_seed(7)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen, device="cuda")).sum() for o in outs)
        grads = torch.autograd.grad(loss, [x for x in xs if x.requires_grad])
        results.append([o.detach() for o in outs] + list(grads))
    return results


def check(name, fused, ref, dtype):
    errs = [rel(a, b) for a, b in zip(fused, ref, strict=True)]
    print(f"{name} {dtype}: " + " ".join(f"{e:.1e}" for e in errs))
    assert all(e < BOUND[dtype] for e in errs), errs


def randn(*shape, dtype=torch.float32, grad=True, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_state", [False, True])
def test_short_conv(monkeypatch, dtype, with_state):
    B, T, D, W = 2, 200, 96, 4
    x, w = randn(B, T, D, dtype=dtype), randn(D, W, dtype=dtype, scale=0.5)
    state = randn(B, D, W - 1, dtype=dtype, grad=False) if with_state else None

    def fn(x, w):
        return dispatch.short_conv(x, w, state, output_final_state=True)

    fused, ref = both_paths(monkeypatch, fn, [x, w])
    check(f"short_conv state={with_state}", fused, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_conv_decode_steps_continue_the_prefill(monkeypatch, dtype):
    B, T, D, W = 2, 40, 64, 4
    x, w = randn(B, T, D, dtype=dtype, grad=False), randn(D, W, dtype=dtype, grad=False, scale=0.5)
    monkeypatch.setenv("HYBRIDIZE_DISABLE_FLA", "0")
    with torch.no_grad():
        full, _ = dispatch.short_conv(x, w)
        y, state = dispatch.short_conv(x[:, :30], w, output_final_state=True)
        parts = [y]
        for t in range(30, T):
            y, state = dispatch.short_conv(x[:, t:t + 1], w, state, output_final_state=True)
            parts.append(y)
    assert rel(torch.cat(parts, 1), full) < BOUND[dtype] / 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 300])
def test_gated_delta_net_core(monkeypatch, dtype, T):
    B, Hk, Hv, K, V = 2, 2, 4, 64, 64
    q, k, v = randn(B, T, Hk, K, dtype=dtype), randn(B, T, Hk, K, dtype=dtype), randn(B, T, Hv, V, dtype=dtype)
    a, b = randn(B, T, Hv, dtype=dtype), randn(B, T, Hv, dtype=dtype)
    A_log = torch.empty(Hv, device="cuda").uniform_(0, 2.7).requires_grad_(True)
    dt_bias = torch.empty(Hv, device="cuda").uniform_(-6, -2).requires_grad_(True)
    h0 = randn(B, Hv, K, V, scale=0.1, grad=False)

    def fn(q, k, v, a, b, A_log, dt_bias):
        return dispatch.gated_delta_net(q, k, v, a, b, A_log, dt_bias, initial_state=h0, output_final_state=True)

    fused, ref = both_paths(monkeypatch, fn, [q, k, v, a, b, A_log, dt_bias])
    check(f"gated_delta_net T={T}", fused, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
def test_all_states_token_by_token_equal_the_closed_form(monkeypatch, dtype, B):
    """A verify step's states (fla's one-token kernel once per token) against the closed-form PyTorch op."""
    T, Hk, Hv, K, V = 4, 2, 4, 64, 64
    q, k = randn(B, T, Hk, K, dtype=dtype, grad=False), randn(B, T, Hk, K, dtype=dtype, grad=False)
    v, a, b = randn(B, T, Hv, V, dtype=dtype, grad=False), randn(B, T, Hv, dtype=dtype, grad=False), \
        randn(B, T, Hv, dtype=dtype, grad=False)
    A_log, dt_bias = torch.empty(Hv, device="cuda").uniform_(0, 2.7), torch.empty(Hv, device="cuda").uniform_(-6, -2)
    h0 = randn(B, Hv, K, V, scale=0.1, grad=False)
    results = []
    for disable in ("0", "1"):
        monkeypatch.setenv("HYBRIDIZE_DISABLE_FLA", disable)
        with torch.no_grad():
            results.append(dispatch.gated_delta_net(q, k, v, a, b, A_log, dt_bias, initial_state=h0,
                                                    output_all_states=True))
    (o, states), (o_ref, states_ref) = results
    assert states.shape == states_ref.shape == (B, T, Hv, K, V) and states.dtype == torch.float32
    check("all states token by token", [o, states], [o_ref, states_ref], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_swiglu(monkeypatch, dtype):
    x, z = randn(3, 50, 4, 128, dtype=dtype), randn(3, 50, 4, 128, dtype=dtype)
    w_gated = (1 + 0.1 * torch.randn(128, device="cuda")).to(dtype).requires_grad_(True)
    w_plus = (0.1 * torch.randn(128, device="cuda")).to(dtype).requires_grad_(True)
    fused, ref = both_paths(monkeypatch, lambda x, z, w: [dispatch.gated_rms_norm(x, z, w, 1e-6)], [x, z, w_gated])
    check("gated_rms_norm", fused, ref, dtype)
    fused, ref = both_paths(monkeypatch, lambda x, w: [dispatch.rms_norm(x, w, 1e-6)], [x, w_plus])
    check("rms_norm (1 + w)", fused, ref, dtype)
    fused, ref = both_paths(monkeypatch, lambda x, z: [dispatch.silu_mul(x, z)], [x, z])
    check("silu_mul", fused, ref, dtype)


def test_small_eager_calls_take_the_pytorch_ops_unless_always_fused(monkeypatch):
    """Host-bound eager calls (no grad, small) skip fla's wrappers; the fixed-buffer step (always_fused) keeps them."""
    calls = []
    fla = dispatch._fla()
    monkeypatch.setattr(fla, "rms_norm", lambda *a, **k: calls.append("fla") or a[0])
    x, scale = randn(4, 64, grad=False), torch.ones(64, device="cuda")
    with torch.no_grad():
        ref = dispatch.scaled_rms_norm(x, scale, 1e-6)
        assert calls == [] and rel(ref, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) < 1e-6
        with dispatch.always_fused():
            dispatch.scaled_rms_norm(x, scale, 1e-6)
    assert calls == ["fla"]
