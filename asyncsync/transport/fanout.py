"""The put fan-out: one transport's share of a session.

Each bucket is put once per transport (whichever of its engines asks first), kept
while any of its engines still needs it, and released as soon as every one of them
has it; an engine that leaves the session (failed, removed) no longer holds any
release back. :meth:`BucketFanOut.finish` is owed from the moment
:meth:`BucketFanOut.start` is called and always runs the transport's ``finish``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from .._primitives import detached, shielded
from ..buckets import Bucket
from ..errors import SessionError, last_line
from . import SessionContext, Transport

__all__ = ["BucketFanOut"]

T = TypeVar("T")


class BucketFanOut:
    """Puts and releases ``buckets`` through ``transport`` for the engines of ``ctx``."""

    def __init__(
        self, name: str, transport: Transport, ctx: SessionContext, buckets: Sequence[Bucket]
    ) -> None:
        self.name = name
        self.transport = transport
        self.ctx = ctx
        self.buckets = buckets
        self.engines = set(ctx.engines)
        self._puts: dict[int, asyncio.Future[Any]] = {}
        self._needed: dict[int, set[str]] = {}
        self.started = False

    async def start(self) -> None:
        # finish() is owed from the moment start() is called, even if it fails.
        self.started = True
        await self._guard(None, self.transport.start(self.ctx))

    async def get(self, index: int) -> Any:
        """The payload of bucket ``index`` (put now if no engine asked for it yet)."""
        put = self._puts.get(index)
        if put is None:
            bucket = self.buckets[index]
            put = detached(self._guard(index, self.transport.put(self.ctx, index, bucket)))
            self._puts[index] = put
            self._needed[index] = set(self.engines)
        # Shielded: one engine giving up must not cancel a put the others share.
        return await asyncio.shield(put)

    def join(self, engine: str) -> None:
        """``engine`` streams from this fan-out too (it came over from another):
        no bucket is released before it has it (one already released is put again)."""
        self.engines.add(engine)
        for needed in self._needed.values():
            needed.add(engine)

    async def took(self, index: int, engine: str) -> None:
        """``engine`` has bucket ``index``."""
        needed = self._needed.get(index)
        if needed is None:
            return
        needed.discard(engine)
        if not needed:
            await self._release(index)

    async def leave(self, engine: str) -> None:
        """``engine`` left the session: it no longer holds back any release."""
        self.engines.discard(engine)
        for index in list(self._needed):
            await self.took(index, engine)

    async def _release(self, index: int) -> None:
        del self._needed[index]
        put = self._puts[index]
        if not put.done():
            return  # its engines left before it ended: finish() waits for it
        # No engine asks for this bucket again. Forget the put: its result (for the
        # object store, the bucket's ObjectRef) would otherwise keep the bucket in
        # the object stores of the owner's node and of every node that pulled it
        # until this session (a reference cycle) is garbage-collected.
        del self._puts[index]
        if not put.cancelled() and put.exception() is None:
            await self._guard(index, self.transport.release(self.ctx, index, put.result()))

    async def finish(self, ok: bool) -> None:
        """End the transport's part of the session (never raises)."""
        running = [p for p in self._puts.values() if not p.done()]
        if running:
            await asyncio.wait(running)  # a put in a worker thread cannot be stopped
        if self.started:
            await shielded(self.transport.finish(self.ctx, ok))
        # What a failed session never released goes with the transport's own references.
        self._puts.clear()

    async def _guard(self, bucket: int | None, step: Awaitable[T]) -> T:
        """Await a transport step; any failure becomes a SessionError naming it."""
        try:
            return await step
        except SessionError:
            raise
        except Exception as exc:
            where = f"bucket {bucket}" if bucket is not None else "its set-up"
            ctx = self.ctx
            raise SessionError(
                f"{ctx.tag.prefix()}transport {self.name!r} failed on {where}: "
                f"{type(exc).__name__}: {last_line(exc)}",
                session_id=ctx.session_id,
                step=ctx.step,
                transport=self.name,
                bucket=bucket,
            ) from exc
