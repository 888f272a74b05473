"""The registry of conversion tables, keyed by family name."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ..errors import ConfigError
from ._table import ConversionTable
from .llama import LLAMA, MISTRAL
from .mixtral import MIXTRAL
from .qwen2 import QWEN2
from .qwen3 import QWEN3
from .qwen3_moe import QWEN3_MOE

__all__ = ["FAMILIES", "conversion_table"]

FAMILIES: Mapping[str, ConversionTable] = MappingProxyType(
    {t.family: t for t in (LLAMA, MISTRAL, QWEN2, QWEN3, QWEN3_MOE, MIXTRAL)}
)
"""Every known family's table, keyed by family name (the HF ``model_type``)."""


def conversion_table(family: str) -> ConversionTable:
    """The table of ``family`` (the HF ``config.model_type``).

    Raises :class:`~asyncsync.errors.ConfigError` naming the family and listing
    the known ones.
    """
    table = FAMILIES.get(family) if isinstance(family, str) else None
    if table is None:
        raise ConfigError(
            f"no conversion table for model family {family!r}; known: {sorted(FAMILIES)}"
        )
    return table
