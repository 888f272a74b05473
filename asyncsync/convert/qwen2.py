"""Qwen2: the Llama layout plus biases on the fused q/k/v projection.

Megatron settings: as for Llama, plus ``add_qkv_bias=True`` (``add_bias_linear``
stays ``False``: Qwen2 has no bias on ``o_proj`` or the MLP).
"""

from __future__ import annotations

from ._common import DENSE_MLP, QKV, rule, shared_rules
from ._table import ConversionTable

__all__ = ["QKV_BIAS", "QWEN2"]

QKV_BIAS = (
    rule(
        "decoder.layers.{L}.self_attention.linear_qkv.bias",
        (
            "model.layers.{L}.self_attn.q_proj.bias",
            "model.layers.{L}.self_attn.k_proj.bias",
            "model.layers.{L}.self_attn.v_proj.bias",
        ),
        # The bias is fused per query group exactly like the weight's rows.
        QKV,
    ),
)
"""The q/k/v bias rule, shared with families that have one."""

QWEN2 = ConversionTable("qwen2", shared_rules((*QKV_BIAS, *DENSE_MLP)))
