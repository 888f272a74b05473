"""The engine side of a sync session: begin, receive, commit, abort.

A receiver stages what it receives and makes it visible only at ``commit``, after
every bucket of the manifest arrived and was validated. Validation (index,
dtypes, shapes, sizes and checksum against the manifest announced at ``begin``)
runs before anything touches the model. ``abort`` drops the staging; the engine
keeps the version it had.

:class:`StagingReceiver` implements the protocol; an engine subclasses it and
implements :meth:`StagingReceiver.check_manifest` (refuse names or shapes the model
does not have, before any bucket moves) and :meth:`StagingReceiver.apply` (make the
staged tensors the model's weights, atomically with respect to its readers).
All methods are ``async`` and run on the engine actor's one event loop; loading
and hashing run in worker threads.

Nothing is held forever: a session's staging (its buckets, and the shared memory
they map) is dropped as soon as the session can no longer commit: when it is
aborted, when a newer version is committed, or when its time to live (announced at
``begin``, at least the session's own timeout) has passed, which is how staging
left behind by a train actor that died mid-session goes away.
:meth:`StagingReceiver.receiver_stats` counts each. What a transport keeps between
sessions (the maps of a same-node owner's buffers, see :mod:`asyncsync.transport.shm`)
is pruned about once a second and dropped once its owner let go of it or exited.

Every engine reports what it is (:class:`EngineInfo`): an incarnation that changes
whenever the actor is (re)created, so a fleet can tell an engine that Ray restarted
(and that now serves its initial weights) from the one it knew, its Ray node, and
the version it serves. A fleet never infers an engine's version; it asks.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ._primitives import ReadWriteLock, uninterrupted
from .buckets import Bucket, BucketManifest, check_manifests
from .delta import check_header, delta_threads, patch_and_verify
from .errors import (
    ConfigError,
    DeltaBaseError,
    InvalidStepError,
    ProtocolError,
    StaleStepError,
)
from .protocol import DeltaHeader, EngineInfo, ReceiverStats, Stamp, weights_identity
from .transport import KeptState, backend, load_payload

__all__ = [
    "DEFAULT_STAGING_TTL_S",
    "StagingReceiver",
    "current_node",
]

_REMEMBERED_SESSIONS = 4096

DEFAULT_STAGING_TTL_S = 600.0
"""Time to live of a session's staging when ``begin`` does not say (seconds after begin)."""

_REAP_INTERVAL_S = 1.0
"""Longest sleep of the task that drops expired staging (it sleeps less when one expires sooner)."""


@dataclass(eq=False)
class _Staging:
    step: int
    manifest: tuple[BucketManifest, ...]
    expires_at: float
    buckets: dict[int, Bucket] = field(default_factory=dict)
    receiving: set[int] = field(default_factory=set)
    # A delta session: what it applies on, and the target (``manifest`` is then the
    # manifest of the delta buckets that arrive).
    header: DeltaHeader | None = None
    target: tuple[BucketManifest, ...] = ()
    # Set once apply() runs: such staging is never dropped (its buckets are being read).
    applying: bool = False

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets.values())


class StagingReceiver:
    """Engine-side session protocol with staging and all-or-nothing commit.

    ``begin`` refuses an update that holds no tensor at all (an empty snapshot,
    such as a forgotten ``await`` on the train side publishes) with
    :class:`ProtocolError`, so an engine never commits a version it got no
    weights for. An engine that does want such versions (say, one that holds no
    weights of its own and only tracks versions) sets :attr:`accepts_empty_updates`.

    **Serving and stamps.** An engine answers from its weights inside
    ``async with self.serving() as stamp:`` and returns ``stamp`` with the answer.
    ``serving`` holds a shared lease on the weights; ``commit`` takes it
    exclusively (it waits for the answers in flight and holds new ones back) for
    ``apply``, :meth:`on_commit` and the switch of the served version, so no answer
    ever runs on a mix of two versions, and its stamp (the version and
    :func:`~asyncsync.protocol.weights_identity` of those weights) is read under
    the same lease. An ``apply`` or ``on_commit`` that raises may have written part
    of the new weights: the engine then serves no version (``version`` ``None``,
    ``intact`` false, stamps ``Stamp(None, None, intact=False)``) until a full
    session commits; the fleet keeps it out of routing meanwhile.
    """

    accepts_empty_updates: ClassVar[bool] = False
    """Whether ``begin`` accepts a manifest without any tensor (default: refused)."""

    keeps_delta_base: ClassVar[bool] = True
    """Whether the engine may keep a private copy of the buckets it serves (1x the
    model, host memory) so it can take deltas (:meth:`begin_delta`). It starts
    keeping one at the first full commit after a session first offered it a delta
    (that offer is refused: nothing is kept yet); an engine never offered one
    keeps nothing and pays no copy. ``False``: never (every session then sends
    this engine the full snapshot)."""

    def __init__(self) -> None:
        self.version: int | None = None
        """The version served (``None``: the initial weights, or none when not intact)."""
        self.identity: str | None = None
        """:func:`~asyncsync.protocol.weights_identity` of the served version."""
        self.intact = True
        """``False`` after an ``apply`` or ``on_commit`` raised: a mix of two versions."""
        self.incarnation = uuid.uuid4().hex
        # Shared by answers (serving), exclusive for a commit's apply and switch.
        self._lease = ReadWriteLock()
        # Per-transport state (e.g. a process group kept between sessions).
        self.transport_state: dict[str, Any] = {}
        self._sessions: dict[str, _Staging] = {}
        # Ids already used, so a replayed or reused id is refused, and why each one
        # that did not commit ended (bounded memory).
        self._seen: OrderedDict[str, str | None] = OrderedDict()
        self._commits = 0
        self._rejected = 0
        self._dropped: Counter[str] = Counter()
        self._timing = _Timing()
        # The reaper runs as timer callbacks on the engine's loop, never as a task: a
        # task would sleep between rounds for as long as anything is kept, and be
        # destroyed pending ("Task was destroyed but it is pending!") when the loop
        # goes away with the engine. A pending timer or executor future logs nothing.
        self._reaper: asyncio.TimerHandle | None = None
        self._pruning: asyncio.Future[None] | None = None
        self._pruned_at = 0.0
        # Serializes commits: the staleness check and the switch of version must be
        # one critical section, or two sessions committing at once could apply the
        # older version over the newer one.
        self._commit_lock = asyncio.Lock()
        # The private copy of the served buckets (delta base), and their checksums
        # (empty: no base kept; deltas are refused).
        self._base: list[np.ndarray] = []
        self._base_sums: tuple[int, ...] = ()
        self._delta_offered = False

    # ----------------------------------------------------------------- for engines

    def check_manifest(self, manifest: Sequence[BucketManifest]) -> None:
        """Raise :class:`ProtocolError` if the model cannot take these tensors.

        Called at ``begin``; the default accepts everything.
        """

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        """Make the staged buckets the model's weights (all of them, atomically).

        Called by ``commit`` once every bucket was received and validated. The
        buckets may map the train actor's shared memory: read them here, do not
        keep references to them after returning. It runs under the exclusive lease
        (no answer is being served); do not take :meth:`serving` inside it.
        """
        raise NotImplementedError

    async def apply_changes(
        self,
        buckets: Sequence[Bucket],
        changes: Sequence[np.ndarray | None],
        version: int,
    ) -> None:
        """Make the buckets of a delta session the model's weights; only some words changed.

        Called by ``commit`` instead of :meth:`apply` when the session carried a
        delta: ``buckets`` are the whole target snapshot (the engine's kept copy,
        patched and verified against the target's checksums), and ``changes[i]``
        the ascending indices of the 2-byte words of bucket ``i`` that differ
        from the version the model serves now (``None``: unknown, write the whole
        bucket). The model holds that version exactly (the delta's base, checked
        at ``begin_delta`` and again here), so writing only those words makes it
        the target. The default calls :meth:`apply` with the whole buckets (always
        right); :class:`~asyncsync.engines.TensorEngine` writes only the changed
        words. Same rules as :meth:`apply`: under the exclusive lease, no
        references kept after returning.
        """
        await self.apply(buckets, version)

    async def on_commit(self, version: int) -> None:
        """Called at every commit, after :meth:`apply` and before ``version`` serves.

        Under the exclusive lease: no answer runs until it returns. Drop whatever
        was derived from the old weights here (a prefix or KV cache, compiled
        graphs holding old values). The default does nothing. Raising leaves the
        engine serving no version, like a failed :meth:`apply`.
        """

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Stamp]:
        """Hold the served weights for one answer; yields the answer's :class:`Stamp`.

        Commits wait for every answer in flight and hold new ones back while they
        apply, so the weights stay exactly those the stamp names until the block
        ends.
        """
        async with self._lease.read():
            yield self.stamp()

    def stamp(self) -> Stamp:
        """The stamp of the weights served now (take it inside :meth:`serving`)."""
        return Stamp(self.version, self.identity, self.intact)

    # ----------------------------------------------------------------- protocol

    async def engine_info(self) -> EngineInfo:
        """What this engine is and serves (see :class:`EngineInfo`)."""
        return EngineInfo(
            incarnation=self.incarnation,
            node_id=current_node(),
            pid=os.getpid(),
            version=self.version,
            open_sessions=len(self._sessions),
            staged_bytes=sum(s.nbytes for s in self._sessions.values()),
            weights=self.identity,
            intact=self.intact,
        )

    async def begin(
        self,
        session_id: str,
        step: int,
        manifest: Sequence[BucketManifest],
        ttl_s: float | None = None,
    ) -> EngineInfo:
        """Open a session that will deliver ``manifest`` for ``step``; report this engine.

        The staging is dropped if the session has not committed ``ttl_s`` seconds
        after this call (``None``: :data:`DEFAULT_STAGING_TTL_S`). Raises
        :class:`ProtocolError`, :class:`~asyncsync.StaleStepError` (a step
        older than the committed version) or :class:`ProtocolError` (a
        malformed index, a name twice, or what :meth:`check_manifest` refuses);
        nothing is opened then and the id stays unused. A manifest without any tensor
        is refused with :class:`ProtocolError` unless the engine sets
        :attr:`accepts_empty_updates`.
        """
        return await self._open(session_id, step, manifest, ttl_s, None)

    async def _open(
        self,
        session_id: str,
        step: int,
        manifest: Sequence[BucketManifest],
        ttl_s: float | None,
        header: DeltaHeader | None,
    ) -> EngineInfo:
        if not isinstance(session_id, str) or not session_id:
            raise ConfigError(f"begin: session ids are non-empty strings, got {session_id!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < -1:
            raise InvalidStepError(
                f"session {session_id!r}: step must be an int >= -1, got {step!r}"
            )
        if session_id in self._seen:
            raise ProtocolError(f"session id {session_id!r} was already used")
        if self.version is not None and step < self.version:
            raise StaleStepError(
                f"session {session_id!r} carries step {step}, older than the "
                f"committed version {self.version}"
            )
        ttl = DEFAULT_STAGING_TTL_S if ttl_s is None else ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise ConfigError(f"session {session_id!r}: ttl_s must be positive, got {ttl_s!r}")
        if isinstance(manifest, str | bytes) or not isinstance(manifest, Sequence):
            raise ProtocolError(
                f"session {session_id!r}: the manifest must be a sequence of BucketManifest, "
                f"got {type(manifest).__name__}"
            )
        wrong = [i for i, b in enumerate(manifest) if not isinstance(b, BucketManifest)]
        if wrong:
            raise ProtocolError(
                f"session {session_id!r}: manifest entry {wrong[0]} is a "
                f"{type(manifest[wrong[0]]).__name__}, not a BucketManifest"
            )
        check_manifests(manifest)
        if not self.accepts_empty_updates and not any(b.index for b in manifest):
            raise ProtocolError(
                f"session {session_id!r}: step {step} carries no tensor ({len(manifest)} "
                f"empty buckets); an engine that serves weights refuses an empty update "
                f"(was the build's add() awaited, and does this rank own the weights?). An "
                f"engine meant to take one sets accepts_empty_updates = True"
            )
        self.check_manifest(manifest)
        if header is not None:
            self._check_base(session_id, step, manifest, header)
        self._remember(session_id)
        staging = _Staging(step, tuple(manifest), time.monotonic() + ttl)
        if header is not None:
            staging.header, staging.target = header, tuple(manifest)
            staging.manifest = tuple(header.payload)
        self._sessions[session_id] = staging
        self._ensure_reaper()
        return await self.engine_info()

    async def begin_delta(
        self,
        session_id: str,
        step: int,
        manifest: Sequence[BucketManifest],
        header: DeltaHeader,
        ttl_s: float | None = None,
    ) -> EngineInfo:
        """Like :meth:`begin` for the target ``manifest``, but ``receive`` delivers
        the delta buckets of ``header`` (see :mod:`asyncsync.delta`).

        Raises :class:`~asyncsync.DeltaBaseError` (nothing opened, the id unused)
        unless this engine serves exactly the header's base: that step, that
        weights identity, intact, and a kept copy whose every bucket has the
        header's base checksum. At commit the kept copy is patched and every bucket
        must hash to the target's checksum before the model is touched.
        """
        if not isinstance(header, DeltaHeader):
            raise ProtocolError(
                f"session {session_id!r}: the delta header must be a DeltaHeader, got "
                f"{type(header).__name__}"
            )
        return await self._open(session_id, step, manifest, ttl_s, header)

    def _check_base(
        self,
        session_id: str,
        step: int,
        manifest: Sequence[BucketManifest],
        header: DeltaHeader,
    ) -> None:
        check_header(header, manifest)
        self._delta_offered = True  # keep a base from the next full commit on
        why = None
        if not self.keeps_delta_base:
            why = "this engine keeps no copy of its buckets (keeps_delta_base is False)"
        elif not self.intact:
            why = "this engine serves no whole version (an apply failed)"
        elif self.version != header.base_step or self.identity != header.base_weights:
            why = f"this engine serves version {self.version}"
        elif self._base_sums != header.base_checksums:
            why = "its kept buckets differ from the base's checksums"
        if why is not None:
            raise DeltaBaseError(
                f"session {session_id!r}: a delta to step {step} on base step "
                f"{header.base_step} refused: {why}"
            )

    async def receive(self, session_id: str, index: int, payload: Any) -> int:
        """Load bucket ``index`` from ``payload``, validate it and stage it; return its size.

        Raises :class:`ProtocolError`, :class:`ProtocolError`,
        :class:`~asyncsync.ChecksumMismatchError` or a
        :class:`~asyncsync.ProtocolError` of the transport; nothing is staged then.
        """
        staging = self._staging(session_id)
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not 0 <= index < len(staging.manifest)
        ):
            self._rejected += 1
            raise ProtocolError(
                f"session {session_id!r}: bucket index {index!r} outside the manifest "
                f"(0..{len(staging.manifest) - 1})"
            )
        if index in staging.buckets or index in staging.receiving:
            self._rejected += 1
            raise ProtocolError(f"session {session_id!r}: bucket {index} received twice")
        staging.receiving.add(index)
        try:
            expected = staging.manifest[index]
            bucket, load_s, verify_s = await asyncio.to_thread(
                _load_and_verify, payload, expected, self.transport_state
            )
        except BaseException:
            self._rejected += 1
            raise
        finally:
            staging.receiving.discard(index)
            # Loading may have kept something (a mapping) that the reaper must prune.
            self._ensure_reaper()
        self._timing.received_bytes += bucket.nbytes
        self._timing.load_s += load_s
        self._timing.verify_s += verify_s
        # The session may have been dropped while the bucket was loading.
        if self._sessions.get(session_id) is staging:
            staging.buckets[index] = bucket
        return bucket.nbytes

    async def commit(self, session_id: str) -> int:
        """Make the session's weights visible; return the version now served.

        Raises :class:`ProtocolError` (session stays open, nothing applied)
        if a bucket is missing, and :class:`~asyncsync.StaleStepError` (session
        dropped, nothing applied) if a newer version was committed meanwhile. Once
        the copy into the model started it runs to the end, even if this call is
        cancelled: stopping halfway would leave the model a mix of two versions; a
        cancelled call still returns (cancelled) only once the copy has ended.
        """
        staging = self._staging(session_id)
        missing = [i for i in range(len(staging.manifest)) if i not in staging.buckets]
        if missing:
            raise ProtocolError(
                f"session {session_id!r}: commit before buckets {missing[:8]} arrived "
                f"({len(staging.buckets)}/{len(staging.manifest)} received)"
            )
        # Answer only once the copy has ended, even when cancelled (``ray.cancel`` of a
        # session cancels its calls to engines too): whoever holds the memory the copy
        # reads, the train actor's pin of a shared snapshot, holds it until then.
        return await uninterrupted(self._commit(session_id, staging))

    async def _commit(self, session_id: str, staging: _Staging) -> int:
        async with self._commit_lock:
            if self._sessions.get(session_id) is not staging:
                # Dropped while this commit waited for the lock: say why.
                self._staging(session_id)
                raise ProtocolError(f"session {session_id!r} ended before its commit ran")
            if self.version is not None and staging.step < self.version:
                self._drop(session_id, "stale")
                raise StaleStepError(
                    f"session {session_id!r} carries step {staging.step}, older than "
                    f"the version {self.version} committed meanwhile; dropped"
                )
            if staging.header is not None and self.version == staging.step and self.intact:
                # Another session committed this very step first (sessions may run at
                # once): the kept copy is no longer the delta's base, and the engine
                # serves the step already: nothing to apply.
                target_identity = await asyncio.to_thread(weights_identity, staging.target)
                if target_identity == self.identity:
                    self._sessions.pop(session_id, None)
                    _release(staging.buckets)
                    self._commits += 1
                    return staging.step
            ordered = [staging.buckets[i] for i in range(len(staging.manifest))]
            staging.applying = True
            applied = staging.nbytes
            start = time.perf_counter()
            target = staging.target if staging.header is not None else staging.manifest
            try:
                # Verified bucket by bucket against this manifest: the identity of the
                # weights about to serve, by construction (a pass over every tensor's
                # record: off the loop for large models).
                identity = await asyncio.to_thread(weights_identity, target)
                buckets = ordered
                changes: list[np.ndarray | None] | None = None
                if staging.header is not None:
                    buckets, changes = await self._patched(staging)
                    applied = sum(b.nbytes for b in buckets)
                # The kept copy is about to describe other weights: none until re-taken.
                sums, self._base_sums = self._base_sums, ()
                async with self._lease.write():
                    try:
                        if changes is None:
                            await self.apply(buckets, staging.step)
                        else:
                            await self.apply_changes(buckets, changes, staging.step)
                        await self.on_commit(staging.step)
                    except BaseException:
                        # Part of the new weights may be in: serve no version, stamp
                        # none, until a full session commits.
                        self.version, self.identity, self.intact = None, None, False
                        raise
                    self.version, self.identity, self.intact = staging.step, identity, True
                if staging.header is not None:
                    sums = tuple(m.checksum for m in target)  # the patched copy is the target
                elif self.keeps_delta_base and self._delta_offered:
                    # Keep a private copy of the verified bytes now served (the shared
                    # ones may map the train actor's memory): the next delta's base.
                    self._base = await asyncio.to_thread(_copied, self._base, ordered)
                    sums = tuple(m.checksum for m in target)
                else:
                    sums = ()
                self._base_sums = sums
            finally:
                staging.applying = False
                # Let go of the buckets now, not when a garbage collection finds the
                # last cycle that reaches them: they may map the train actor's memory.
                _release(ordered, staging.buckets)
            self._timing.apply_s += time.perf_counter() - start
            self._timing.applied_bytes += applied
            self._sessions.pop(session_id, None)
            self._commits += 1
            for other, held in list(self._sessions.items()):
                if held.step < staging.step:
                    self._drop(
                        other,
                        "superseded",
                        f" by version {staging.step}, committed while it carried the older "
                        f"step {held.step}",
                    )
            return staging.step

    async def _patched(self, staging: _Staging) -> tuple[list[Bucket], list[np.ndarray | None]]:
        """A delta session's target buckets: the kept copy, patched and verified.

        On a mismatch (or any failure) the kept copy is dropped (deltas are refused
        until a full session commits) and the model is untouched.
        """
        assert staging.header is not None
        header = staging.header
        if (
            self._base_sums != header.base_checksums
            or not self.intact
            or (self.version, self.identity) != (header.base_step, header.base_weights)
        ):
            raise DeltaBaseError(
                f"step {staging.step}: the kept base changed since the delta began "
                f"(base step {staging.header.base_step})"
            )
        payloads = [staging.buckets[i] for i in range(len(staging.manifest))]
        self._base_sums = ()
        try:
            changes = await asyncio.to_thread(
                functools.partial(
                    patch_and_verify,
                    self._base,
                    staging.header,
                    staging.target,
                    payloads,
                    threads=delta_threads(),
                )
            )
        except BaseException:
            self._base = []
            raise
        buckets = [
            Bucket(kept, m.index, m.checksum)
            for kept, m in zip(self._base, staging.target, strict=True)
        ]
        return buckets, changes

    async def abort(self, session_id: str) -> None:
        """Drop the session's staging; idempotent, unknown ids are ignored.

        A commit already applying is not interrupted (see :meth:`commit`). Raises
        :class:`ProtocolError` for an id that is not a string.
        """
        if not isinstance(session_id, str):
            self._staging(session_id)  # raises, naming it
        self._drop(session_id, "aborted")

    async def transport_setup(self, transport: str, config: Any) -> Any:
        """Run transport ``transport``'s engine-side set-up (e.g. join a process group).

        Called by the train side of transports that need one before they send.
        Runs the set-up function the transport registry names for ``transport``
        (see :mod:`asyncsync.transport`) in a worker thread (it may block, e.g. on
        a rendezvous) with ``(self.transport_state, config)`` and returns its
        result. Raises :class:`~asyncsync.ConfigError` for an unknown transport or
        one without an engine-side set-up.
        """
        setup = backend(transport).engine_setup()
        if setup is None:
            raise ConfigError(f"transport {transport!r} has no engine-side set-up")
        return await asyncio.to_thread(setup, self.transport_state, config)

    async def receiver_stats(self) -> ReceiverStats:
        return ReceiverStats(
            version=self.version,
            incarnation=self.incarnation,
            open_sessions=tuple(self._sessions),
            staged_bytes=sum(s.nbytes for s in self._sessions.values()),
            commits=self._commits,
            aborts=self._dropped["aborted"],
            rejected_buckets=self._rejected,
            dropped=dict(self._dropped),
            received_bytes=self._timing.received_bytes,
            load_s=self._timing.load_s,
            verify_s=self._timing.verify_s,
            applied_bytes=self._timing.applied_bytes,
            apply_s=self._timing.apply_s,
            kept_bytes=self._kept_bytes(),
        )

    # ----------------------------------------------------------------- helpers

    def _staging(self, session_id: str) -> _Staging:
        if not isinstance(session_id, str):
            raise ProtocolError(
                f"no open session {session_id!r}: session ids are strings, got "
                f"{type(session_id).__name__}"
            )
        staging = self._sessions.get(session_id)
        if staging is not None:
            return staging
        ended = self._seen.get(session_id)
        if ended is not None and ended.startswith("superseded"):
            raise StaleStepError(f"session {session_id!r} was dropped: {ended}")
        why = ended or "never begun, or already committed"
        raise ProtocolError(f"no open session {session_id!r} ({why})")

    def _drop(self, session_id: str, reason: str, detail: str = "") -> None:
        staging = self._sessions.get(session_id)
        if staging is not None and not staging.applying:
            del self._sessions[session_id]
            _release(staging.buckets)
            self._dropped[reason] += 1
            if session_id in self._seen:
                self._seen[session_id] = f"{reason}{detail}"

    def _remember(self, session_id: str) -> None:
        self._seen[session_id] = None
        while len(self._seen) > _REMEMBERED_SESSIONS:
            self._seen.popitem(last=False)

    def _ensure_reaper(self) -> None:
        if self._pruning is not None:
            return  # the next round is scheduled when the pruning ends
        if self._reaper is None:
            self._pruned_at = time.monotonic()
        self._schedule_reap()

    def _schedule_reap(self) -> None:
        """Schedule the next round: at the soonest expiry, at most a second from now.

        A round already scheduled earlier stays; one scheduled later (a session with
        a shorter time to live began since) is moved up.
        """
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        soonest = min(
            (s.expires_at for s in self._sessions.values()), default=now + _REAP_INTERVAL_S
        )
        when = loop.time() + min(max(soonest - now, 0.01), _REAP_INTERVAL_S)
        if self._reaper is not None:
            if self._reaper.when() <= when:
                return
            self._reaper.cancel()
        self._reaper = loop.call_at(when, self._reap)

    def _reap(self) -> None:
        """Drop staging whose time to live passed; prune what transports keep once a second.

        Runs while a session is open or a transport keeps anything between sessions,
        each round a timer callback; the pruning (blocking) runs in a worker thread
        and schedules the next round when it is done.
        """
        self._reaper = None
        if not (self._sessions or self._kept_bytes()):
            return
        now = time.monotonic()
        for session_id, staging in list(self._sessions.items()):
            if staging.expires_at <= now:
                self._drop(session_id, "expired")
        if now - self._pruned_at < _REAP_INTERVAL_S:
            self._schedule_reap()
            return
        self._pruned_at = now
        self._pruning = asyncio.get_running_loop().run_in_executor(None, self._prune_kept)
        self._pruning.add_done_callback(self._pruned)

    def _pruned(self, pruning: asyncio.Future[None]) -> None:
        self._pruning = None
        self._pruned_at = time.monotonic()
        self._schedule_reap()
        if not pruning.cancelled():
            pruning.result()  # a failed prune is reported (by the loop), the reaper goes on

    def _kept(self) -> list[KeptState]:
        return [s for s in list(self.transport_state.values()) if isinstance(s, KeptState)]

    def _kept_bytes(self) -> int:
        return sum(s.nbytes for s in self._kept())

    def _prune_kept(self) -> None:
        for kept in self._kept():
            kept.prune()


def current_node() -> str | None:
    """The Ray node id of this process (``None`` outside Ray)."""
    try:
        import ray
    except ImportError:  # an engine tested outside Ray
        return None
    if not ray.is_initialized():
        return None
    node: str = ray.get_runtime_context().get_node_id()
    return node


@dataclass
class _Timing:
    """Running totals behind the time fields of :class:`ReceiverStats` (loop thread only)."""

    received_bytes: int = 0
    load_s: float = 0.0
    verify_s: float = 0.0
    applied_bytes: int = 0
    apply_s: float = 0.0


def _copied(old: list[np.ndarray], buckets: Sequence[Bucket]) -> list[np.ndarray]:
    """Worker thread: private copies of ``buckets``, reusing ``old``'s arrays where
    their sizes match (the loop assigns the result: this thread touches no state)."""
    reuse = old if len(old) == len(buckets) else []
    kept = []
    for i, bucket in enumerate(buckets):
        array = reuse[i] if reuse and reuse[i].nbytes == bucket.nbytes else None
        if array is None:
            array = np.empty(bucket.nbytes, dtype=np.uint8)
        np.copyto(array, bucket.buffer)
        kept.append(array)
    return kept


def _release(*holders: list[Bucket] | dict[int, Bucket]) -> None:
    """Drop these buckets in a worker thread: unmapping a large shared region takes
    milliseconds (page tables), too long for the event loop."""
    moved = [list(h.values()) if isinstance(h, dict) else list(h) for h in holders]
    for holder in holders:
        holder.clear()
    if any(moved):
        asyncio.get_running_loop().run_in_executor(None, moved.clear)


def _load_and_verify(
    payload: Any, expected: BucketManifest, state: dict[str, Any]
) -> tuple[Bucket, float, float]:
    """The bucket, and the seconds loading it and verifying it took."""
    start = time.perf_counter()
    bucket = load_payload(payload, state)
    loaded = time.perf_counter()
    bucket.verify(expected)
    return bucket, loaded - start, time.perf_counter() - loaded
