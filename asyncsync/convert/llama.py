"""Llama and Mistral: grouped-query attention, SwiGLU MLP, RMSNorm, no biases.

Megatron settings that produce this layout: ``normalization="RMSNorm"``,
``gated_linear_unit=True`` with SiLU, ``add_bias_linear=False``,
``position_embedding_type="rope"``. Mistral's weights are laid out exactly like
Llama's; it has its own family name so that the family is always explicit.
"""

from __future__ import annotations

from ._common import DENSE_MLP, shared_rules
from ._table import ConversionTable

__all__ = ["LLAMA", "MISTRAL"]

LLAMA = ConversionTable("llama", shared_rules(DENSE_MLP))
MISTRAL = ConversionTable("mistral", shared_rules(DENSE_MLP))
