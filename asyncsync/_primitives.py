"""Small asyncio primitives used in several places, written once.

``shielded``  run an awaitable to its end even if the waiter is cancelled
``Signal``    wake every current waiter at once (an event that re-arms itself)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["Signal", "shielded"]

T = TypeVar("T")


async def shielded(awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` to its end even if the waiter is cancelled (then in the background).

    The waiter sees its own cancellation at once; the work goes on and its outcome
    is retrieved, so nothing logs "exception never retrieved". Use it for clean-up
    that must complete (aborts, releasing a transport), never for long work.
    """
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[T]) -> None:
    if not task.cancelled():
        task.exception()


class Signal:
    """Wakes every task waiting at the moment of :meth:`notify`; later waiters wait anew.

    An :class:`asyncio.Event` replaced on every notify: a waiter takes the current
    event (:meth:`waiter`) before it releases whatever guards the state it checked,
    so a notify between its check and its wait is never lost.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        """The event the next :meth:`notify` sets; take it, then ``await event.wait()``."""
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()
