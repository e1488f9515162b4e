"""CPU tests for hybridize.ops: chunk / recurrent gated delta rule and causal conv against float64 specs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridize.ops import (
    all_states_gated_delta_rule,
    causal_conv1d,
    chunk_gated_delta_rule,
    fla_available,
    gated_delta_rule,
    naive_causal_conv1d,
    naive_gated_delta_rule,
    recurrent_gated_delta_rule,
    unit_lower_inverse,
)

F64, F32 = torch.float64, torch.float32


def make_inputs(B=2, T=37, Hk=2, Hv=4, K=16, V=12, dtype=F64, seed=0, with_state=True, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    q = F.normalize(rn(B, T, Hk, K), dim=-1)
    k = F.normalize(rn(B, T, Hk, K), dim=-1)
    v = rn(B, T, Hv, V)
    g = F.logsigmoid(rn(B, T, Hv) + 2.0)  # decays in roughly (0.5, 1): strong enough to matter
    beta = torch.sigmoid(rn(B, T, Hv))
    h0 = rn(B, Hv, K, V) if with_state else None
    out = [x.to(dtype) for x in (q, k, v, g, beta)] + [None if h0 is None else h0.to(F64 if dtype == F64 else F32)]
    if requires_grad:
        for x in out:
            if x is not None:
                x.requires_grad_(True)
    return out


def run(fn, inputs, **kw):
    q, k, v, g, beta, h0 = inputs
    return fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)


def maxdiff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------- the spec itself


def test_naive_single_token_closed_form():
    # T=1 from a zero state: S = beta k v^T, o = S^T (scale q) = beta * scale * (q.k) * v
    q, k, v, g, beta, _ = make_inputs(B=1, T=1, Hk=1, Hv=1, K=5, V=3, with_state=False)
    o, S = naive_gated_delta_rule(q, k, v, g, beta, scale=0.7, output_final_state=True)
    qk = (q[0, 0, 0] * k[0, 0, 0]).sum()
    torch.testing.assert_close(o[0, 0, 0], beta[0, 0, 0] * 0.7 * qk * v[0, 0, 0], rtol=0, atol=1e-14)
    torch.testing.assert_close(S[0, 0], beta[0, 0, 0] * torch.outer(k[0, 0, 0], v[0, 0, 0]), rtol=0, atol=1e-14)


def test_naive_two_token_closed_form_uses_decay():
    # S_2 = e^{g2} S_1 (I - b2 k2 k2^T) + b2 k2 v2^T with S_1 = h0 e^{g1}(I - b1 k1 k1^T) + b1 k1 v1^T
    q, k, v, g, beta, h0 = make_inputs(B=1, T=2, Hk=1, Hv=1, K=4, V=3)
    _, S = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    eye = torch.eye(4, dtype=F64)
    Sx = h0[0, 0]
    for t in range(2):
        kt, vt, bt = k[0, t, 0], v[0, t, 0], beta[0, t, 0]
        Sx = g[0, t, 0].exp() * (eye - bt * torch.outer(kt, kt)) @ Sx + bt * torch.outer(kt, vt)
    torch.testing.assert_close(S[0, 0], Sx, rtol=0, atol=1e-13)


# ---------------------------------------------------------------- forward, float64 (tight)


@pytest.mark.parametrize("T,chunk", [(1, 16), (16, 16), (37, 16), (100, 64), (100, 16), (130, 64)])
@pytest.mark.parametrize("heads", [(2, 4), (3, 3)])
@pytest.mark.parametrize("with_state", [True, False])
def test_chunk_matches_naive_fp64(T, chunk, heads, with_state):
    inputs = make_inputs(T=T, Hk=heads[0], Hv=heads[1], with_state=with_state, seed=T + chunk)
    o_ref, s_ref = run(naive_gated_delta_rule, inputs)
    o, s = run(chunk_gated_delta_rule, inputs, chunk_size=chunk)
    assert o.shape == o_ref.shape == (2, T, heads[1], 12) and o.dtype == F64
    assert s.shape == (2, heads[1], 16, 12) and s.dtype == F64
    assert maxdiff(o, o_ref) < 1e-10
    assert maxdiff(s, s_ref) < 1e-10


@pytest.mark.parametrize("T", [1, 2, 37])
@pytest.mark.parametrize("with_state", [True, False])
def test_recurrent_matches_naive_fp64(T, with_state):
    inputs = make_inputs(T=T, with_state=with_state, seed=7 + T)
    o_ref, s_ref = run(naive_gated_delta_rule, inputs)
    o, s = run(recurrent_gated_delta_rule, inputs)
    assert maxdiff(o, o_ref) < 1e-12
    assert maxdiff(s, s_ref) < 1e-12


@pytest.mark.parametrize("T", [1, 2, 5, 9])
@pytest.mark.parametrize("heads", [(2, 4), (3, 3)])
@pytest.mark.parametrize("with_state", [True, False])
def test_all_states_closed_form_matches_recurrent_and_naive_fp64(T, heads, with_state):
    """The verify step's vectorized op: every per-token state and output equal the token loop and the spec."""
    q, k, v, g, beta, h0 = make_inputs(T=T, Hk=heads[0], Hv=heads[1], with_state=with_state, seed=60 + T)
    o, states = all_states_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    o_rec, states_rec = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_all_states=True)
    assert o.shape == (2, T, heads[1], 12) and states.shape == (2, T, heads[1], 16, 12)
    assert o.dtype == states.dtype == F64
    assert maxdiff(o, o_rec) <= 1e-10 and maxdiff(states, states_rec) <= 1e-10
    for t in range(T):  # the spec run on each prefix: its output at t and its final state
        o_ref, s_ref = naive_gated_delta_rule(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1], g[:, : t + 1],
                                              beta[:, : t + 1], initial_state=h0, output_final_state=True)
        assert maxdiff(o[:, t], o_ref[:, t]) <= 1e-10 and maxdiff(states[:, t], s_ref) <= 1e-10


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 9, 16])
def test_unit_lower_inverse_equals_the_inverse_fp64(T):
    """The matmul-only (I + A)^-1 of verify steps (capturable in a CUDA graph) against torch.linalg.inv."""
    A = torch.randn(3, 2, T, T, dtype=torch.float64, generator=torch.Generator().manual_seed(T)).tril(-1)
    want = torch.linalg.inv(A + torch.eye(T, dtype=torch.float64))
    assert (unit_lower_inverse(A) - want).abs().max().item() <= 1e-12 * want.abs().max().item()


def test_all_states_dtypes_and_dispatch(monkeypatch):
    """bfloat16 inputs: output in bfloat16, states in float32 (as the token loop); `gated_delta_net`'s all-states
    path is the closed form (no per-token loop) and agrees with the loop in float32."""
    from hybridize.ops import dispatch

    q, k, v, g, beta, h0 = make_inputs(T=5, dtype=torch.bfloat16, seed=3)
    o, states = all_states_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    assert o.dtype == torch.bfloat16 and states.dtype == F32
    called = []
    monkeypatch.setattr(dispatch, "recurrent_gated_delta_rule", lambda *a, **kw: called.append(1))
    gen = torch.Generator().manual_seed(0)
    B, T, Hk, Hv, K, V = 2, 5, 2, 4, 16, 8
    qr, kr = torch.randn(B, T, Hk, K, generator=gen), torch.randn(B, T, Hk, K, generator=gen)
    vr, a, b = torch.randn(B, T, Hv, V, generator=gen), torch.randn(B, T, Hv, generator=gen), torch.randn(
        B, T, Hv, generator=gen)
    A_log, dt_bias, h = torch.randn(Hv, generator=gen), torch.randn(Hv, generator=gen), torch.randn(
        B, Hv, K, V, generator=gen)
    o, states = dispatch.gated_delta_net(qr, kr, vr, a, b, A_log, dt_bias, initial_state=h, output_all_states=True)
    assert not called and states.shape == (B, T, Hv, K, V)
    o_rec, states_rec = recurrent_gated_delta_rule(
        dispatch.l2norm(qr), dispatch.l2norm(kr), vr, dispatch.gdn_decay(a, A_log, dt_bias), b.sigmoid(),
        initial_state=h, output_all_states=True)
    assert maxdiff(o, o_rec) < 1e-5 and maxdiff(states, states_rec) < 1e-5


def test_custom_scale_and_no_final_state():
    q, k, v, g, beta, h0 = make_inputs(T=20)
    o_ref, _ = naive_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0)
    o, s = chunk_gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0, chunk_size=8)
    assert s is None
    assert maxdiff(o, o_ref) < 1e-10
    o_default, _ = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0)
    assert maxdiff(o_default, o_ref) > 1e-3  # scale is actually used


# ---------------------------------------------------------------- the tests can fail


def test_decay_is_not_ignored():
    inputs = make_inputs(T=50)
    q, k, v, g, beta, h0 = inputs
    o_g0, s_g0 = naive_gated_delta_rule(q, k, v, torch.zeros_like(g), beta, initial_state=h0, output_final_state=True)
    o_ref, s_ref = run(naive_gated_delta_rule, inputs)
    assert maxdiff(o_ref, o_g0) > 1e-2 and maxdiff(s_ref, s_g0) > 1e-2
    for fn, kw in ((chunk_gated_delta_rule, {"chunk_size": 16}), (recurrent_gated_delta_rule, {})):
        o, s = run(fn, inputs, **kw)
        assert maxdiff(o, o_ref) < 1e-10
        assert maxdiff(o, o_g0) > 1e-2


def test_beta_and_delta_correction_matter():
    # beta=1 with a repeated key overwrites the memory: reading it back gives the latest value exactly
    B, Hk, Hv, K, V = 1, 1, 1, 8, 4
    k1 = F.normalize(torch.randn(1, 1, 1, K, dtype=F64), dim=-1)
    k = k1.expand(B, 3, Hk, K).contiguous()
    v = torch.randn(B, 3, Hv, V, dtype=F64)
    g = torch.zeros(B, 3, Hv, dtype=F64)
    beta = torch.ones(B, 3, Hv, dtype=F64)
    for fn in (naive_gated_delta_rule, recurrent_gated_delta_rule, chunk_gated_delta_rule):
        o, _ = fn(k, k, v, g, beta, scale=1.0)
        torch.testing.assert_close(o[0, -1, 0], v[0, -1, 0], rtol=0, atol=1e-12)


def test_gva_head_mapping_is_repeat_interleave():
    # value head j must read q/k head j // (Hv // Hk): equal to running with explicitly expanded q/k ...
    q, k, v, g, beta, h0 = make_inputs(T=24, Hk=2, Hv=6)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, chunk_size=8)
    qi, ki = q.repeat_interleave(3, dim=2), k.repeat_interleave(3, dim=2)
    o_exp, _ = naive_gated_delta_rule(qi, ki, v, g, beta, initial_state=h0)
    assert maxdiff(o, o_exp) < 1e-10
    # ... and different from the tiled mapping j % Hk
    qt, kt = q.repeat(1, 1, 3, 1), k.repeat(1, 1, 3, 1)
    o_tile, _ = naive_gated_delta_rule(qt, kt, v, g, beta, initial_state=h0)
    assert maxdiff(o, o_tile) > 1e-2


def test_matches_transformers_reference():
    qwen = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
    if fla_available():  # transformers then swaps its torch reference for fla's (CUDA-only) kernel
        pytest.skip("fla is installed: transformers' torch_chunk_gated_delta_rule is replaced by fla's kernel")
    inputs = make_inputs(T=70, seed=3)
    q, k, v, g, beta, h0 = inputs
    o_hf, s_hf = qwen.torch_chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=64, initial_state=h0.float(), output_final_state=True
    )
    o, s = run(chunk_gated_delta_rule, inputs)
    # transformers computes in float32
    assert maxdiff(o, o_hf) < 1e-4
    assert maxdiff(s, s_hf) < 1e-4


# ---------------------------------------------------------------- gradients


def _grads(fn, inputs, **kw):
    q, k, v, g, beta, h0 = inputs
    gen = torch.Generator().manual_seed(123)
    o, s = run(fn, inputs, **kw)
    wo = torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype)
    ws = torch.randn(s.shape, generator=gen, dtype=F64).to(s.dtype)
    loss = (o * wo).sum() + (s * ws).sum()
    return torch.autograd.grad(loss, [q, k, v, g, beta, h0])


NAMES = ["q", "k", "v", "g", "beta", "initial_state"]


@pytest.mark.parametrize("fn,kw", [(chunk_gated_delta_rule, {"chunk_size": 16}), (recurrent_gated_delta_rule, {})])
def test_gradients_match_naive_fp64(fn, kw):
    inputs = make_inputs(T=37, requires_grad=True, seed=11)
    ref = _grads(naive_gated_delta_rule, inputs)
    got = _grads(fn, inputs, **kw)
    for name, a, b in zip(NAMES, got, ref, strict=True):
        assert a.shape == b.shape
        assert maxdiff(a, b) < 1e-10, name
        assert b.abs().max() > 1e-3, name  # non-trivial gradient


def test_gradients_chunk_size_64_padded():
    inputs = make_inputs(T=100, Hk=2, Hv=4, requires_grad=True, seed=12)
    ref = _grads(naive_gated_delta_rule, inputs)
    got = _grads(chunk_gated_delta_rule, inputs, chunk_size=64)
    for name, a, b in zip(NAMES, got, ref, strict=True):
        assert maxdiff(a, b) < 1e-10, name


# ---------------------------------------------------------------- float32 (realistic)


@pytest.mark.parametrize("fn,kw", [(chunk_gated_delta_rule, {"chunk_size": 64}), (recurrent_gated_delta_rule, {})])
def test_float32_forward_and_backward(fn, kw):
    inputs32 = make_inputs(T=100, dtype=F32, requires_grad=True, seed=21)
    inputs64 = [x.detach().double().requires_grad_(True) for x in inputs32]
    o, s = run(fn, inputs32, **kw)
    assert o.dtype == F32 and s.dtype == F32
    o_ref, s_ref = run(naive_gated_delta_rule, inputs64)
    assert maxdiff(o, o_ref) < 1e-5
    assert maxdiff(s, s_ref) < 1e-5
    got = _grads(fn, inputs32, **kw)
    ref = _grads(naive_gated_delta_rule, inputs64)
    for name, a, b in zip(NAMES, got, ref, strict=True):
        assert a.dtype == F32
        assert maxdiff(a, b) < 1e-4 * max(1.0, b.abs().max().item()), name


def test_bfloat16_inputs_give_bf16_output_and_fp32_state():
    q, k, v, g, beta, h0 = make_inputs(T=40, dtype=torch.bfloat16, seed=5)
    for fn in (chunk_gated_delta_rule, recurrent_gated_delta_rule):
        o, s = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        assert o.dtype == torch.bfloat16 and s.dtype == F32
        o_ref, s_ref = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        assert maxdiff(o, o_ref) < 5e-2
        assert maxdiff(s, s_ref) < 1e-4  # the state never passes through bf16


# ---------------------------------------------------------------- prefill + decode


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (F32, 1e-5)])
def test_prefill_chunk_then_decode_recurrent(dtype, tol):
    T, T0 = 53, 41
    q, k, v, g, beta, h0 = make_inputs(T=T, dtype=dtype, seed=31)
    o_full, s_full = naive_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o1, s = chunk_gated_delta_rule(
        q[:, :T0], k[:, :T0], v[:, :T0], g[:, :T0], beta[:, :T0], initial_state=h0, output_final_state=True,
        chunk_size=16,
    )
    outs = [o1]
    for t in range(T0, T):
        sl = slice(t, t + 1)
        o_t, s = recurrent_gated_delta_rule(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state=s, output_final_state=True
        )
        outs.append(o_t)
    assert maxdiff(torch.cat(outs, dim=1), o_full) < tol
    assert maxdiff(s, s_full) < tol


def test_dispatch_cpu_uses_torch_paths(monkeypatch):
    assert isinstance(fla_available(), bool)
    monkeypatch.setenv("HYBRIDIZE_DISABLE_FLA", "1")
    for T in (1, 2, 3, 70):
        inputs = make_inputs(T=T, seed=40 + T)
        o_ref, s_ref = run(naive_gated_delta_rule, inputs)
        o, s = run(gated_delta_rule, inputs)
        assert maxdiff(o, o_ref) < 1e-10 and maxdiff(s, s_ref) < 1e-10


# ---------------------------------------------------------------- causal conv


def _conv_inputs(B=2, T=19, D=10, W=4, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=F64).to(dtype)
    w = torch.randn(D, W, generator=gen, dtype=F64).to(dtype)
    st = torch.randn(B, D, W - 1, generator=gen, dtype=F64).to(dtype)
    b = torch.randn(D, generator=gen, dtype=F64).to(dtype)
    return x, w, st, b


@pytest.mark.parametrize("W", [1, 2, 4])
@pytest.mark.parametrize("with_state", [True, False])
def test_conv_matches_naive(W, with_state):
    x, w, st, _ = _conv_inputs(W=W)
    st = st if with_state else None
    y, s = causal_conv1d(x, w, st, output_final_state=True)
    y_ref, s_ref = naive_causal_conv1d(x, w, st, output_final_state=True)
    assert y.shape == x.shape and s.shape == (2, 10, W - 1)
    assert maxdiff(y, y_ref) < 1e-12 and maxdiff(s, s_ref) == 0.0


def test_conv_hand_computed_and_orientation():
    # weight[:, -1] multiplies the current token, weight[:, 0] the oldest one
    x = torch.arange(1.0, 6.0, dtype=F64).view(1, 5, 1)
    w = torch.tensor([[1.0, 10.0, 100.0]], dtype=F64)
    y, s = causal_conv1d(x, w, output_final_state=True)
    pre = torch.tensor([100.0, 210.0, 321.0, 432.0, 543.0], dtype=F64)  # e.g. t=2: 1*1 + 10*2 + 100*3
    torch.testing.assert_close(y.view(-1), F.silu(pre))
    torch.testing.assert_close(s.view(-1), torch.tensor([4.0, 5.0], dtype=F64))


def test_conv_matches_torch_conv1d_module_and_bias():
    x, w, _, b = _conv_inputs(dtype=F32)
    conv = torch.nn.Conv1d(10, 10, 4, groups=10, padding=3, bias=True)
    with torch.no_grad():
        conv.weight.copy_(w.unsqueeze(1))
        conv.bias.copy_(b)
    ref = F.silu(conv(x.transpose(1, 2))[..., : x.shape[1]]).transpose(1, 2)
    y, _ = causal_conv1d(x, w.unsqueeze(1), bias=b)  # raw [D, 1, W] layout accepted too
    assert maxdiff(y, ref) < 1e-5


@pytest.mark.parametrize("split", [1, 2, 3, 10])
def test_conv_continuation_equals_full(split):
    x, w, st, _ = _conv_inputs(T=17)
    y_full, s_full = causal_conv1d(x, w, st, output_final_state=True)
    y1, s1 = causal_conv1d(x[:, :split], w, st, output_final_state=True)
    ys, s = [y1], s1
    for t in range(split, x.shape[1]):  # then token by token (decode)
        y_t, s = causal_conv1d(x[:, t : t + 1], w, s, output_final_state=True)
        ys.append(y_t)
    assert maxdiff(torch.cat(ys, dim=1), y_full) < 1e-12
    assert maxdiff(s, s_full) == 0.0
    y_nostate, _ = causal_conv1d(x[:, split:], w, None)
    assert maxdiff(y_nostate, y_full[:, split:]) > 1e-3  # the state is actually used


def test_conv_gradients_match_naive():
    x, w, st, b = (t.requires_grad_(True) for t in _conv_inputs(T=9))
    gw = torch.randn(2, 9, 10, dtype=F64)
    ga = torch.autograd.grad((causal_conv1d(x, w, st, bias=b)[0] * gw).sum(), [x, w, st, b])
    gb = torch.autograd.grad((naive_causal_conv1d(x, w, st, bias=b)[0] * gw).sum(), [x, w, st, b])
    for a, c in zip(ga, gb, strict=True):
        assert maxdiff(a, c) < 1e-12


def test_cuda_without_fla_says_why_once(monkeypatch, capsys):
    """On a CUDA device without importable fla, one stderr line names the reason and the slower path."""
    from hybridize.ops import dispatch

    monkeypatch.setattr(dispatch, "_fla", lambda: "ImportError: libz3.so: cannot open shared object file")
    monkeypatch.delenv("HYBRIDIZE_DISABLE_FLA", raising=False)
    dispatch._say_once_why_not.cache_clear()
    dispatch.note_if_slow_path(torch.device("cuda"))
    dispatch.note_if_slow_path(torch.device("cuda"))
    dispatch.note_if_slow_path(torch.device("cpu"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "libz3" in err[0] and "PyTorch reference path" in err[0]
    assert dispatch.fla_status().startswith("unavailable (ImportError: libz3")
    dispatch._say_once_why_not.cache_clear()
