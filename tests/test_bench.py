"""`hybridize bench --train` on the CPU with the tiny shape: the report's rows, ratios and FLOP counts."""

from __future__ import annotations

import json

import pytest

from hybridize.bench.shapes import hybrid_config, source_config
from hybridize.bench.train import _build, forward_flops_per_token
from hybridize.cli import main


def test_forward_flops_count_matmuls_attention_and_deltanet():
    import torch

    model = _build("hybrid", "tiny", torch.float32, torch.device("cpu"))
    cfg = hybrid_config("tiny")
    D, V, F, H, d = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.head_dim
    Hkv = cfg.num_key_value_heads
    attn_params = D * 2 * H * d + 2 * D * Hkv * d + H * d * D
    dk, dv, Hv = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_num_value_heads
    delta_params = D * (2 * H * dk + Hv * dv) + D * Hv * dv + 2 * D * Hv + Hv * dv * D
    n_attn = cfg.layer_types.count("full_attention")
    n_delta = cfg.num_hidden_layers - n_attn
    T = 512
    expected = 2 * (n_attn * attn_params + n_delta * delta_params + cfg.num_hidden_layers * 3 * D * F + D * V)
    expected += n_attn * 2 * H * d * T + n_delta * Hv * (4 * dk * dv + 2 * 64 * (dk + dv))
    assert forward_flops_per_token(model, T) == pytest.approx(expected)
    source = _build("source", "tiny", torch.float32, torch.device("cpu"))
    src_cfg, _ = source_config("tiny")
    assert forward_flops_per_token(source, T) > 2 * D * V  # all layers attention


def test_bench_train_tiny_writes_a_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--train", "--shape", "tiny", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "2",
                 "--steps", "2", "--warmup", "1", "--checkpointing", "both", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    rows = report["results"]
    assert [(r["student"], r["checkpointing"]) for r in rows] == [
        ("hybrid", False), ("source", False), ("hybrid", True), ("source", True)]
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(64 / r["step_s"], rel=0.02)
        assert r["loss"] is not None and r["loss"] > 0
    hybrid, source = rows[0], rows[1]
    assert hybrid["speed_vs_source"] == pytest.approx(hybrid["tokens_per_s"] / source["tokens_per_s"], rel=1e-2)
    # checkpointing recomputes, it does not change the training: same losses with and without
    assert rows[2]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    table = capsys.readouterr().out
    assert "hybrid" in table and "× source" in table


def test_bench_without_train_flag_is_a_one_line_error(capsys):
    assert main(["bench", "--shape", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train" in err[0]
