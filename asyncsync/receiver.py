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
"""

from __future__ import annotations

import asyncio
import importlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .buckets import Bucket, BucketManifest, check_manifests
from .errors import (
    ConfigError,
    IncompleteSessionError,
    ManifestMismatchError,
    SessionIdReusedError,
    StaleStepError,
    UnknownSessionError,
)
from .transport import load_payload, transport_names

__all__ = ["ReceiverStats", "StagingReceiver"]

_REMEMBERED_SESSIONS = 4096


@dataclass(eq=False)
class _Staging:
    version: int
    manifest: tuple[BucketManifest, ...]
    buckets: dict[int, Bucket] = field(default_factory=dict)
    receiving: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class ReceiverStats:
    version: int | None
    open_sessions: tuple[str, ...]
    commits: int
    aborts: int
    rejected_buckets: int


class StagingReceiver:
    """Engine-side session protocol with staging and all-or-nothing commit."""

    def __init__(self) -> None:
        self.version: int | None = None
        # Per-transport state (e.g. a process group kept between sessions).
        self.transport_state: dict[str, Any] = {}
        self._sessions: dict[str, _Staging] = {}
        # Ids already used, so a replayed or reused id is refused (bounded memory).
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._commits = 0
        self._aborts = 0
        self._rejected = 0
        # Serializes commits: the staleness check and the switch of version must be
        # one critical section, or two sessions committing at once could apply the
        # older version over the newer one.
        self._commit_lock = asyncio.Lock()

    # ----------------------------------------------------------------- for engines

    def check_manifest(self, manifest: Sequence[BucketManifest]) -> None:
        """Raise :class:`ManifestMismatchError` if the model cannot take these tensors.

        Called at ``begin``; the default accepts everything.
        """

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        """Make the staged buckets the model's weights (all of them, atomically).

        Called by ``commit`` once every bucket was received and validated.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------- protocol

    async def begin(
        self, session_id: str, version: int, manifest: Sequence[BucketManifest]
    ) -> None:
        """Open a session that will deliver ``manifest`` for ``version``.

        Raises :class:`SessionIdReusedError`, :class:`~asyncsync.StaleStepError` (a
        version older than the committed one) or :class:`ManifestMismatchError` (a
        malformed index, a name twice, or what :meth:`check_manifest` refuses);
        nothing is opened then and the id stays unused.
        """
        if session_id in self._seen:
            raise SessionIdReusedError(f"session id {session_id!r} was already used")
        if self.version is not None and version < self.version:
            raise StaleStepError(
                f"session {session_id!r} carries version {version}, older than the "
                f"committed version {self.version}"
            )
        check_manifests(manifest)
        self.check_manifest(manifest)
        self._remember(session_id)
        self._sessions[session_id] = _Staging(version, tuple(manifest))

    async def receive(self, session_id: str, index: int, payload: Any) -> int:
        """Load bucket ``index`` from ``payload``, validate it and stage it; return its size.

        Raises :class:`UnknownSessionError`, :class:`ManifestMismatchError` or
        :class:`~asyncsync.ChecksumMismatchError`; nothing is staged then.
        """
        staging = self._staging(session_id)
        if not 0 <= index < len(staging.manifest):
            self._rejected += 1
            raise ManifestMismatchError(
                f"session {session_id!r}: bucket index {index} outside the manifest "
                f"(0..{len(staging.manifest) - 1})"
            )
        if index in staging.buckets or index in staging.receiving:
            self._rejected += 1
            raise ManifestMismatchError(f"session {session_id!r}: bucket {index} received twice")
        staging.receiving.add(index)
        try:
            expected = staging.manifest[index]
            bucket = await asyncio.to_thread(
                _load_and_verify, payload, expected, self.transport_state
            )
        except BaseException:
            self._rejected += 1
            raise
        finally:
            staging.receiving.discard(index)
        # The session may have been aborted while the bucket was loading.
        if self._sessions.get(session_id) is staging:
            staging.buckets[index] = bucket
        return bucket.nbytes

    async def commit(self, session_id: str) -> int:
        """Make the session's weights visible; return the version now served.

        Raises :class:`IncompleteSessionError` (session stays open, nothing applied)
        if a bucket is missing, and :class:`~asyncsync.StaleStepError` (session
        dropped, nothing applied) if a newer version was committed meanwhile. Once
        the copy into the model started it runs to the end, even if this call is
        cancelled: stopping halfway would leave the model a mix of two versions.
        """
        staging = self._staging(session_id)
        missing = [i for i in range(len(staging.manifest)) if i not in staging.buckets]
        if missing:
            raise IncompleteSessionError(
                f"session {session_id!r}: commit before buckets {missing[:8]} arrived "
                f"({len(staging.buckets)}/{len(staging.manifest)} received)"
            )
        commit = asyncio.ensure_future(self._commit(session_id, staging))
        # If we are cancelled, nobody awaits the commit's outcome: retrieve it.
        commit.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(commit)

    async def _commit(self, session_id: str, staging: _Staging) -> int:
        async with self._commit_lock:
            if self._sessions.get(session_id) is not staging:
                raise UnknownSessionError(
                    f"session {session_id!r} was aborted before its commit could run"
                )
            if self.version is not None and staging.version < self.version:
                del self._sessions[session_id]
                self._aborts += 1
                raise StaleStepError(
                    f"session {session_id!r} carries version {staging.version}, older than "
                    f"the version {self.version} committed meanwhile; dropped"
                )
            ordered = [staging.buckets[i] for i in range(len(staging.manifest))]
            await self.apply(ordered, staging.version)
            self._sessions.pop(session_id, None)
            self.version = staging.version
            self._commits += 1
            return staging.version

    async def abort(self, session_id: str) -> None:
        """Drop the session's staging; idempotent, unknown ids are ignored."""
        if self._sessions.pop(session_id, None) is not None:
            self._aborts += 1

    async def transport_setup(self, transport: str, config: Any) -> Any:
        """Run transport ``transport``'s engine-side set-up (e.g. join a process group).

        Called by the train side of transports that need one before they send.
        Runs ``asyncsync.transport.<transport>.engine_setup(self.transport_state,
        config)`` in a worker thread (it may block, e.g. on a rendezvous) and returns
        its result. Raises :class:`~asyncsync.ConfigError` for an unknown transport or
        one without an engine-side set-up.
        """
        if transport not in transport_names():
            raise ConfigError(
                f"unknown transport {transport!r}; choose one of {', '.join(transport_names())}"
            )
        return await asyncio.to_thread(_transport_setup, transport, self.transport_state, config)

    async def receiver_stats(self) -> ReceiverStats:
        return ReceiverStats(
            version=self.version,
            open_sessions=tuple(self._sessions),
            commits=self._commits,
            aborts=self._aborts,
            rejected_buckets=self._rejected,
        )

    # ----------------------------------------------------------------- helpers

    def _staging(self, session_id: str) -> _Staging:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSessionError(
                f"no open session {session_id!r} (never begun, committed or aborted)"
            ) from None

    def _remember(self, session_id: str) -> None:
        self._seen[session_id] = None
        while len(self._seen) > _REMEMBERED_SESSIONS:
            self._seen.popitem(last=False)


def _transport_setup(transport: str, state: dict[str, Any], config: Any) -> Any:
    # In a worker thread: the first use imports the transport's module.
    module = importlib.import_module(f"{__package__}.transport.{transport}")
    setup = getattr(module, "engine_setup", None)
    if setup is None:
        raise ConfigError(f"transport {transport!r} has no engine-side set-up")
    return setup(state, config)


def _load_and_verify(payload: Any, expected: BucketManifest, state: dict[str, Any]) -> Bucket:
    bucket = load_payload(payload, state)
    bucket.verify(expected)
    return bucket
