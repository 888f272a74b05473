"""Whole-model state dicts of real megatron-core GPTModels (one gloo rank) through ``to_hf``.

A conversion either makes exactly the model's HF weights or refuses, naming what
is missing and what must not be there. The refusals start from a real
``GPTModel.state_dict()`` with one mistake a caller can make.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from asyncsync.convert import MegatronWeightSource, ModelDims, Stage, conversion_table
from asyncsync.errors import ConfigError, ConversionError, CoverageError
from asyncsync.testing import megatron_shim as shim

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"]
DENSE = [f for f in FAMILIES if shim.FAMILY_PRESETS[f].num_experts is None]


def _model(family: str, tied: bool = False) -> tuple[Any, dict[str, Any], ModelDims]:
    model = shim.build_tiny_gpt(family, tied=tied)
    return model, model.state_dict(), ModelDims.from_megatron(model.config, shim.VOCAB_SIZE)


def _layer(state: dict[str, Any], layer: int) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k.startswith(f"decoder.layers.{layer}.")}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_whole_state_dict_converts_bit_for_bit_like_the_source(
    megatron_world: None, family: str, tied: bool
) -> None:
    model, state, dims = _model(family, tied)
    table = conversion_table(family)
    out = table.to_hf(state, dims, tied=tied)
    gathered = dict(MegatronWeightSource(model, family, vocab_size=shim.VOCAB_SIZE))
    assert sorted(out) == sorted(gathered) == sorted(table.hf_names(dims, tied=tied))
    assert all(torch.equal(out[k], gathered[k]) for k in out)
    # The same conversion, stated as the single stage it is.
    assert table.to_hf(state, dims, tied=tied, stage=Stage.whole(2)).keys() == out.keys()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", DENSE)
def test_the_hf_names_are_transformers_own(family: str, tied: bool) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(shim.hf_config(family, tied=tied))
    dims = ModelDims(
        num_attention_heads=4, num_query_groups=2, head_dim=16, vocab_size=100, num_layers=2
    )
    own = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert set(conversion_table(family).hf_names(dims, tied=tied)) == own


def test_a_missing_layer_is_named(megatron_world: None) -> None:
    _, state, dims = _model("qwen3")
    without = {k: v for k, v in state.items() if k not in _layer(state, 1)}
    with pytest.raises(CoverageError, match=r"missing layers \[1\] entirely") as info:
        conversion_table("qwen3").to_hf(without, dims, tied=False)
    assert "model.layers.1.self_attn.q_norm.weight" in info.value.missing
    assert all(".layers.1." in name for name in info.value.missing)
    assert info.value.extra == ()


def test_a_missing_parameter_is_named_with_its_megatron_name(megatron_world: None) -> None:
    _, state, dims = _model("qwen3")
    del state["decoder.layers.0.self_attention.k_layernorm.weight"]
    with pytest.raises(
        CoverageError,
        match=r"missing model\.layers\.0\.self_attn\.k_norm\.weight "
        r"\(from decoder\.layers\.0\.self_attention\.k_layernorm\.weight\)",
    ) as info:
        conversion_table("qwen3").to_hf(state, dims, tied=False)
    assert info.value.missing == ("model.layers.0.self_attn.k_norm.weight",)


def test_a_layer_beyond_the_model_is_named(megatron_world: None) -> None:
    _, state, dims = _model("llama")
    moved = {k.replace("decoder.layers.1.", "decoder.layers.5."): v for k, v in state.items()}
    with pytest.raises(
        CoverageError,
        match=r"missing layers \[1\] entirely; unexpected decoder\.layers\.5\.\* "
        r"\(6 parameters: layer 5 is beyond the model's 2 layers\)",
    ) as info:
        conversion_table("llama").to_hf(moved, dims, tied=False)
    assert "decoder.layers.5.mlp.linear_fc1.weight" in info.value.extra


def test_two_parameters_for_one_weight_are_refused(megatron_world: None) -> None:
    # The Transformer Engine spec's fused norm name beside the local spec's norm.
    _, state, dims = _model("llama")
    alias = "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    state[alias] = state["decoder.layers.0.input_layernorm.weight"]
    with pytest.raises(
        CoverageError, match=r"makes model\.layers\.0\.input_layernorm\.weight, as decoder"
    ) as info:
        conversion_table("llama").to_hf(state, dims, tied=False)
    assert info.value.extra == (alias,)


def test_the_tie_must_match_the_output_layer(megatron_world: None) -> None:
    table = conversion_table("qwen2")
    _, untied, dims = _model("qwen2", tied=False)
    with pytest.raises(CoverageError, match=r"output_layer\.weight \(tied=True") as info:
        table.to_hf(untied, dims, tied=True)
    assert info.value.extra == ("output_layer.weight",)

    _, tied, _ = _model("qwen2", tied=True)
    with pytest.raises(CoverageError, match=r"missing lm_head\.weight") as info:
        table.to_hf(tied, dims, tied=False)
    assert info.value.missing == ("lm_head.weight",)


def test_parts_on_the_wrong_stage_are_refused(megatron_world: None) -> None:
    _, state, dims = _model("llama")
    middle = Stage(1, 1, pre_process=False, post_process=False)
    layer = {
        k.replace("decoder.layers.1.", "decoder.layers.0."): v for k, v in _layer(state, 1).items()
    }
    assert conversion_table("llama").to_hf(layer, dims, tied=False, stage=middle)
    with pytest.raises(CoverageError) as info:
        conversion_table("llama").to_hf({**state, **layer}, dims, tied=False, stage=middle)
    message = str(info.value)
    assert "only the first stage (pre_process) holds the embedding" in message
    assert "only the last stage (post_process) holds the output layer" in message
    assert "local layer 1 is beyond the stage's 1 layers" in message
    assert set(info.value.extra) >= {
        "embedding.word_embeddings.weight",
        "decoder.final_layernorm.weight",
        "output_layer.weight",
    }


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_every_expert_of_every_layer_is_required(megatron_world: None, family: str) -> None:
    table = conversion_table(family)
    _, state, dims = _model(family)
    assert dims.num_experts == 4
    gone = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"
    with pytest.raises(CoverageError, match=r"experts\.3\.") as info:
        table.to_hf({k: v for k, v in state.items() if k != gone}, dims, tied=False)
    assert len(info.value.missing) == 1 and ".layers.1." in info.value.missing[0]

    beyond = {k.replace("local_experts.3.", "local_experts.7."): v for k, v in state.items()}
    with pytest.raises(CoverageError, match=r"experts\.7\..* is not part of the whole model"):
        table.to_hf(beyond, dims, tied=False)

    with pytest.raises(ConfigError, match=r"ModelDims\.num_experts must say"):
        table.to_hf(state, ModelDims(**{**dims.__dict__, "num_experts": None}), tied=False)


def test_an_unknown_name_is_refused_before_coverage(megatron_world: None) -> None:
    _, state, dims = _model("llama")
    state["decoder.layers.0.self_attention.linear_qkv.lora_a.weight"] = torch.zeros(2)
    with pytest.raises(ConversionError, match=r"lora_a\.weight.*'llama'") as info:
        conversion_table("llama").to_hf(state, dims, tied=False)
    assert not isinstance(info.value, CoverageError)


def test_a_refused_input_is_left_as_it_was(megatron_world: None) -> None:
    _, state, dims = _model("llama")
    del state["decoder.final_layernorm.weight"]
    before = {k: (v, None if v is None else v.clone()) for k, v in state.items()}
    with pytest.raises(CoverageError):
        conversion_table("llama").to_hf(state, dims, tied=False)
    assert list(state) == list(before)
    for k, (obj, copy) in before.items():
        assert state[k] is obj and (copy is None or torch.equal(state[k], copy))


def test_the_source_refuses_chunks_that_do_not_cover_the_model(megatron_world: None) -> None:
    model = shim.build_tiny_gpt("llama")
    with pytest.raises(CoverageError, match=r"makes model\.embed_tokens\.weight, as"):
        MegatronWeightSource([model, model], "llama", vocab_size=shim.VOCAB_SIZE)
    # A model chunk whose last layer is gone covers its own stage (layer 0) only.
    del model.decoder.layers[1]
    with pytest.raises(CoverageError, match=r"missing layers \[1\] entirely") as info:
        MegatronWeightSource(model, "llama", vocab_size=shim.VOCAB_SIZE)
    assert "model.layers.1.mlp.down_proj.weight" in info.value.missing


def test_coverage_errors_survive_pickling() -> None:
    import pickle

    err = CoverageError("m", missing=("a",), extra=("b",))
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.missing, back.extra) == (CoverageError, "m", ("a",), ("b",))
