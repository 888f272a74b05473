"""Megatron-core -> Hugging Face weight conversion, and a gathering weight source.

Conversions are data: one :class:`ConversionTable` per model family, looked up
by the family's name, which is the HF ``config.model_type`` (``"llama"``,
``"mistral"``, ``"qwen2"``, ``"qwen3"``, ``"qwen3_moe"``, ``"mixtral"``). The family is
always chosen explicitly; nothing guesses it from parameter names.

A state dict is converted whole or not at all. The caller states whether the
model ties its output layer to its embedding and, for one pipeline stage,
which :class:`Stage` the state dict holds (Megatron numbers each stage's layers
from 0); an input that does not make exactly the model's (or the stage's)
weights raises :class:`~asyncsync.errors.CoverageError` naming what is missing
and what must not be there::

    table = conversion_table("qwen3")
    dims = ModelDims.from_megatron(config, vocab_size)
    hf_state = table.to_hf(megatron_state, dims, tied=False)            # no pipeline
    hf_state = table.to_hf_stages(                                      # a pipeline
        [(Stage.of_pipeline(r, 2, dims.num_layers), stage_state[r]) for r in range(2)],
        dims,
        tied=False,
    )

:class:`MegatronWeightSource` gathers the tensor-parallel shards and pipeline
stages of a live megatron-core model on every rank and yields HF pairs on the
single cache owner (megatron-core is imported only when one is constructed).
:mod:`asyncsync.train_group` (on the actor side: conversions depend on buckets
only) runs such a job as a group of Ray train actors.
"""

from __future__ import annotations

from ._common import (
    COLUMN,
    GATE_UP,
    QKV,
    REPLICATED,
    ROW,
    VOCAB,
    Layout,
    ModelDims,
    Part,
    Rule,
    Stage,
)
from ._registry import FAMILIES, conversion_table
from ._table import ConversionTable, Planned, StateDict
from .megatron_source import MegatronWeightSource, ParallelGroups

__all__ = [
    "COLUMN",
    "FAMILIES",
    "GATE_UP",
    "QKV",
    "REPLICATED",
    "ROW",
    "VOCAB",
    "ConversionTable",
    "Layout",
    "MegatronWeightSource",
    "ModelDims",
    "ParallelGroups",
    "Part",
    "Planned",
    "Rule",
    "Stage",
    "StateDict",
    "conversion_table",
]
