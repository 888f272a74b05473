"""Object-store transport: each bucket is put once; every engine maps it zero-copy.

The payload handed to ``receive`` is the ``ObjectRef`` itself, passed as a
top-level argument, so Ray resolves it on the engine to the :class:`Bucket`
whose numpy payload maps the object store's shared memory (read-only, no copy).
Works across the nodes of a Ray cluster (Ray moves the object between nodes).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from ..buckets import Bucket
from . import SessionContext

__all__ = ["ObjectStoreTransport"]


class ObjectStoreTransport:
    name = "object_store"

    def __init__(self) -> None:
        # Refs of the buckets in flight, per session: dropped at release/finish so
        # the object store can free what no engine still maps.
        self._refs: dict[str, dict[int, Any]] = {}

    async def start(self, session: SessionContext) -> None:
        self._refs[session.session_id] = {}

    async def put(self, session: SessionContext, index: int, bucket: Bucket) -> Any:
        # ray.put copies the payload into shared memory once: blocking, so in a thread.
        ref = await asyncio.to_thread(ray.put, bucket)
        self._refs[session.session_id][index] = ref
        return ref

    async def release(self, session: SessionContext, index: int, payload: Any) -> None:
        self._refs[session.session_id].pop(index, None)

    async def finish(self, session: SessionContext, ok: bool) -> None:
        self._refs.pop(session.session_id, None)

    async def close(self) -> None:
        self._refs.clear()
