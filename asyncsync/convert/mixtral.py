"""Mixtral: Mistral attention with a routed mixture of SwiGLU experts.

Megatron settings: as for Llama, plus ``num_moe_experts``, ``moe_router_topk``
and ``moe_router_pre_softmax=False``. Expert parallelism must be 1.

The output is the Hub checkpoint layout: ``block_sparse_moe.gate`` for the router
and ``experts.{E}.w1`` (gate), ``w3`` (up), ``w2`` (down) per expert.
"""

from __future__ import annotations

from ._common import expert_rules, shared_rules
from ._table import ConversionTable

__all__ = ["MIXTRAL"]

MIXTRAL = ConversionTable(
    "mixtral", shared_rules(expert_rules("block_sparse_moe", "w1", "w3", "w2"))
)
