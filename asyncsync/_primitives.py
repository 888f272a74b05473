"""Small asyncio primitives used in several places, written once.

``detached``  a task whose outcome is always retrieved, whoever (if anyone) awaits it
``shielded``  run an awaitable to its end even if the waiter is cancelled
``uninterrupted``  wait for an awaitable to end even if cancelled; re-raise the cancellation then
``Signal``    wake every current waiter at once (an event that re-arms itself)
``ReadWriteLock``  many readers or one writer; a waiting writer holds back new readers
``wait_set``  wait for an event with a bound, never losing a cancellation
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

__all__ = ["ReadWriteLock", "Signal", "detached", "shielded", "uninterrupted", "wait_set"]

T = TypeVar("T")


def detached(awaitable: Awaitable[T]) -> asyncio.Future[T]:
    """``awaitable`` as a task of its own, whose outcome is retrieved when it ends.

    For work that must not be cancelled with whoever waits for it (await it through
    :func:`asyncio.shield`), or that nobody may end up awaiting: it never logs
    "exception never retrieved".
    """
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_retrieve)
    return task


async def shielded(awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` to its end even if the waiter is cancelled (then in the background).

    The waiter sees its own cancellation at once; the work goes on. Use it for
    clean-up that must complete (aborts, releasing a transport), never for long work.
    """
    return await asyncio.shield(detached(awaitable))


async def uninterrupted(awaitable: Awaitable[T]) -> T:
    """Wait for ``awaitable`` to end even if this task is cancelled meanwhile.

    The cancellation is held back, not lost: it is raised once the work has ended.
    For the few waits that must not be cut short (a copy out of memory whose owner
    is about to reuse it); everything else should stay cancellable.
    """
    work = detached(awaitable)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(work)
            break
        except asyncio.CancelledError:
            if work.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


async def wait_set(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set, at most ``timeout`` seconds (``None``: no bound).

    Returns whether it was set. Unlike ``asyncio.wait_for`` on Python 3.11, a
    cancellation that arrives just as the event is set is never lost (``wait_for``
    then returns normally and the caller goes on waiting, for its whole timeout or
    forever): the waiter is cancelled.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


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


class ReadWriteLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @asynccontextmanager
    async def read(self) -> AsyncIterator[None]:
        async with self._cond:
            await self._cond.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1
        try:
            yield
        finally:
            async with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @asynccontextmanager
    async def write(self) -> AsyncIterator[None]:
        async with self._cond:
            self._writers_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._cond:
                self._writer = False
                self._cond.notify_all()
