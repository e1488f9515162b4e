"""`hybridize bench` (inference) and `bench --train` on the CPU, tiny shape: rows, ratios, cache bytes, FLOPs."""

from __future__ import annotations

import json

import pytest

from hybridize.bench.common import build
from hybridize.bench.shapes import hybrid_config, source_config
from hybridize.bench.train import forward_flops_per_token
from hybridize.cli import main


def test_forward_flops_count_matmuls_attention_and_deltanet():
    import torch

    model = build("hybrid", "tiny", torch.float32, torch.device("cpu"))
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
    source = build("source", "tiny", torch.float32, torch.device("cpu"))
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
    assert report["sharding"] == "fsdp" and {r["sharding"] for r in rows} == {"fsdp"}  # the default
    hybrid, source = rows[0], rows[1]
    assert hybrid["speed_vs_source"] == pytest.approx(hybrid["tokens_per_s"] / source["tokens_per_s"], rel=1e-2)
    # checkpointing recomputes, it does not change the training: same losses with and without
    assert rows[2]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    table = capsys.readouterr().out
    assert "hybrid" in table and "× source" in table


def test_bench_train_times_either_layout_and_records_it(tmp_path, capsys):
    """`--sharding fsdp|none` time the same step (the same loss) and the report says which layout ran."""
    losses = {}
    for sharding in ("fsdp", "none"):
        out = tmp_path / f"{sharding}.json"
        assert main(["bench", "--train", "--shape", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "1",
                     "--warmup", "1", "--checkpointing", "off", "--against", "none", "--sharding", sharding,
                     "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["sharding"] == sharding and report["results"][0]["sharding"] == sharding
        losses[sharding] = report["results"][0]["loss"]
        assert f"sharding {sharding}" in capsys.readouterr().out
    assert losses["none"] == pytest.approx(losses["fsdp"], rel=1e-5)


def _kv_bytes(layers: int, cfg, length: int, batch: int = 1) -> int:
    return layers * 2 * batch * cfg.num_key_value_heads * length * cfg.head_dim * 4


def test_bench_infer_tiny_rows_ratios_and_cache_bytes(tmp_path, capsys):
    out = tmp_path / "infer.json"
    assert main(["bench", "--shape", "tiny", "--prefill-lengths", "48,96", "--decode-batches", "1,3",
                 "--decode-contexts", "40", "--new-tokens", "3", "--repeats", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    hybrid, source = report["results"]["hybrid"], report["results"]["source"]
    cfg, (src_cfg, _) = hybrid_config("tiny"), source_config("tiny")
    n_attn = cfg.layer_types.count("full_attention")
    n_lin = cfg.num_hidden_layers - n_attn
    conv_dim = 2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim + cfg.linear_num_value_heads * \
        cfg.linear_value_head_dim
    states = n_lin * (conv_dim * (cfg.linear_conv_kernel_dim - 1)
                      + cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim) * 4
    for row_h, row_s, length in zip(hybrid["prefill"], source["prefill"], (48, 96), strict=True):
        assert row_h["tokens_per_s"] == pytest.approx(length / row_h["seconds"], rel=0.01)
        assert row_h["speed_vs_source"] == pytest.approx(row_h["tokens_per_s"] / row_s["tokens_per_s"], rel=0.01)
        # the cache after the prompt: KV of the attention layers + fixed DeltaNet states, against KV of every layer
        assert row_h["cache_bytes"] == _kv_bytes(n_attn, cfg, length) + states
        assert row_s["cache_bytes"] == _kv_bytes(src_cfg.num_hidden_layers, cfg, length)
        assert row_h["cache_vs_source"] == pytest.approx(row_h["cache_bytes"] / row_s["cache_bytes"], abs=1e-3)
    assert [(r["batch"], r["context"]) for r in hybrid["decode"]] == [(1, 40), (3, 40)]
    for row in hybrid["decode"]:
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * 3 / (row["ms_per_step"] * 3 / 1e3), rel=0.02)
        assert 0 < row["tokens_per_s"] < row["roofline_tokens_per_s"]
        # decoded on the static cache (max_cache_len = 40 + 3 + 2), the dynamic cache timed alongside
        assert row["cache"] == "static" and row["dynamic_tokens_per_s"] > 0
        kv = _kv_bytes(n_attn, cfg, 45, row["batch"])
        assert row["cache_gb"] == pytest.approx((kv + row["batch"] * states + row["batch"] * 45) / 1e9, abs=1e-4)
    table = capsys.readouterr().out
    assert "prefill" in table and "roofline" in table and "× source" in table


def test_bench_infer_tiny_verify_rows(tmp_path, capsys):
    """`--verify-tokens 2,5`: per decode batch (first context), the T-token verify step's ms against the one-token
    step's on the same static cache, in the JSON and the table."""
    out = tmp_path / "verify.json"
    assert main(["bench", "--shape", "tiny", "--prefill-lengths", "16", "--decode-batches", "1,2", "--decode-contexts",
                 "24,32", "--new-tokens", "3", "--repeats", "1", "--against", "none", "--no-dynamic",
                 "--verify-tokens", "2,5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["verify_tokens"] == [2, 5]
    rows = report["results"]["hybrid"]["verify"]
    assert [(r["batch"], r["context"], r["tokens"]) for r in rows] == [(1, 24, 2), (1, 24, 5), (2, 24, 2), (2, 24, 5)]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["one_token_ms"] > 0 and r["rollback_ms"] > 0
        assert r["vs_one_token"] == pytest.approx(r["ms_per_step"] / r["one_token_ms"], rel=0.01)
    table = capsys.readouterr().out
    assert "verify step" in table and "× 1-token" in table


def test_largest_decode_batch_predicts_then_probes_down():
    """The search reads the limit off two probes (peak memory linear in the batch) and steps down 10 % at a time when
    the prediction does not fit (here activations grow faster than linear past batch 40)."""
    from hybridize.bench.infer import InferBenchConfig, largest_decode_batch

    probed = []

    def peak(model, batch, context, cfg, device):
        probed.append(batch)
        if batch > 40:
            return None  # out of memory
        return 10_000 + 1_000 * batch

    capacity = 100_000  # linear prediction: (98,000 - 11,000) // 1,000 + 1 = 88 rows
    batch = largest_decode_batch(None, 1024, InferBenchConfig(shape="tiny"), "cpu", capacity=capacity, peak=peak)
    assert probed == [1, 2, 88, 79, 71, 63, 56, 50, 45, 40] and batch == 40 and batch <= 40 < int(batch / 0.9) + 1
    assert largest_decode_batch(None, 1024, None, "cpu", capacity, lambda *a: None) == 0  # not even one row
    fits_one = largest_decode_batch(None, 1024, None, "cpu", capacity, lambda m, b, *a: 5 if b == 1 else None)
    assert fits_one == 1
    linear = largest_decode_batch(None, 1024, None, "cpu", capacity, lambda m, b, *a: 10_000 + 1_000 * b)
    assert linear == 88  # the prediction fits: no further probes


def test_bench_infer_json_keeps_the_rows_of_a_run_cut_short(tmp_path, monkeypatch):
    """--json is rewritten after every row: a run interrupted in its second decode row leaves a readable report
    with the prefill rows and the first decode row, marked incomplete; a finished run is marked complete."""
    from hybridize.bench import infer

    real, calls = infer.measure_decode, []

    def stop_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what SIGTERM from a time limit becomes in the CLI
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "measure_decode", stop_on_second)
    out = tmp_path / "cut.json"
    args = ["bench", "--shape", "tiny", "--prefill-lengths", "16,24", "--decode-batches", "1,2", "--decode-contexts",
            "16", "--new-tokens", "2", "--repeats", "1", "--against", "none", "--no-dynamic", "--json", str(out)]
    assert main(args) != 0
    report = json.loads(out.read_text())
    hybrid = report["results"]["hybrid"]
    assert report["complete"] is False
    assert [r["length"] for r in hybrid["prefill"]] == [16, 24]
    assert all(r["tokens_per_s"] > 0 for r in hybrid["prefill"])
    assert [r["batch"] for r in hybrid["decode"]] == [1]
    assert not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(infer, "measure_decode", real)
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and [r["batch"] for r in report["results"]["hybrid"]["decode"]] == [1, 2]


def test_bench_a_model_folder_against_its_source(tmp_path, capsys):
    """`hybridize bench MODEL --against SOURCE` times a converted model's real weights next to the source it came
    from (transformers' class, its own cache); MODEL alone times the hybrid only; misuse is a one-line error."""
    from conftest import build_tiny_source

    source = build_tiny_source(tmp_path / "source", family="qwen3")
    model = tmp_path / "hybrid"
    assert main(["convert", str(source), str(model)]) == 0
    out = tmp_path / "model.json"
    small = ["--prefill-lengths", "24", "--decode-batches", "2", "--decode-contexts", "16", "--new-tokens", "2",
             "--repeats", "1", "--no-dynamic"]
    assert main(["bench", str(model), "--against", str(source), *small, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    hybrid, src = report["results"]["hybrid"], report["results"]["source"]
    assert report["config"]["model"] == str(model) and report["complete"]
    cfg = json.loads((model / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    n_attn = sum(t == "full_attention" for t in cfg["layer_types"])
    kv = lambda n: 2 * n * cfg["num_key_value_heads"] * cfg["head_dim"] * 24 * 4  # noqa: E731 (K and V, fp32)
    assert src["prefill"][0]["cache_bytes"] == kv(layers)  # the source's DynamicCache: every layer's KV
    assert hybrid["prefill"][0]["cache_bytes"] > kv(n_attn)  # + the DeltaNet states
    assert hybrid["prefill"][0]["speed_vs_source"] == pytest.approx(
        hybrid["prefill"][0]["tokens_per_s"] / src["prefill"][0]["tokens_per_s"], rel=0.01)
    assert "model " + str(model) in capsys.readouterr().out
    assert main(["bench", str(model), *small, "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())["results"]) == ["hybrid"]
    assert "--against SOURCE" in capsys.readouterr().err
    for argv, needle in (([str(source), *small], "not a hybridize model folder"),
                         (["--shape", "tiny", "--against", str(source)], "needs MODEL"),
                         (["--train", str(model)], "MODEL and --against SOURCE are for the inference")):
        assert main(["bench", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
