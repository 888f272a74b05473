"""Type tests for user-given options, written once (``True`` is an int to Python, never a count)."""

from __future__ import annotations

import math
from typing import TypeGuard

__all__ = ["is_int", "is_number"]


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float]:
    """A finite ``int`` or ``float`` that is not a ``bool`` (no NaN, no infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
