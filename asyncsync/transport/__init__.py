"""Transports: how a pinned snapshot's buckets reach the engines.

One small protocol, one module per backend, a tiny loader. The session calls a
transport on the train actor's loop; every blocking step (object-store put, file
write, collective) runs in a worker thread inside the transport. What a transport
returns from :meth:`Transport.put` is passed to each engine's ``receive`` as the
payload; the engine turns it back into a :class:`~asyncsync.Bucket` with
:func:`load_payload`.

Backends:
    ``object_store`` (default)  each bucket put into the Ray object store once; every
                                target maps the same object zero-copy; works across nodes
    ``shm``                     safetensors files on ``/dev/shm`` (same node only)
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..buckets import Bucket, BucketManifest
from ..errors import ConfigError

__all__ = [
    "BucketPayload",
    "SessionContext",
    "Transport",
    "load_payload",
    "make_transport",
    "transport_names",
]


@dataclass(frozen=True)
class SessionContext:
    """What a transport knows about the session it serves."""

    session_id: str
    step: int
    targets: Mapping[str, Any]
    manifest: tuple[BucketManifest, ...]


@runtime_checkable
class BucketPayload(Protocol):
    """Engine side: a payload that is not a bucket yet.

    ``load`` is blocking (file or network I/O) and runs in a worker thread of the
    engine. ``state`` is the receiver's per-transport state dictionary, for
    transports that keep connections between sessions.
    """

    def load(self, state: dict[str, Any]) -> Bucket: ...


class Transport(Protocol):
    """Train side of a transport; one instance per train actor, reused across sessions."""

    name: str

    async def start(self, session: SessionContext) -> None:
        """Prepare a session (allocate names, join a group). Called once, first."""

    async def put(self, session: SessionContext, index: int, bucket: Bucket) -> Any:
        """Make bucket ``index`` available to every target; return the payload to send."""

    async def release(self, session: SessionContext, index: int, payload: Any) -> None:
        """Every target has received bucket ``index``; free what only the transfer needed."""

    async def finish(self, session: SessionContext, ok: bool) -> None:
        """Always called once at the end, on success, failure or cancellation.

        Must release everything the session created and must not raise.
        """

    async def close(self) -> None:
        """The train actor is shutting down."""


_BACKENDS = {
    "object_store": ("asyncsync.transport.object_store", "ObjectStoreTransport"),
    "shm": ("asyncsync.transport.shm", "ShmTransport"),
    "collective": ("asyncsync.transport.collective", "CollectiveTransport"),
}


def transport_names() -> list[str]:
    return list(_BACKENDS)


def make_transport(name: str, **options: Any) -> Transport:
    """Create the train side of transport ``name`` (see :func:`transport_names`)."""
    try:
        module_name, cls_name = _BACKENDS[name]
    except KeyError:
        raise ConfigError(
            f"unknown transport {name!r}; choose one of {', '.join(transport_names())}"
        ) from None
    cls = getattr(importlib.import_module(module_name), cls_name)
    transport: Transport = cls(**options)
    return transport


def load_payload(payload: Any, state: dict[str, Any]) -> Bucket:
    """Engine side: the bucket a ``receive`` payload stands for (blocking)."""
    if isinstance(payload, Bucket):
        return payload
    if isinstance(payload, BucketPayload):
        return payload.load(state)
    raise TypeError(f"cannot load a bucket from a {type(payload).__name__}")
