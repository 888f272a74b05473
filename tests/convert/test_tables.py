"""Unit tests of the conversion tables against hand-built tensors (no megatron needed)."""

from __future__ import annotations

import pytest
import torch

from asyncsync.convert import FAMILIES, REPLICATED, ModelDims, Rule, conversion_table
from asyncsync.convert._common import QKV, rule
from asyncsync.errors import ConfigError, ConversionError

# 4 query heads in 2 groups, head_dim 3, hidden 5, vocabulary 10 padded to 12, 16 layers.
DIMS = ModelDims(
    num_attention_heads=4, num_query_groups=2, head_dim=3, vocab_size=10, num_layers=16
)
HIDDEN = 5


def _heads(tag: float, n: int) -> torch.Tensor:
    """``n`` heads of [head_dim, hidden] whose values encode (tag, head, row, col)."""
    h = torch.arange(n).view(n, 1, 1) * 100.0
    r = torch.arange(DIMS.head_dim).view(1, -1, 1) * 10.0
    c = torch.arange(HIDDEN).view(1, 1, -1) * 1.0
    return tag * 1000.0 + h + r + c


def _qkv_parts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF q/k/v weights and the Megatron fused weight built from them by hand."""
    q = _heads(1, 4)  # heads 0,1 belong to group 0; heads 2,3 to group 1
    k = _heads(2, 2)
    v = _heads(3, 2)
    fused = torch.cat([torch.cat([q[2 * g], q[2 * g + 1], k[g], v[g]]) for g in range(2)])
    flat = [x.reshape(-1, HIDDEN) for x in (q, k, v)]
    return flat[0], flat[1], flat[2], fused


def test_every_family_is_registered_by_its_model_type() -> None:
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"}
    for name, table in FAMILIES.items():
        assert table.family == name
        assert conversion_table(name) is table


def test_unknown_family_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"'gpt_oss'.*known: \['llama'"):
        conversion_table("gpt_oss")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unknown_parameter_names_the_parameter_and_the_family(family: str) -> None:
    table = conversion_table(family)
    name = "decoder.layers.3.self_attention.linear_qkv.lora_a.weight"
    with pytest.raises(ConversionError) as info:
        table.convert(name, [torch.zeros(2, 2)], DIMS)
    assert name in str(info.value)
    assert repr(family) in str(info.value)
    assert isinstance(info.value, LookupError) and not isinstance(info.value, KeyError)


def test_a_parameter_of_another_family_is_unknown() -> None:
    with pytest.raises(ConversionError, match=r"q_layernorm.*'llama'"):
        conversion_table("llama").lookup("decoder.layers.0.self_attention.q_layernorm.weight")
    with pytest.raises(ConversionError, match=r"linear_qkv\.bias.*'qwen3'"):
        conversion_table("qwen3").lookup("decoder.layers.0.self_attention.linear_qkv.bias")


def test_qkv_split_at_tp1() -> None:
    q, k, v = _qkv_parts()[:3]
    fused = _qkv_parts()[3]
    out = dict(
        conversion_table("llama").convert(
            "decoder.layers.12.self_attention.linear_qkv.weight", [fused], DIMS
        )
    )
    assert list(out) == [
        "model.layers.12.self_attn.q_proj.weight",
        "model.layers.12.self_attn.k_proj.weight",
        "model.layers.12.self_attn.v_proj.weight",
    ]
    assert torch.equal(out["model.layers.12.self_attn.q_proj.weight"], q)
    assert torch.equal(out["model.layers.12.self_attn.k_proj.weight"], k)
    assert torch.equal(out["model.layers.12.self_attn.v_proj.weight"], v)


def test_qkv_split_per_tp2_shard() -> None:
    q, k, v, fused = _qkv_parts()
    # TP rank r holds query group r: rows of one group each.
    shards = list(fused.chunk(2))
    out = conversion_table("qwen3").convert(
        "decoder.layers.0.self_attention.linear_qkv.weight", shards, DIMS
    )
    got = [t for _, t in out]
    assert torch.equal(got[0], q) and torch.equal(got[1], k) and torch.equal(got[2], v)


def test_qkv_bias_splits_like_the_weight_rows() -> None:
    q, k, v, fused = _qkv_parts()
    bias_shards = [s[:, 0].clone() for s in fused.chunk(2)]  # one value per fused row
    out = dict(
        conversion_table("qwen2").convert(
            "decoder.layers.1.self_attention.linear_qkv.bias", bias_shards, DIMS
        )
    )
    assert torch.equal(out["model.layers.1.self_attn.q_proj.bias"], q[:, 0])
    assert torch.equal(out["model.layers.1.self_attn.k_proj.bias"], k[:, 0])
    assert torch.equal(out["model.layers.1.self_attn.v_proj.bias"], v[:, 0])


def test_qkv_shape_mismatch_names_the_parameter() -> None:
    with pytest.raises(ConversionError, match=r"linear_qkv.weight: shard has 7 rows"):
        conversion_table("llama").convert(
            "decoder.layers.0.self_attention.linear_qkv.weight", [torch.zeros(7, 5)], DIMS
        )


def test_gate_up_split_at_tp1() -> None:
    gate, up = torch.randn(6, HIDDEN), torch.randn(6, HIDDEN)
    out = dict(
        conversion_table("llama").convert(
            "decoder.layers.0.mlp.linear_fc1.weight", [torch.cat([gate, up])], DIMS
        )
    )
    assert torch.equal(out["model.layers.0.mlp.gate_proj.weight"], gate)
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], up)


def test_gate_up_split_per_tp2_shard_then_concatenated() -> None:
    gate, up = torch.randn(6, HIDDEN), torch.randn(6, HIDDEN)
    # Megatron's TP rank r holds [gate rows of r; up rows of r].
    shards = [torch.cat([gate[:3], up[:3]]), torch.cat([gate[3:], up[3:]])]
    out = dict(
        conversion_table("llama").convert("decoder.layers.0.mlp.linear_fc1.weight", shards, DIMS)
    )
    assert torch.equal(out["model.layers.0.mlp.gate_proj.weight"], gate)
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], up)
    # Concatenating first and splitting after would be wrong: the per-shard split prevents it.
    naive_gate = torch.cat(shards).chunk(2)[0]
    assert not torch.equal(naive_gate, gate)


def test_row_parallel_shards_join_on_the_input_dim() -> None:
    w = torch.randn(HIDDEN, 8)
    out = conversion_table("llama").convert(
        "decoder.layers.0.self_attention.linear_proj.weight", list(w.chunk(2, dim=1)), DIMS
    )
    assert out[0][0] == "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(out[0][1], w)


def test_vocab_padding_is_dropped_after_joining_shards() -> None:
    padded = torch.randn(12, HIDDEN)
    for name, hf in (
        ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        ("output_layer.weight", "lm_head.weight"),
    ):
        ((got_name, got),) = conversion_table("qwen3").convert(name, list(padded.chunk(2)), DIMS)
        assert got_name == hf
        assert torch.equal(got, padded[:10])
    with pytest.raises(ConversionError, match="fewer than vocab_size=10"):
        conversion_table("qwen3").convert("output_layer.weight", [torch.zeros(8, HIDDEN)], DIMS)


def test_replicated_parameters_take_one_copy() -> None:
    norm = torch.randn(3)
    ((name, got),) = conversion_table("qwen3").convert(
        "decoder.layers.0.self_attention.k_layernorm.weight", [norm, norm.clone()], DIMS
    )
    assert name == "model.layers.0.self_attn.k_norm.weight"
    assert torch.equal(got, norm)


def test_transformer_engine_fused_norm_names_map_to_the_hf_norms() -> None:
    table = conversion_table("llama")
    assert (
        table.convert(
            "decoder.layers.2.self_attention.linear_qkv.layer_norm_weight", [torch.ones(5)], DIMS
        )[0][0]
        == "model.layers.2.input_layernorm.weight"
    )
    assert (
        table.convert("decoder.layers.2.mlp.linear_fc1.layer_norm_weight", [torch.ones(5)], DIMS)[
            0
        ][0]
        == "model.layers.2.post_attention_layernorm.weight"
    )


@pytest.mark.parametrize(
    ("family", "router", "gate", "up", "down"),
    [
        (
            "qwen3_moe",
            "mlp.gate",
            "mlp.experts.7.gate_proj",
            "mlp.experts.7.up_proj",
            "mlp.experts.7.down_proj",
        ),
        (
            "mixtral",
            "block_sparse_moe.gate",
            "block_sparse_moe.experts.7.w1",
            "block_sparse_moe.experts.7.w3",
            "block_sparse_moe.experts.7.w2",
        ),
    ],
)
def test_expert_and_router_names(family: str, router: str, gate: str, up: str, down: str) -> None:
    table = conversion_table(family)
    fc1 = [torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)]
    for fc1_name, fc2_name in (
        (
            "decoder.layers.1.mlp.experts.local_experts.7.linear_fc1.weight",
            "decoder.layers.1.mlp.experts.local_experts.7.linear_fc2.weight",
        ),
        (
            "decoder.layers.1.mlp.experts.linear_fc1.weight7",
            "decoder.layers.1.mlp.experts.linear_fc2.weight7",
        ),
    ):
        out = dict(table.convert(fc1_name, fc1, DIMS))
        assert torch.equal(
            out[f"model.layers.1.{gate}.weight"], torch.cat([fc1[0][:2], fc1[1][:2]])
        )
        assert torch.equal(out[f"model.layers.1.{up}.weight"], torch.cat([fc1[0][2:], fc1[1][2:]]))
        assert (
            table.convert(fc2_name, [torch.randn(HIDDEN, 2)], DIMS)[0][0]
            == f"model.layers.1.{down}.weight"
        )
        assert table.lookup(fc1_name)[0].expert
    router_rule, _ = table.lookup("decoder.layers.1.mlp.router.weight")
    assert not router_rule.expert
    assert (
        table.convert("decoder.layers.1.mlp.router.weight", [torch.randn(8, HIDDEN)], DIMS)[0][0]
        == f"model.layers.1.{router}.weight"
    )


def test_to_hf_converts_a_state_dict_of_tensors_and_shard_lists() -> None:
    _, k, _, fused = _qkv_parts()
    dims = ModelDims(
        num_attention_heads=4, num_query_groups=2, head_dim=3, vocab_size=10, num_layers=1
    )
    state: dict[str, object] = {
        "embedding.word_embeddings.weight": torch.randn(12, HIDDEN),
        "decoder.layers.0.input_layernorm.weight": torch.ones(HIDDEN),
        "decoder.layers.0.self_attention.linear_qkv.weight": list(fused.chunk(2)),
        "decoder.layers.0.self_attention.linear_qkv._extra_state": None,
        "decoder.layers.0.self_attention.linear_proj.weight": torch.randn(HIDDEN, 12),
        "decoder.layers.0.pre_mlp_layernorm.weight": torch.ones(HIDDEN),
        "decoder.layers.0.mlp.linear_fc1.weight": torch.randn(8, HIDDEN),
        "decoder.layers.0.mlp.linear_fc2.weight": torch.randn(HIDDEN, 4),
        "decoder.final_layernorm.weight": torch.ones(HIDDEN),
    }
    table = conversion_table("llama")
    out = table.to_hf(state, dims, tied=True)
    # Tied embeddings: no output_layer.weight in, no lm_head.weight out.
    assert sorted(out) == sorted(table.hf_names(dims, tied=True))
    assert "lm_head.weight" not in out
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], k)
    with pytest.raises(ConversionError, match="final_layernorm"):
        table.to_hf({**state, "decoder.final_layernorm.weight": 3}, dims, tied=True)


def test_conversion_does_not_track_gradients() -> None:
    w = torch.randn(12, HIDDEN, requires_grad=True)
    ((_, out),) = conversion_table("llama").convert("output_layer.weight", [w], DIMS)
    assert not out.requires_grad


def test_rule_targets_may_only_use_placeholders_of_the_source() -> None:
    with pytest.raises(ConfigError, match="placeholder"):
        rule("output_layer.weight", "model.layers.{L}.x", REPLICATED, "head")
    assert isinstance(rule("a.{L}.b", ("x.{L}", "y.{L}", "z.{L}"), QKV), Rule)


def test_rule_targets_must_match_the_layout_and_a_layerless_rule_names_its_part() -> None:
    with pytest.raises(ConfigError, match=r"'a\.\{L\}\.b'.*3 tensors.*1 targets"):
        rule("a.{L}.b", "x.{L}", QKV)
    with pytest.raises(ConfigError, match=r"'final\.weight'.*part=None"):
        rule("final.weight", "norm.weight", REPLICATED)
    with pytest.raises(ConfigError, match=r"part='head'"):
        rule("a.{L}.b", "x.{L}", REPLICATED, "head")
    assert rule("final.weight", "norm.weight", REPLICATED, "head").part == "head"
    assert rule("a.{L}.b", "x.{L}", REPLICATED).part == "layer"


def test_dims_from_a_megatron_style_config() -> None:
    class Config:
        num_attention_heads = 8
        num_query_groups = None  # Megatron: no GQA
        kv_channels = 16
        num_layers = 3
        num_moe_experts = None

    dims = ModelDims.from_megatron(Config(), vocab_size=32000)
    assert (dims.num_query_groups, dims.heads_per_group, dims.head_dim) == (8, 1, 16)
    assert (dims.num_layers, dims.num_experts) == (3, None)
    with pytest.raises(ConfigError, match="num_attention_heads=6 is not a multiple"):
        ModelDims(
            num_attention_heads=6, num_query_groups=4, head_dim=8, vocab_size=10, num_layers=1
        )
