"""Checks of user-given arguments, written once (``True`` is an int to Python, never a count).

The ``is_*`` tests answer yes or no; the ``check_*`` functions raise the error class
the caller names, with a message that names the argument and the bad value, and
return the value (narrowed) when it is good. Every public entry point checks its
arguments with these before it changes any state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TypeGuard, TypeVar

from .errors import AsyncSyncError

__all__ = [
    "check_bool",
    "check_int",
    "check_iterable",
    "check_number",
    "check_optional_number",
    "check_str",
    "check_type",
    "is_int",
    "is_number",
]

T = TypeVar("T")


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[float]:
    """A finite ``int`` or ``float`` that is not a ``bool`` (no NaN, no infinity)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    if low is not None:
        return f" >= {low}"
    if high is not None:
        return f" <= {high}"
    return ""


def check_int(
    value: object,
    what: str,
    error: type[AsyncSyncError],
    *,
    low: int | None = None,
    high: int | None = None,
) -> int:
    """``value`` if an int (not a bool) in ``[low, high]``; else raise ``error`` naming ``what``."""
    if (
        not is_int(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise error(f"{what} must be an int{_range(low, high)}, got {value!r}")
    return value


def check_number(
    value: object,
    what: str,
    error: type[AsyncSyncError],
    *,
    low: float | None = None,
    positive: bool = False,
) -> float:
    """``value`` if it is a finite number (no bool, NaN or infinity) >= ``low`` (> 0 if
    ``positive``); else raise ``error`` naming ``what``."""
    if not is_number(value) or (low is not None and value < low) or (positive and not value > 0):
        bound = " > 0" if positive else _range(low, None)
        raise error(f"{what} must be a finite number{bound}, got {value!r}")
    return value


def check_optional_number(
    value: object,
    what: str,
    error: type[AsyncSyncError],
    *,
    low: float | None = None,
    positive: bool = False,
) -> float | None:
    """:func:`check_number`, with ``None`` allowed (and returned)."""
    if value is None:
        return None
    try:
        return check_number(value, what, error, low=low, positive=positive)
    except error as exc:
        raise error(f"{exc} (or None)") from None


def check_bool(value: object, what: str, error: type[AsyncSyncError]) -> bool:
    """``value`` if it is a ``bool``; else raise ``error`` naming ``what``."""
    if not isinstance(value, bool):
        raise error(f"{what} must be a bool, got {value!r}")
    return value


def check_str(value: object, what: str, error: type[AsyncSyncError]) -> str:
    """``value`` if it is a non-empty ``str``; else raise ``error`` naming ``what``."""
    if not isinstance(value, str) or not value:
        raise error(f"{what} must be a non-empty str, got {value!r}")
    return value


def check_type(value: object, kind: type[T], what: str, error: type[AsyncSyncError]) -> T:
    """``value`` if it is an instance of ``kind``; else raise ``error`` naming ``what``."""
    if not isinstance(value, kind):
        raise error(f"{what} must be a {kind.__name__}, got {type(value).__name__}: {value!r:.80}")
    return value


def check_iterable(value: object, what: str, error: type[AsyncSyncError]) -> Iterable[object]:
    """``value`` if it is an iterable of items (not a str, bytes or mapping); else raise.

    Strings and mappings iterate, but over characters and keys: never what a
    caller meant when a sequence of items is asked for.
    """
    if isinstance(value, str | bytes | Mapping) or not isinstance(value, Iterable):
        hint = " (pass mapping.items())" if isinstance(value, Mapping) else ""
        raise error(
            f"{what} must be an iterable of items, got {type(value).__name__}: {value!r:.80}{hint}"
        )
    return value
