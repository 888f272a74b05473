"""Transports: how a pinned snapshot's buckets reach the engines.

One small protocol, one module per backend, one registry entry per backend naming
both of its sides. The session calls a transport's train side on the train actor's
loop; every blocking step (object-store put, collective) runs in a worker thread
inside the transport. What :meth:`Transport.put` returns is passed to each
engine's ``receive`` as the payload; the engine turns it back into a
:class:`~asyncsync.Bucket` with :func:`load_payload`.

Backends (:data:`BACKENDS`):

- ``shm``: same node only. The engine maps the pinned snapshot's shared memory
  read-only; no payload byte moves.
- ``object_store``: each bucket is put into the Ray object store once; each node
  pulls it once and every engine there maps that copy.
- ``collective``: the cache owner broadcasts each bucket over a private
  torch.distributed group (gloo, or NCCL between GPUs).

A plan may also ask for ``"auto"`` (the default): per engine, ``shm`` when the
engine runs on the cache owner's node, else the plan's cross-node transport.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..buckets import Bucket, BucketManifest
from ..client import EngineClient, SessionTag
from ..errors import ConfigError, TransportError

__all__ = [
    "AUTO",
    "BACKENDS",
    "Backend",
    "BucketPayload",
    "KeptState",
    "SessionContext",
    "Transport",
    "backend",
    "load_payload",
    "transport_names",
]

AUTO = "auto"
"""Plan transport that picks a backend per engine by where the engine runs."""


@dataclass(frozen=True)
class SessionContext:
    """What a transport knows about the session it serves.

    ``engines`` are the engines this transport carries in this session, name ->
    handle (one session may use several transports, each for some of its
    engines). A transport that calls its engines itself (set-up messages) does so
    through ``client``, the one way to reach engines (by default a client of
    no engine, for a context that calls none).
    """

    session_id: str
    step: int
    engines: Mapping[str, Any]
    manifest: tuple[BucketManifest, ...]
    client: EngineClient = field(default_factory=lambda: EngineClient.of({}))

    @property
    def tag(self) -> SessionTag:
        """Names this session in errors."""
        return SessionTag(self.session_id, self.step)


@runtime_checkable
class BucketPayload(Protocol):
    """Engine side: a payload that is not a bucket yet.

    ``load`` is blocking (mapping memory, network I/O) and runs in a worker thread
    of the engine. ``state`` is the receiver's per-transport state dictionary, for
    transports that keep connections between sessions.
    """

    def load(self, state: dict[str, Any]) -> Bucket: ...


@runtime_checkable
class KeptState(Protocol):
    """Engine side: what a transport keeps in ``transport_state`` between sessions.

    The receiver calls :meth:`prune` about once a second while ``nbytes`` is not
    zero, so nothing kept outlives its use (e.g. the shared-snapshot transport's
    maps of buffers their owner released).
    """

    @property
    def nbytes(self) -> int:
        """Bytes kept now (cheap; no system calls)."""

    def prune(self) -> int:
        """Let go of what no session can use any more; return the bytes still kept.

        Blocking: the receiver runs it in a worker thread.
        """


class Transport(Protocol):
    """Train side of a transport; one instance per train actor, reused across sessions."""

    name: str

    async def start(self, session: SessionContext) -> None:
        """Prepare a session (allocate names, join a group). Called once, first."""

    async def put(self, session: SessionContext, index: int, bucket: Bucket) -> Any:
        """Make bucket ``index`` available to every engine; return the payload to send."""

    async def release(self, session: SessionContext, index: int, payload: Any) -> None:
        """Every engine has received bucket ``index``; free what only the transfer needed."""

    async def finish(self, session: SessionContext, ok: bool) -> None:
        """Always called once at the end, on success, failure or cancellation.

        Must release everything the session created and must not raise.
        """

    async def close(self) -> None:
        """The train actor is shutting down: release everything."""


@dataclass(frozen=True)
class Backend:
    """One transport: where its two sides live and where it can run.

    Args:
        name: the name plans use.
        owner: ``"module:Class"`` of the train side (a :class:`Transport`).
        engine: ``"module:function"`` of the engine-side set-up that the
            receiver's ``transport_setup`` runs, or ``None`` when the engine
            needs none (its payloads load themselves).
        same_node_only: the engine must run on the cache owner's Ray node.
        grouped: its engines form one group (every put reaches every member), so
            every engine of a session must have begun before it starts.
    """

    name: str
    owner: str
    engine: str | None
    same_node_only: bool
    grouped: bool = False

    def make(self, **options: Any) -> Transport:
        """A new train side of this transport."""
        transport: Transport = _resolve(self.owner)(**options)
        return transport

    def engine_setup(self) -> Callable[[dict[str, Any], Any], Any] | None:
        """The engine-side set-up function, or ``None``."""
        if self.engine is None:
            return None
        setup: Callable[[dict[str, Any], Any], Any] = _resolve(self.engine)
        return setup


BACKENDS: Mapping[str, Backend] = {
    b.name: b
    for b in (
        Backend("shm", "asyncsync.transport.shm:SharedSnapshotTransport", None, True),
        Backend(
            "object_store", "asyncsync.transport.object_store:ObjectStoreTransport", None, False
        ),
        Backend(
            "collective",
            "asyncsync.transport.collective:CollectiveTransport",
            "asyncsync.transport.collective:engine_setup",
            False,
            grouped=True,
        ),
    )
}


def transport_names() -> list[str]:
    """Names of every backend (not ``"auto"``, which picks among them)."""
    return list(BACKENDS)


def backend(name: str) -> Backend:
    """The registry entry of ``name``; :class:`~asyncsync.ConfigError` if there is none."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown transport {name!r}; choose one of {', '.join(transport_names())}"
        ) from None


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_payload(payload: Any, state: dict[str, Any]) -> Bucket:
    """Engine side: the bucket a ``receive`` payload stands for (blocking)."""
    if isinstance(payload, Bucket):
        return payload
    if isinstance(payload, BucketPayload):
        return payload.load(state)
    raise TransportError(
        f"cannot load a bucket from a {type(payload).__name__}: not a payload of any transport"
    )
