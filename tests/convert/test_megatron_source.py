"""Real megatron-core GPTModels on the CPU (one gloo rank), converted, checked against transformers.

Each case builds a randomized tiny ``GPTModel``, publishes it through a real
``BucketCache`` from a :class:`MegatronWeightSource`, loads the owner's snapshot
into the matching transformers model and compares logits on the same tokens.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from asyncsync.convert import MegatronWeightSource, ParallelGroups
from asyncsync.errors import ConfigError, ConversionError
from asyncsync.testing import megatron_shim as shim

from ._hf import TOLERANCE, max_logit_diff
from ._ranks import build_through_cache, tokens

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral"]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
async def test_tp1_logits_match_transformers(
    megatron_world: None, family: str, tied: bool, tmp_path: Path
) -> None:
    model = shim.build_tiny_gpt(family, tied=tied)
    toks = tokens()
    reference = shim.megatron_logits(model, toks)
    source = MegatronWeightSource(model, family, vocab_size=shim.VOCAB_SIZE)
    assert source.is_cache_owner()

    step, weights = await build_through_cache(source)

    assert step == 0
    assert ("lm_head.weight" in weights) is not tied
    diff = max_logit_diff(family, tied, weights, toks, reference, tmp_path)
    print(f"{family} tp1 pp1 {'tied' if tied else 'untied'}: max |logit diff| = {diff:.3g}")
    assert diff < TOLERANCE


async def test_the_logit_check_catches_a_layout_mistake(
    megatron_world: None, tmp_path: Path
) -> None:
    # A control for the check above: one layer's gate and up swapped must show.
    model = shim.build_tiny_gpt("llama")
    toks = tokens()
    reference = shim.megatron_logits(model, toks)
    _, weights = await build_through_cache(
        MegatronWeightSource(model, "llama", vocab_size=shim.VOCAB_SIZE)
    )
    gate, up = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
    weights[gate], weights[up] = weights[up], weights[gate]
    assert max_logit_diff("llama", False, weights, toks, reference, tmp_path) > 100 * TOLERANCE


def test_the_source_can_be_iterated_for_every_build(megatron_world: None) -> None:
    model = shim.build_tiny_gpt("qwen3")
    source = MegatronWeightSource(model, "qwen3", vocab_size=shim.VOCAB_SIZE)
    # Yielded tensors may be views of the live parameters: copy before changing them.
    first = {name: t.clone() for name, t in source}
    with torch.no_grad():
        model.decoder.final_layernorm.weight.add_(1.0)
    second = dict(source)
    assert list(first) == list(second)
    assert torch.equal(second["model.norm.weight"], first["model.norm.weight"] + 1.0)
    assert not any(t.requires_grad for t in second.values())
    assert "owner=True" in repr(source) and "qwen3" in repr(source)


def test_wrong_family_fails_at_construction_naming_parameter_and_family(
    megatron_world: None,
) -> None:
    model = shim.build_tiny_gpt("qwen3")
    with pytest.raises(
        ConversionError, match=r"decoder\.layers\.0\.self_attention\.q_layernorm\.weight.*'llama'"
    ):
        MegatronWeightSource(model, "llama", vocab_size=shim.VOCAB_SIZE)


def test_table_that_disagrees_with_megatrons_partitioning_is_refused(
    megatron_world: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = shim.build_tiny_gpt("llama")
    weight = model.decoder.layers[1].self_attention.linear_qkv.weight
    monkeypatch.setattr(weight, "partition_dim", 1)
    with pytest.raises(
        ConversionError, match=r"decoder\.layers\.1\.self_attention\.linear_qkv\.weight.*dim 1"
    ):
        MegatronWeightSource(model, "llama", vocab_size=shim.VOCAB_SIZE)


def test_data_parallel_replicas_yield_nothing(megatron_world: None) -> None:
    model = shim.build_tiny_gpt("llama")
    groups = dataclasses.replace(ParallelGroups.from_parallel_state(), dp_rank=1)
    source = MegatronWeightSource(model, "llama", vocab_size=shim.VOCAB_SIZE, groups=groups)
    assert not source.is_cache_owner()
    assert list(source) == []


def test_expert_parallelism_is_refused(megatron_world: None) -> None:
    model = shim.build_tiny_gpt("qwen3_moe")
    groups = dataclasses.replace(ParallelGroups.from_parallel_state(), ep_size=2)
    with pytest.raises(ConfigError, match="expert parallelism 2"):
        MegatronWeightSource(model, "qwen3_moe", vocab_size=shim.VOCAB_SIZE, groups=groups)


def test_forward_and_backward_run_on_the_cpu_inside_the_shim(megatron_world: None) -> None:
    model = shim.build_tiny_gpt("qwen3_moe")
    model.train()
    toks = tokens()
    positions = torch.arange(toks.shape[1]).unsqueeze(0).expand_as(toks)
    with shim.cpu_megatron():
        model(toks, positions, None).float().sum().backward()
    grad = model.decoder.layers[0].mlp.router.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
