"""Every wrong input to convert's and train_group's entry points raises a typed error naming it.

One table of cases: a call with one mistake, and the item its message must
name (a parameter, a family, an option, a rank). Each must raise an
:class:`~asyncsync.errors.AsyncSyncError`; a plain ``ValueError``,
``KeyError``, ``TypeError`` or ``RuntimeError`` fails the test.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch

from asyncsync.convert import (
    QKV,
    REPLICATED,
    ConversionTable,
    MegatronWeightSource,
    ModelDims,
    ParallelGroups,
    Rule,
    Stage,
    conversion_table,
)
from asyncsync.errors import AsyncSyncError
from asyncsync.testing import megatron_shim as shim
from asyncsync.train_group import MegatronTrainRank, TrainGroup

DIMS = ModelDims(num_attention_heads=4, num_query_groups=2, head_dim=3, vocab_size=10, num_layers=2)
QKV_NAME = "decoder.layers.0.self_attention.linear_qkv.weight"
PROJ_NAME = "decoder.layers.0.self_attention.linear_proj.weight"


class World(NamedTuple):
    """What the cases need from a real one-rank megatron world."""

    llama: Any
    moe: Any
    groups: ParallelGroups


class Case(NamedTuple):
    id: str
    call: Callable[[World], object]
    item: str


def _dims(**changes: Any) -> ModelDims:
    return ModelDims(**{**dataclasses.asdict(DIMS), **changes})


def _source(world: World, model: str = "llama", **kwargs: Any) -> MegatronWeightSource:
    options: dict[str, Any] = {"family": "llama", "vocab_size": shim.VOCAB_SIZE}
    options.update(kwargs)
    return MegatronWeightSource(getattr(world, model) if model else None, **options)


def _build() -> Any:
    raise AssertionError("never called: the options are refused first")


RANK = {"family": "llama", "vocab_size": 100, "build_model": _build}


def _rank(rank: int = 0, world_size: int = 2, **changes: Any) -> MegatronTrainRank:
    return MegatronTrainRank(rank, world_size, **{**RANK, **changes})


def _start(world_size: int = 2, **changes: Any) -> object:
    return asyncio.run(TrainGroup.start(world_size, **{**RANK, **changes}))


CASES = [
    # tables by family
    Case("unknown family", lambda w: conversion_table("gpt_oss"), "gpt_oss"),
    Case("family not a str", lambda w: conversion_table(["llama"]), "['llama']"),  # type: ignore[arg-type]
    Case("table without family", lambda w: ConversionTable("", ()), "family"),
    Case("table of non-rules", lambda w: ConversionTable("x", [object()]), "rule 0"),  # type: ignore[list-item]
    Case("rule placeholder", lambda w: Rule("a", ("b.{L}",), REPLICATED, "head"), "b.{L}"),
    Case("rule target count", lambda w: Rule("a.{L}", ("b.{L}",), QKV), "a.{L}"),
    Case("rule without part", lambda w: Rule("final", ("norm",), REPLICATED), "final"),
    # model sizes and stages
    Case("dims heads", lambda w: _dims(num_attention_heads=5), "num_attention_heads"),
    Case("dims zero layers", lambda w: _dims(num_layers=0), "num_layers"),
    Case("dims str vocab", lambda w: _dims(vocab_size="10"), "vocab_size"),
    Case("dims experts", lambda w: _dims(num_experts=0), "num_experts"),
    Case("stage offset", lambda w: Stage(-1, 1, True, True), "layer_offset"),
    Case("stage flag", lambda w: Stage(0, 1, 1, True), "pre_process"),  # type: ignore[arg-type]
    Case("stage of a non-GPT", lambda w: Stage.of_megatron(torch.nn.Linear(2, 2)), "Linear"),
    Case(
        "dims of a non-config",
        lambda w: ModelDims.from_megatron(object(), 10),
        "num_attention_heads",
    ),
    Case("pipeline rank", lambda w: Stage.of_pipeline(2, 2, 4), "rank=2"),
    Case("pipeline split", lambda w: Stage.of_pipeline(0, 3, 4), "num_layers=4"),
    # one parameter by name
    Case("lookup unknown", lambda w: conversion_table("llama").lookup("x.weight"), "x.weight"),
    Case("lookup not a str", lambda w: conversion_table("llama").lookup(3), "3"),  # type: ignore[arg-type]
    Case(
        "convert no shards",
        lambda w: conversion_table("llama").convert(QKV_NAME, [], DIMS),
        QKV_NAME,
    ),
    Case(
        "convert qkv rows",
        lambda w: conversion_table("llama").convert(QKV_NAME, [torch.zeros(7, 5)], DIMS),
        QKV_NAME,
    ),
    Case(
        "convert unequal shards",
        lambda w: conversion_table("llama").convert(
            PROJ_NAME, [torch.zeros(5, 2), torch.zeros(5, 3)], DIMS
        ),
        PROJ_NAME,
    ),
    Case(
        "convert 1-d row shard",
        lambda w: conversion_table("llama").convert(PROJ_NAME, [torch.zeros(5)], DIMS),
        PROJ_NAME,
    ),
    Case(
        "convert mixed dtypes",
        lambda w: conversion_table("llama").convert(
            PROJ_NAME, [torch.zeros(5, 2), torch.zeros(5, 2, dtype=torch.float16)], DIMS
        ),
        PROJ_NAME,
    ),
    Case(
        "convert non-tensor shard",
        lambda w: conversion_table("llama").convert(PROJ_NAME, [[1.0]], DIMS),  # type: ignore[list-item]
        PROJ_NAME,
    ),
    Case(
        "convert bare tensor",
        lambda w: conversion_table("llama").convert(PROJ_NAME, torch.zeros(5, 2), DIMS),  # type: ignore[arg-type]
        PROJ_NAME,
    ),
    Case(
        "convert dims",
        lambda w: conversion_table("llama").convert(PROJ_NAME, [torch.zeros(5, 2)], {}),  # type: ignore[arg-type]
        "dims",
    ),
    Case(
        "convert layer beyond",
        lambda w: conversion_table("llama").convert(
            "decoder.layers.2.input_layernorm.weight", [torch.ones(5)], DIMS
        ),
        "decoder.layers.2.input_layernorm.weight",
    ),
    Case(
        "convert vocab rows",
        lambda w: conversion_table("llama").convert(
            "output_layer.weight", [torch.zeros(8, 5)], DIMS
        ),
        "output_layer.weight",
    ),
    # state dicts
    Case(
        "to_hf not a mapping",
        lambda w: conversion_table("llama").to_hf([], DIMS, tied=False),
        "state_dict",
    ),  # type: ignore[arg-type]
    Case(
        "to_hf tied not bool",
        lambda w: conversion_table("llama").to_hf({}, DIMS, tied=None),
        "tied",
    ),  # type: ignore[arg-type]
    Case("to_hf dims", lambda w: conversion_table("llama").to_hf({}, {}, tied=False), "dims"),  # type: ignore[arg-type]
    Case(
        "to_hf stage beyond",
        lambda w: conversion_table("llama").to_hf(
            {}, DIMS, tied=False, stage=Stage(1, 2, False, True)
        ),
        "layer_offset=1",
    ),
    Case(
        "to_hf empty",
        lambda w: conversion_table("llama").to_hf({}, DIMS, tied=False),
        "model.norm.weight",
    ),
    Case(
        "to_hf value",
        lambda w: conversion_table("llama").to_hf(
            {k: 3 for k in w.llama.state_dict()}, _dims(head_dim=16, vocab_size=100), tied=False
        ),
        "embedding.word_embeddings.weight",
    ),
    Case(
        "to_hf moe without experts",
        lambda w: conversion_table("qwen3_moe").to_hf({}, DIMS, tied=False),
        "num_experts",
    ),
    Case(
        "to_hf_stages none",
        lambda w: conversion_table("llama").to_hf_stages([], DIMS, tied=False),
        "stages",
    ),
    Case(
        "to_hf_stages not pairs",
        lambda w: conversion_table("llama").to_hf_stages([{}], DIMS, tied=False),  # type: ignore[list-item]
        "item 0",
    ),
    # MegatronWeightSource construction
    Case("source family", lambda w: _source(w, family="gpt_oss"), "gpt_oss"),
    Case("source vocab zero", lambda w: _source(w, vocab_size=0), "vocab_size"),
    Case("source vocab too big", lambda w: _source(w, vocab_size=1000), "vocab_size=1000"),
    Case("source no chunks", lambda w: MegatronWeightSource([], "llama", vocab_size=100), "model"),
    Case(
        "source not a GPTModel",
        lambda w: MegatronWeightSource(torch.nn.Linear(2, 2), "llama", vocab_size=100),
        "Linear",
    ),
    Case(
        "source wrong family for the model",
        lambda w: _source(w, "moe", family="llama"),
        "decoder.layers.0.self_attention.q_layernorm.weight",
    ),
    Case(
        "source expert parallel",
        lambda w: _source(
            w, "moe", family="qwen3_moe", groups=dataclasses.replace(w.groups, ep_size=2)
        ),
        "expert parallelism 2",
    ),
    Case(
        "source expert tensor parallel",
        lambda w: _source(
            w, "moe", family="qwen3_moe", groups=dataclasses.replace(w.groups, etp_size=2)
        ),
        "expert tensor parallelism 2",
    ),
    # train_group options
    Case("rank world", lambda w: _rank(world_size=3, tp=2), "world_size=3"),
    Case("rank outside", lambda w: _rank(rank=2), "rank=2"),
    Case("rank family", lambda w: _rank(family="gpt_oss"), "gpt_oss"),
    Case("rank vocab", lambda w: _rank(vocab_size=-1), "vocab_size"),
    Case("rank tp", lambda w: _rank(tp=0), "tp"),
    Case("rank build_model", lambda w: _rank(build_model=None), "build_model"),
    Case("rank before setup", lambda w: _rank(rank=1).named_weights(3), "rank 1"),
    Case("start world", lambda w: _start(0), "world_size"),
    Case("start pp", lambda w: _start(4, pp=3), "pp=3"),
    Case("start tp", lambda w: _start(4, tp=3), "tp*pp=3*1"),
    Case("start family", lambda w: _start(family="gpt_oss"), "gpt_oss"),
    Case("start timeout", lambda w: _start(setup_timeout_s=0), "setup_timeout_s"),
    Case("start actor class", lambda w: _start(actor_class=int), "actor_class"),
]


@pytest.fixture(scope="module")
def world(megatron_world: None) -> World:
    groups = ParallelGroups.from_parallel_state()
    return World(shim.build_tiny_gpt("llama"), shim.build_tiny_gpt("qwen3_moe"), groups)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_every_wrong_input_raises_a_typed_error_naming_it(world: World, case: Case) -> None:
    with pytest.raises(Exception) as info:
        case.call(world)
    assert isinstance(info.value, AsyncSyncError), f"{type(info.value).__name__}: {info.value}"
    assert case.item in str(info.value), str(info.value)


def test_an_uninitialized_parallel_state_is_named(world: World) -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    try:
        with pytest.raises(AsyncSyncError, match="parallel_state is not initialized"):
            MegatronWeightSource(world.llama, "llama", vocab_size=shim.VOCAB_SIZE)
    finally:
        ps.initialize_model_parallel()
