"""The engine protocol: what every engine answers, and the data it answers with.

An engine is a Ray actor (or, in fast tests, an in-process object) with these
``async`` methods; :class:`Receiver` is their typed interface. Nothing calls an
engine except through :class:`~asyncsync.client.EngineClient`, which names each
method through this interface, so a wrong method name is a type error, not a
runtime surprise. :class:`~asyncsync.StagingReceiver` implements the protocol's
staging and commit rules; engines build on it.

One session, as an engine sees it::

    begin(session_id, step, manifest, ttl_s) -> EngineInfo   # refuse what it cannot take
    receive(session_id, index, payload) -> int               # stage bucket ``index``, verified
    begin_delta(session_id, step, manifest, header, ttl_s)   # the same, as a delta on a base
    commit(session_id) -> int                                # the version now served
    abort(session_id)                                        # drop the staging; idempotent

plus ``engine_info()`` (what it is and serves, any time), ``transport_setup()``
(a transport's engine-side set-up, e.g. joining a process group) and
``receiver_stats()``.

**Stamps.** Every answer an engine gives from its weights (a generation) carries
a :class:`Stamp`: the version it was served with and the identity of those exact
weights (:func:`weights_identity` of the snapshot's manifest, which the engine
verified bucket by bucket before committing). Both are read under the lease that
makes commits atomic for generations, so a stamp never describes weights other
than those the answer ran on. An engine whose ``apply`` failed partway holds a
mix of two versions: it stamps ``Stamp(None, None, intact=False)`` and reports
``intact=False`` until a full session repairs it.

This module imports :mod:`asyncsync.buckets` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import xxhash

from .buckets import BucketManifest

__all__ = ["EngineInfo", "Receiver", "ReceiverStats", "Stamp", "weights_identity"]


def weights_identity(manifest: Sequence[BucketManifest]) -> str:
    """The identity of a snapshot's exact weights: a digest of its manifest.

    The manifest holds every tensor's name, dtype, shape and place, and each
    bucket's checksum of its bytes; an engine verifies every bucket against it
    before it commits, so the weights it then serves have this identity by
    construction. The trainer computes the same from its snapshot
    (``WeightSyncActor.snapshot_identity``). 16 hex digits.
    """
    digest = xxhash.xxh3_64()
    for bucket in manifest:
        digest.update(bucket.to_json().encode())
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class Stamp:
    """The weights one answer of an engine was served with.

    ``version``: the step (``None``: the engine's initial weights, or none at all
    when not ``intact``); ``weights``: :func:`weights_identity` of that step's
    snapshot (``None`` for initial weights); ``intact``: ``False`` while the
    engine holds a mix of two versions (an ``apply`` failed partway): such an
    answer ran on no version at all.
    """

    version: int | None
    weights: str | None
    intact: bool = True


@dataclass(frozen=True)
class EngineInfo:
    """What an engine reports about itself; the only source of a fleet's view of it.

    ``incarnation`` is new every time the actor is constructed (a Ray restart
    included); ``node_id`` is its Ray node (``None`` outside Ray); ``version`` the
    step it serves: ``None`` while it serves the weights it started with, which no
    session delivered (not the same as step ``-1``, the trainer's base snapshot,
    which a session delivers and verifies like any other step).
    """

    incarnation: str
    node_id: str | None
    pid: int
    version: int | None
    open_sessions: int
    staged_bytes: int
    weights: str | None = None
    """:func:`weights_identity` of the served version (``None``: initial weights)."""
    intact: bool = True
    """``False`` after an ``apply`` failed partway: the engine serves no whole version."""


@dataclass(frozen=True)
class DeltaHeader:
    """What ``begin_delta`` announces besides the target manifest (see :mod:`asyncsync.delta`).

    ``base_step``, ``base_weights`` and ``base_checksums`` name the snapshot the
    delta was computed against (one checksum per bucket); ``payload`` is the
    manifest of the delta buckets that ``receive`` delivers; ``kinds`` says per
    bucket how its payload applies (``"sparse"``: changed 2-byte words and their
    values; ``"dense"``: the whole bucket).
    """

    base_step: int
    base_weights: str
    base_checksums: tuple[int, ...]
    payload: tuple[BucketManifest, ...]
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class ReceiverStats:
    """An engine's receiver at one instant.

    ``dropped`` counts staging dropped without a commit, by reason: ``"aborted"``,
    ``"superseded"`` (a newer version was committed), ``"expired"`` (its time to
    live passed), ``"stale"`` (its commit came after a newer one).

    Where an engine's time goes, summed since it started (seconds, worker-thread
    time of each step): ``load_s`` getting each received bucket's bytes from its
    payload (mapping shared memory, reading the object store, or unpacking),
    ``verify_s`` checking them against the manifest (one checksum pass),
    ``apply_s`` the commits' ``apply``; ``received_bytes`` and ``applied_bytes``
    the bytes each covered.

    ``kept_bytes``: what transports keep between sessions, e.g. the shared
    snapshot buffers this engine keeps mapped (the owner's pages, shared: no
    memory of the engine's own); dropped within about a second once their owner
    let go of them.
    """

    version: int | None
    incarnation: str
    open_sessions: tuple[str, ...]
    staged_bytes: int
    commits: int
    aborts: int
    rejected_buckets: int
    dropped: dict[str, int]
    received_bytes: int = 0
    load_s: float = 0.0
    verify_s: float = 0.0
    applied_bytes: int = 0
    apply_s: float = 0.0
    kept_bytes: int = 0


class Receiver(Protocol):
    """The engine side of a sync session (every method runs on the engine's loop).

    A Ray actor handle of a class with these methods is what sessions, transports
    and the fleet's keeper call, through :class:`~asyncsync.client.EngineClient`.
    """

    async def engine_info(self) -> EngineInfo:
        """What this engine is and serves now."""
        ...

    async def begin(
        self,
        session_id: str,
        step: int,
        manifest: Sequence[BucketManifest],
        ttl_s: float | None = None,
    ) -> EngineInfo:
        """Open a session that will deliver ``manifest`` for ``step``; report this engine.

        Raises (nothing opened) for a manifest the engine cannot take, a reused id,
        or a step older than the version served. Staging not committed within
        ``ttl_s`` seconds is dropped.
        """
        ...

    async def begin_delta(
        self,
        session_id: str,
        step: int,
        manifest: Sequence[BucketManifest],
        header: DeltaHeader,
        ttl_s: float | None = None,
    ) -> EngineInfo:
        """Like :meth:`begin`, but ``receive`` delivers a delta on ``header``'s base.

        ``manifest`` is the target snapshot's. Raises
        :class:`~asyncsync.DeltaBaseError` (nothing opened, the id unused) unless
        the engine serves exactly the base the header names.
        """
        ...

    async def receive(self, session_id: str, index: int, payload: Any) -> int:
        """Load, verify and stage bucket ``index``; return its size in bytes."""
        ...

    async def commit(self, session_id: str) -> int:
        """Make the session's weights the served ones, atomically for generations.

        Returns the version now served. Once the copy into the model started it
        runs to its end, even if the call is cancelled.
        """
        ...

    async def abort(self, session_id: str) -> None:
        """Drop the session's staging; idempotent; unknown ids are ignored."""
        ...

    async def transport_setup(self, transport: str, config: Any) -> Any:
        """Run transport ``transport``'s engine-side set-up with ``config``."""
        ...

    async def receiver_stats(self) -> ReceiverStats:
        """Counters and timings since the engine started."""
        ...
