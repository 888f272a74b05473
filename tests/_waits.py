"""Bounded waits for tests on a real Ray (one copy for every suite).

``WAIT_S`` bounds any single wait; a suite on a slower setup (the multi-node
cluster) raises it in its conftest. Generous on purpose: CI machines are shared.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

WAIT_S = 30.0


async def within(awaitable: Awaitable[T], seconds: float | None = None) -> T:
    """``await awaitable``, failing with ``TimeoutError`` after ``seconds`` (default ``WAIT_S``)."""
    async with asyncio.timeout(WAIT_S if seconds is None else seconds):
        return await awaitable


async def eventually(
    check: Callable[[], Awaitable[bool]], what: str, seconds: float | None = None
) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``seconds``."""
    bound = WAIT_S if seconds is None else seconds
    deadline = time.monotonic() + bound
    while not await within(check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (after {bound:.0f} s)")
        await asyncio.sleep(0.05)
