"""Megatron-core -> Hugging Face weight conversion, and a gathering weight source.

Conversions are data: one :class:`ConversionTable` per model family, looked up
by the family's name, which is the HF ``config.model_type`` (``"llama"``,
``"mistral"``, ``"qwen2"``, ``"qwen3"``, ``"qwen3_moe"``, ``"mixtral"``). The family is
always chosen explicitly; nothing guesses it from parameter names.

    table = conversion_table("qwen3")
    hf_state = table.to_hf(megatron_state, ModelDims.from_megatron(config, vocab_size))

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
    ConversionTable,
    Layout,
    ModelDims,
    Rule,
)
from ._registry import FAMILIES, conversion_table
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
    "Rule",
    "conversion_table",
]
