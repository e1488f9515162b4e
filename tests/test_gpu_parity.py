"""GPU parity: fla's Triton kernels (through hybridize.ops.gated_delta_rule) vs our PyTorch reference.

Run with ``pytest -m gpu -s tests/test_gpu_parity.py`` to see the measured errors. The reference is our
chunked torch implementation evaluated in float64 on the same (already rounded) inputs; it is itself pinned
to the per-token float64 spec by tests/test_ops.py. Note (fla issue #640): on Hopper the fla backward may need
tilelang; we just run it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridize.ops import chunk_gated_delta_rule, fla_available, gated_delta_rule, recurrent_gated_delta_rule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not fla_available(), reason="flash-linear-attention (fla) is not installed"),
]

# relative error = ||x - ref||_2 / ||ref||_2   (fwd bound, bwd bound)
BOUNDS = {torch.bfloat16: (2e-2, 5e-2), torch.float32: (5e-3, 2e-2)}
NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_inputs(B, T, Hk, Hv, K, V, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"

    def rn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32)

    q = F.normalize(rn(B, T, Hk, K), dim=-1).to(dtype)
    k = F.normalize(rn(B, T, Hk, K), dim=-1).to(dtype)
    v = rn(B, T, Hv, V).to(dtype)
    g = F.logsigmoid(rn(B, T, Hv) + 3.0)  # float32 log decay, as Qwen3.5's GatedDeltaNet produces it
    beta = torch.sigmoid(rn(B, T, Hv)).to(dtype)
    h0 = 0.1 * rn(B, Hv, K, V)  # float32 state
    return [x.requires_grad_(True) for x in (q, k, v, g, beta, h0)]


def forward_backward(fn, inputs, seed=1):
    q, k, v, g, beta, h0 = inputs
    o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    wo = torch.randn(o.shape, generator=gen, device="cuda")
    ws = torch.randn(s.shape, generator=gen, device="cuda")
    loss = (o.float() * wo).sum() + (s.float() * ws).sum()
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach(), s.detach(), *grads]


def reference(inputs):
    inputs64 = [x.detach().double().requires_grad_(True) for x in inputs]
    return forward_backward(chunk_gated_delta_rule, inputs64)


def check(label, got, ref, bounds):
    fwd_bound, bwd_bound = bounds
    errs = {n: rel_err(a, b) for n, a, b in zip(NAMES, got, ref, strict=True)}
    summary = ", ".join(f"{n}={e:.2e}" for n, e in errs.items())
    print(f"\n[{label}] relative L2 errors vs float64 torch reference: {summary}")
    for n, e in errs.items():
        bound = fwd_bound if n in ("o", "final_state") else bwd_bound
        assert e < bound, f"{label}: {n} relative error {e:.3e} >= {bound:.1e}"


@pytest.fixture(autouse=True)
def _fla_enabled(monkeypatch):
    monkeypatch.delenv("HYBRIDIZE_DISABLE_FLA", raising=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "shape",
    [(2, 300, 4, 8, 64, 64), (1, 2048, 32, 32, 128, 128), (1, 2048, 16, 32, 128, 128)],
    ids=["B2-T300-gva4x8-64", "B1-T2048-32h-128", "B1-T2048-gva16x32-128"],
)
def test_fla_chunk_matches_reference(shape, dtype):
    inputs = make_inputs(*shape, dtype=dtype)
    got = forward_backward(gated_delta_rule, inputs)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    check(f"chunk {shape} {dtype}", got, reference(inputs), BOUNDS[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fla_decode_matches_reference(dtype):
    # T == 1 goes through fla's fused_recurrent kernel; compare a few decode steps from a prefilled state
    B, Hk, Hv, K, V = 2, 4, 8, 64, 64
    inputs = [x.detach() for x in make_inputs(B, 8, Hk, Hv, K, V, dtype=dtype, seed=3)]
    q, k, v, g, beta, h0 = inputs
    s_ours, s_fla = h0.double(), h0
    errs = []
    with torch.no_grad():
        for t in range(q.shape[1]):
            sl = slice(t, t + 1)
            o_fla, s_fla = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                            initial_state=s_fla, output_final_state=True)
            o_ref, s_ours = recurrent_gated_delta_rule(q[:, sl].double(), k[:, sl].double(), v[:, sl].double(),
                                                       g[:, sl].double(), beta[:, sl].double(),
                                                       initial_state=s_ours, output_final_state=True)
            assert o_fla.dtype == dtype and s_fla.dtype == torch.float32
            errs.append((rel_err(o_fla, o_ref), rel_err(s_fla, s_ours)))
    worst_o, worst_s = max(e[0] for e in errs), max(e[1] for e in errs)
    print(f"\n[decode {dtype}] max relative errors over 8 steps: o={worst_o:.2e} state={worst_s:.2e}")
    assert worst_o < BOUNDS[dtype][0] and worst_s < BOUNDS[dtype][0]


def test_fla_prefill_then_decode_matches_full_run():
    B, T, T0, Hk, Hv, K, V = 1, 200, 190, 4, 8, 64, 64
    q, k, v, g, beta, h0 = (x.detach() for x in make_inputs(B, T, Hk, Hv, K, V, dtype=torch.bfloat16, seed=5))
    with torch.no_grad():
        o_full, s_full = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        o_pre, s = gated_delta_rule(q[:, :T0], k[:, :T0], v[:, :T0], g[:, :T0], beta[:, :T0],
                                    initial_state=h0, output_final_state=True)
        outs = [o_pre]
        for t in range(T0, T):
            sl = slice(t, t + 1)
            o_t, s = gated_delta_rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl],
                                      initial_state=s, output_final_state=True)
            outs.append(o_t)
    e_o, e_s = rel_err(torch.cat(outs, 1), o_full), rel_err(s, s_full)
    print(f"\n[prefill+decode bf16] relative errors vs one full run: o={e_o:.2e} state={e_s:.2e}")
    assert e_o < 2e-2 and e_s < 1e-2
