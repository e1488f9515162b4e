"""Weight transfer: against transformers' own Qwen3 / Llama classes, gate strategies, init, streamed folder output."""

import json

import pytest
import torch
from conftest import load_tiny_source
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hybridize import (
    CrossArchTransferConfig,
    HybridAttentionConfig,
    HybridForCausalLM,
    create_full_hybrid_model,
    create_hybrid_from_qwen3,
)
from hybridize.transfer.convert import convert_to_folder

ALL_ATTENTION = HybridAttentionConfig(deltanet_layer_pattern=[])


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_all_attention_reproduces_source_exactly(tiny_source_dir):
    """Qwen3 / Llama, tied / untied, GQA: the strongest check that every tensor went to the right place."""
    source = load_tiny_source(tiny_source_dir)
    hybrid = create_hybrid_from_qwen3(tiny_source_dir, ALL_ATTENTION)
    ids = torch.randint(0, 128, (2, 24))
    assert (logits(hybrid, ids) - logits(source, ids)).abs().max() <= 1e-4
    assert hybrid.get_layer_stats() == {"deltanet_layers": 0, "gated_attention_layers": 4, "total_layers": 4}


@pytest.mark.parametrize("tiny_qwen3_dir", [{"num_hidden_layers": 3, "rope_parameters": {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64}}], indirect=True)
def test_rope_scaling_is_carried_over(tiny_qwen3_dir):
    source = load_tiny_source(tiny_qwen3_dir)
    hybrid = create_hybrid_from_qwen3(tiny_qwen3_dir, ALL_ATTENTION)
    assert hybrid.config.rope_parameters["rope_type"] == "llama3"
    ids = torch.randint(0, 128, (1, 200))  # past original_max_position_embeddings
    assert (logits(hybrid, ids) - logits(source, ids)).abs().max() <= 1e-4


def test_attention_layers_of_a_hybrid_equal_the_source_layers(tiny_qwen3_dir):
    """With DeltaNet layers present, each kept attention layer still computes exactly the source layer."""
    source = load_tiny_source(tiny_qwen3_dir)
    hybrid = create_hybrid_from_qwen3(tiny_qwen3_dir)  # default 3:1: layer 3 is attention
    assert hybrid.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    x = torch.randn(2, 10, 64)
    pos = torch.arange(10)[None].expand(2, 10)
    with torch.no_grad():
        ref = source.model.layers[3](x, position_embeddings=source.model.rotary_emb(x, pos), attention_mask=None)
        ours = hybrid.model.layers[3](x, hybrid.model.rotary_emb(x, pos))
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert (ours - ref).abs().max() <= 1e-5


def test_fresh_deltanet_layers_are_no_ops(tiny_qwen3_dir):
    """in_proj_z = 0 makes each DeltaNet mixer output exactly zero: the block is then the source's MLP alone."""
    hybrid = create_hybrid_from_qwen3(tiny_qwen3_dir)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert hybrid.model.layers[0].linear_attn(x).abs().max() == 0


def test_gate_strategies(tiny_qwen3_dir):
    attn_only = HybridAttentionConfig(deltanet_layer_pattern=[])
    ones, zero, small = (
        create_hybrid_from_qwen3(tiny_qwen3_dir, CrossArchTransferConfig(hybrid_attention=attn_only,
                                                                         gate_init_strategy=s))
        for s in ("ones", "zero", "small")
    )
    x = torch.randn(1, 7, 64)
    pe = ones.model.rotary_emb(x, torch.arange(7)[None])
    with torch.no_grad():
        y1, y0, ys = (m.model.layers[1].self_attn(x, pe) for m in (ones, zero, small))
    assert (y0 - 0.5 * y1).abs().max() <= 1e-6  # "zero": no compensation -> attention output halved
    assert 0 < (ys - y1).abs().max() < 0.2 * y1.abs().max()  # "small": near "ones", not equal
    q_rows = small.model.layers[1].self_attn.q_proj.weight.view(4, 2, 16, 64)
    assert q_rows[:, 1].std().item() == pytest.approx(0.01, rel=0.3)  # gate rows ~ N(0, 0.01²)
    with pytest.raises(Exception, match="gate_init_strategy"):
        CrossArchTransferConfig(gate_init_strategy="twice")


def test_deltanet_takes_the_source_projections(tiny_qwen3_dir):
    """q rows (q_norm folded), k/v repeated 2 -> 4 heads, o_proj -> out_proj, identity conv."""
    source = load_tiny_source(tiny_qwen3_dir)
    hybrid = create_hybrid_from_qwen3(tiny_qwen3_dir)
    s, h = source.model.layers[0].self_attn, hybrid.model.layers[0].linear_attn
    qkv = h.in_proj_qkv.weight.view(3, 4, 16, 64)
    assert torch.allclose(qkv[0], s.q_proj.weight.view(4, 16, 64) * s.q_norm.weight[None, :, None])
    k = s.k_proj.weight.view(2, 16, 64) * s.k_norm.weight[None, :, None]
    assert torch.allclose(qkv[1], k.repeat_interleave(2, dim=0))
    assert torch.equal(qkv[2], s.v_proj.weight.view(2, 16, 64).repeat_interleave(2, dim=0))
    assert torch.equal(h.out_proj.weight, s.o_proj.weight)
    assert torch.equal(h.conv1d.weight[:, 0, -1], torch.ones(h.conv_dim))
    assert h.conv1d.weight[:, 0, :-1].abs().sum() == 0
    assert (h.A_log.exp() >= 1).all() and (h.A_log.exp() <= 16).all()


def test_explicit_attention_layers_override_the_pattern(tiny_qwen3_dir):
    cfg = HybridAttentionConfig(deltanet_layer_pattern=[0, 1, 2], pattern_period=4, attention_layers=[0, 2])
    hybrid = create_hybrid_from_qwen3(tiny_qwen3_dir, cfg)
    assert hybrid.config.layer_types == ["full_attention", "linear_attention", "full_attention", "linear_attention"]


def test_folder_conversion_equals_in_memory_and_loads_everywhere(tiny_qwen3_tied_dir, tmp_path):
    out = tmp_path / "hybrid"
    summary = convert_to_folder(str(tiny_qwen3_tied_dir), out, progress=False, max_shard_bytes=40_000)
    assert summary["layer_stats"]["deltanet_layers"] == 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    written = {}
    for shard in set(index["weight_map"].values()):
        written.update(load_file(out / shard))  # the safetensors library reads our streamed shards
    ref = create_hybrid_from_qwen3(tiny_qwen3_tied_dir)
    ref_sd = ref.state_dict()
    assert written.keys() == set(ref_sd) - {"lm_head.weight"}
    assert all(torch.equal(written[k], ref_sd[k]) for k in written)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, HybridForCausalLM)
    ids = torch.randint(0, 128, (1, 11))
    assert torch.equal(logits(loaded, ids), logits(ref, ids))
    assert not any(p.name.startswith(".hybrid") for p in tmp_path.iterdir())  # no temporary folder left


def test_dtype_and_full_model_entry_point(tiny_llama_dir):
    model = create_full_hybrid_model(CrossArchTransferConfig(source_model=str(tiny_llama_dir)), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.config.attention_qk_norm is False
    assert model.model.layers[3].self_attn.q_norm is None


def test_incomplete_source_is_refused_before_writing(tiny_qwen3_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from hybridize import HybridizeError

    weights = load_file(tiny_qwen3_dir / "model.safetensors")
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, tiny_qwen3_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(HybridizeError, match="lacks tensors the conversion needs: model.layers.2.mlp.up_proj"):
        convert_to_folder(str(tiny_qwen3_dir), out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
