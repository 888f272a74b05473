"""Await Ray object refs from asyncio and trio drivers alike, without a thread per call.

``await ref`` works only under asyncio: Ray's ``ObjectRef.__await__`` yields an
``asyncio.Future``, which trio refuses (``trio.run received unrecognized yield
message <Future ...>``). The functions here work under both, through anyio:

```python
from asyncsync import aio

step = await aio.get(trainer.build_cpu_bucket_cache.remote(7))
a, b = await aio.gather(engine_a.generate.remote(p), engine_b.generate.remote(p))
with anyio.fail_after(60):  # a deadline is a cancel scope, not a parameter
    report = await aio.get(trainer.run_sync_session.remote(plan))
```

How a call is awaited
    ``ref.future()`` gives a ``concurrent.futures.Future`` that Ray completes from
    its own callback thread. A done-callback hands the wake-up back to the
    awaiting event loop with the loop's non-blocking thread-safe scheduler
    (``loop.call_soon_threadsafe`` under asyncio, ``TrioToken.run_sync_soon``
    under trio); the awaiting task sleeps on an :class:`anyio.Event`. No thread is
    blocked or started per call, so thousands of calls can be in flight at once.

Cancellation
    If the awaiting task is cancelled before the value arrives (a cancel scope
    such as ``anyio.fail_after``, ``trio.move_on_after`` or ``asyncio.timeout``,
    a task cancel, a failing sibling in a task group), ``cancel=True`` (the
    default) calls ``ray.cancel(ref)``: a request, not a wait. For a method of an
    async actor, Ray cancels the ``asyncio.Task`` running it, so the method's
    ``finally`` blocks and ``async with`` exits run (cache pins and the build
    slot are released); a call still queued never starts. The awaiting task
    stops waiting at once, unless ``cancel_wait_s`` asks it to wait (shielded,
    bounded) until the remote call has ended. ``cancel=False`` only stops
    waiting; use it for a ref that other tasks await too. Plain ``await ref``
    under asyncio never cancels the remote call.

Errors
    An exception raised by the remote method is re-raised as Ray delivers it: a
    ``ray.exceptions.RayTaskError`` that is also an instance of the original
    exception class, so ``except SessionError`` works. Actor death raises
    ``ray.exceptions.RayActorError``; a cancelled call raises
    ``ray.exceptions.TaskCancelledError``.

Only asyncio and trio event loops are supported (anyio's two backends); calling
these functions outside a running loop raises ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import ray

__all__ = ["gather", "get"]

T = TypeVar("T")


def _threadsafe_scheduler() -> Callable[[Callable[[], object]], None]:
    """A function that runs a callable soon on *this* task's loop, from any thread, without waiting.

    Raises ``RuntimeError`` when no asyncio or trio loop runs in this thread.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:

        def on_asyncio(fn: Callable[[], object]) -> None:
            try:
                loop.call_soon_threadsafe(fn)
            except RuntimeError:
                # The loop is closed: its waiter is gone and nobody needs waking.
                pass

        return on_asyncio
    try:
        import trio

        token = trio.lowlevel.current_trio_token()
    except (ImportError, RuntimeError):
        raise RuntimeError(
            "asyncsync.aio functions must be awaited on a running asyncio or trio event loop"
        ) from None

    def on_trio(fn: Callable[[], object]) -> None:
        try:
            token.run_sync_soon(fn)
        except trio.RunFinishedError:
            # trio.run has returned; nobody is waiting any more.
            pass

    return on_trio


async def get(ref: ray.ObjectRef[T], *, cancel: bool = True, cancel_wait_s: float = 0.0) -> T:
    """Wait for one Ray ``ObjectRef`` and return its value, under asyncio or trio.

    Args:
        ref: the result of ``actor.method.remote(...)`` (or of a remote task).
        cancel: when the awaiting task is cancelled before the value arrives,
            also ``ray.cancel(ref)`` (see the module docstring). ``False``: only
            stop waiting.
        cancel_wait_s: after ``ray.cancel``, wait up to this long (shielded from
            the cancellation) for the remote call to end before the cancellation
            propagates, so that afterwards nothing of it runs any more: a
            cancelled sync session has aborted on every engine. ``0``: do not wait.

    Returns:
        The remote call's return value.

    Raises:
        TypeError: ``ref`` is not a ``ray.ObjectRef``.
        RuntimeError: not called from a running asyncio or trio loop.
        Exception: whatever the remote call raised, as Ray delivers it.
    """
    if not isinstance(ref, ray.ObjectRef):
        raise TypeError(f"aio.get expects a ray.ObjectRef, got {type(ref).__name__}")
    schedule = _threadsafe_scheduler()
    future: Future[T] = ref.future()
    if future.done():
        # Still a checkpoint: a caller looping over ready refs must stay cancellable.
        await anyio.lowlevel.checkpoint()
        return future.result()
    done = anyio.Event()
    # Runs on Ray's callback thread (or right here if the value arrived meanwhile):
    # only hand the wake-up over; never touch loop objects from that thread.
    future.add_done_callback(lambda _: schedule(done.set))
    try:
        await done.wait()
    finally:
        if cancel and not future.done():
            ray.cancel(ref)
            if cancel_wait_s > 0:
                with anyio.CancelScope(shield=True), anyio.move_on_after(cancel_wait_s):
                    await done.wait()
    return future.result()


async def gather(
    *refs: ray.ObjectRef[T], cancel: bool = True, cancel_wait_s: float = 0.0
) -> list[T]:
    """Wait for every ref concurrently; return their values in argument order.

    The waits run in one anyio task group. If a remote call fails, the other
    waits are cancelled (with ``cancel=True`` their remote calls are
    cancelled with ``ray.cancel`` too) and the first failure is raised itself, not wrapped
    in an ``ExceptionGroup``. Cancelling the caller cancels every wait the same way.
    ``cancel`` and ``cancel_wait_s`` apply to each ref as in :func:`get`.

    Raises:
        TypeError: an argument is not a ``ray.ObjectRef`` (before anything is awaited).
        Exception: the first exception a remote call raised.
    """
    for ref in refs:
        if not isinstance(ref, ray.ObjectRef):
            raise TypeError(f"aio.gather expects ray.ObjectRefs, got {type(ref).__name__}")
    results: list[Any] = [None] * len(refs)
    failures: list[Exception] = []

    async def wait_one(index: int, ref: ray.ObjectRef[T], group: anyio.abc.TaskGroup) -> None:
        try:
            results[index] = await get(ref, cancel=cancel, cancel_wait_s=cancel_wait_s)
        except Exception as exc:
            failures.append(exc)
            group.cancel_scope.cancel()

    async with anyio.create_task_group() as group:
        for index, ref in enumerate(refs):
            group.start_soon(wait_one, index, ref, group)
    if failures:
        raise failures[0]
    return results
