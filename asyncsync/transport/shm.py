"""Shared-snapshot transport: an engine on the cache owner's node maps the pinned snapshot.

The cache's payload buffers live in shared memory (memfd; see
:mod:`asyncsync.sharedmem`). For an engine on the same node, a bucket's payload is
only what identifies its bytes (the :class:`~asyncsync.sharedmem.SharedRegion`)
and its index: no payload byte moves. The engine maps the region read-only,
verifies the checksum once while mapping (in ``receive``, in a worker thread) and
copies into its model once at commit.

The engine keeps each of the owner's buffers mapped between sessions
(:class:`~asyncsync.sharedmem.SharedMappings`, in the receiver's
``transport_state`` under :data:`STATE_KEY`): the owner reuses its pooled buffers
step after step, so page tables are set up once per buffer, not once per session.
A kept map shares the owner's pages and holds none of its own; the receiver drops
it within about a second once the owner released that buffer or exited.

Safety rests on the session's pin: the session holds it until every engine using
the mapping has committed or dropped the session (see :mod:`asyncsync.session`), so
the cache never reuses a buffer under an engine that still reads it. An engine
that was told to abort, or whose staging expired, may still hold a stale mapping
for a moment; it never commits it.

Same node only: the session refuses it for an engine elsewhere
(:class:`~asyncsync.TopologyError`) and ``"auto"`` picks it only for same-node
engines when the snapshot lives in shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..buckets import Bucket, TensorMeta
from ..errors import SharedMemoryError
from ..sharedmem import SharedMappings, SharedRegion
from . import SessionContext

__all__ = ["STATE_KEY", "SharedPayload", "SharedSnapshotTransport", "engine_mappings"]

STATE_KEY = "shm"
"""Key of the engine's :class:`~asyncsync.sharedmem.SharedMappings` in ``transport_state``."""


def engine_mappings(state: dict[str, Any]) -> SharedMappings:
    """The receiver's kept maps of owners' buffers (made on first use)."""
    mappings = state.get(STATE_KEY)
    if mappings is None:
        mappings = state.setdefault(STATE_KEY, SharedMappings())
    if not isinstance(mappings, SharedMappings):
        raise SharedMemoryError(
            f"the receiver's transport_state[{STATE_KEY!r}] holds a "
            f"{type(mappings).__name__}, not the shared-snapshot transport's SharedMappings"
        )
    return mappings


@dataclass(frozen=True)
class SharedPayload:
    """What a same-node engine's ``receive`` gets: where the bucket's bytes are, and its index."""

    region: SharedRegion
    index: tuple[TensorMeta, ...]
    checksum: int

    def load(self, state: dict[str, Any]) -> Bucket:
        """Map the bucket read-only (blocking; an engine worker thread). No copy.

        The owner's buffer stays mapped in ``state`` for the next session.
        """
        view = engine_mappings(state).map(self.region)
        return Bucket(view, self.index, self.checksum, region=self.region)


class SharedSnapshotTransport:
    """Train side: hand each engine the regions of the pinned snapshot; nothing else to do."""

    name = "shm"

    async def start(self, session: SessionContext) -> None:
        pass

    async def put(self, session: SessionContext, index: int, bucket: Bucket) -> Any:
        if bucket.region is None:
            raise SharedMemoryError(
                f"bucket {index} of step {session.step} is not in shared memory: the "
                "cache that built it has no shared buffers; use a cross-node transport"
            )
        return SharedPayload(bucket.region, bucket.index, bucket.checksum)

    async def release(self, session: SessionContext, index: int, payload: Any) -> None:
        pass

    async def finish(self, session: SessionContext, ok: bool) -> None:
        pass

    async def close(self) -> None:
        pass
