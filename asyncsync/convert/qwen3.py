"""Qwen3: the Llama layout plus per-head RMSNorm on queries and keys.

Megatron settings: as for Llama, plus ``qk_layernorm=True`` (in the layer spec
too). Qwen3 often has ``head_dim`` != ``hidden_size / num_attention_heads``;
Megatron's ``kv_channels`` carries it.
"""

from __future__ import annotations

from ._common import DENSE_MLP, QK_NORM, shared_rules
from ._table import ConversionTable

__all__ = ["QWEN3"]

QWEN3 = ConversionTable("qwen3", shared_rules((*QK_NORM, *DENSE_MLP)))
