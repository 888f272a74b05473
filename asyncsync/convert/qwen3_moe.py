"""Qwen3-MoE: the Qwen3 attention with a routed mixture of SwiGLU experts.

Megatron settings: as for Qwen3, plus ``num_moe_experts``, ``moe_router_topk``,
``moe_ffn_hidden_size`` and ``moe_router_pre_softmax=False`` (top-k, then softmax
over the chosen logits, which equals HF's softmax, top-k, renormalize with
``norm_topk_prob=True``). Expert parallelism must be 1 (see
:class:`~asyncsync.convert.MegatronWeightSource`).

The output is the Hub checkpoint layout (one tensor per expert and projection),
which inference engines load; transformers >= 5 fuses experts into 3-D
``gate_up_proj`` / ``down_proj`` parameters itself when it loads such a checkpoint.
"""

from __future__ import annotations

from ._common import QK_NORM, expert_rules, shared_rules
from ._table import ConversionTable

__all__ = ["QWEN3_MOE"]

QWEN3_MOE = ConversionTable(
    "qwen3_moe", shared_rules((*QK_NORM, *expert_rules("mlp", "gate_proj", "up_proj", "down_proj")))
)
