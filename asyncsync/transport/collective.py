"""Collective transport: the cache owner broadcasts each bucket to the engines.

The train actor (the cache owner, rank 0) and the session's engines (ranks 1..n,
in the order of ``SyncPlan.targets``) form a private torch.distributed process
group: gloo on CPU, NCCL where the owner and every engine have CUDA
(``backend="auto"``). The owner starts a :class:`~torch.distributed.TCPStore` on
a free port of ``host`` and asks each engine to join through the receiver's
``transport_setup("collective", ...)`` hook (see
:meth:`~asyncsync.receiver.StagingReceiver.transport_setup`), which runs
:func:`engine_setup` in an engine worker thread. The group is kept while the
targets stay the same (same names, same actors) and rebuilt when they change,
after a failed session, or on :meth:`CollectiveTransport.close`. Nothing here
touches the default process group.

Per session: :meth:`~CollectiveTransport.start` announces the bucket sizes to
every engine, whose pump thread then receives the buckets in index order;
:meth:`~CollectiveTransport.put` submits the broadcast of one bucket to the
owner's broadcast thread and returns at once with a :class:`CollectivePayload`;
the engine's ``receive`` takes the bucket from the pump in
:meth:`CollectivePayload.load` and verifies it against the manifest before it
is staged. ``release`` waits for the owner's broadcast of its bucket. After a
failure ``finish`` waits for running broadcasts only briefly: gloo cannot
interrupt a send to a peer that died (it ends at ``timeout_s``), and a broadcast
only reads its bucket, whose memory its own reference keeps alive.

Sessions through one transport run one at a time (a second waits in ``start``,
within its own session timeout). Every collective is bounded by ``timeout_s``
and forming a group by ``connect_timeout_s``; an engine that dies or never joins
fails the session with a :class:`~asyncsync.SessionError` naming it, the group
is dropped, and the next session builds a new one. Engines keep their version,
as with every transport. Engines on other nodes reach ``host``: by default the
owner's Ray node address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..buckets import Bucket, BucketManifest
from ..errors import ConfigError, SessionError, first_session_error, last_line
from . import SessionContext
from ._collective import (
    BACKENDS,
    GLOO,
    NCCL,
    STATE_KEY,
    Announce,
    EngineGroups,
    Join,
    Leave,
    NotJoinedError,
    Probe,
    RootGroup,
    nccl_usable,
)

__all__ = ["CollectivePayload", "CollectiveStats", "CollectiveTransport", "engine_setup"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_LEAVE_TIMEOUT_S = 5.0
"""Bound on telling the engines of a dropped group to leave it (best effort)."""
_FAILED_GRACE_S = 1.0
"""How long a failed session waits for the owner's broadcasts still running."""
_CALL_SLACK_S = 10.0
"""Extra time an engine call may take beyond the collective bound it waits on."""


@dataclass(frozen=True)
class CollectivePayload:
    """What an engine's ``receive`` gets: which bucket of which group and session.

    ``manifest`` is what the owner sent; the receiver checks the bytes against the
    manifest it was given at ``begin``.
    """

    owner: str
    group_id: str
    session_id: str
    index: int
    manifest: BucketManifest

    def load(self, state: dict[str, Any]) -> Bucket:
        """Wait for the bucket from this engine's pump (blocking; an engine worker thread).

        Raises ``RuntimeError`` if the engine is not in the group (restarted, or the
        group was replaced), the broadcast failed, or nothing arrived within the
        group's timeout.
        """
        groups = state.get(STATE_KEY)
        if not isinstance(groups, EngineGroups):
            raise RuntimeError("this engine never joined a collective group (was it restarted?)")
        payload = groups.get(self.owner, self.group_id).take(self.session_id, self.index)
        return Bucket(payload, self.manifest.index, self.manifest.checksum)


def engine_setup(state: dict[str, Any], config: Any) -> Any:
    """Engine side of the transport's set-up; blocking, run in an engine worker thread.

    ``state`` is the receiver's ``transport_state``; ``config`` one of the owner's
    messages (probe, join, announce, leave). Returns the probe's answer, else ``None``.
    """
    groups = state.setdefault(STATE_KEY, EngineGroups())
    assert isinstance(groups, EngineGroups)
    if isinstance(config, Probe):
        return {"nccl": nccl_usable()}
    if isinstance(config, Join):
        groups.join(config)
    elif isinstance(config, Announce):
        groups.get(config.owner, config.group_id).announce(config.session_id, config.sizes)
    elif isinstance(config, Leave):
        groups.leave(config)
    else:
        raise TypeError(f"not a collective set-up message: {type(config).__name__}")
    return None


@dataclass(frozen=True)
class CollectiveStats:
    """The transport's current group (``None`` fields: no group now) and its counters.

    ``groups_built`` counts every group formed or attempted; ``broadcasts`` and
    ``bytes_broadcast`` count buckets submitted by ``put``.
    """

    group_id: str | None
    backend: str | None
    members: tuple[str, ...]
    groups_built: int
    sessions: int
    broadcasts: int
    bytes_broadcast: int


class CollectiveTransport:
    """Train side: broadcast buckets from the cache owner to the engines.

    Args:
        host: address the engines reach the owner at (store and gloo). ``None``:
            the Ray node address of this process.
        backend: ``"auto"`` (NCCL when the owner and every engine have CUDA, else
            gloo), ``"gloo"`` or ``"nccl"``.
        timeout_s: bound on each collective (one bucket to every engine).
        connect_timeout_s: bound on forming a group.

    The NCCL device is the owner's current CUDA device when the transport is
    created; each engine uses its own current device.
    """

    name = "collective"

    def __init__(
        self,
        *,
        host: str | None = None,
        backend: str = "auto",
        timeout_s: float = 120.0,
        connect_timeout_s: float = 60.0,
    ) -> None:
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ConfigError("timeout_s and connect_timeout_s must be positive")
        if host is None:
            import ray

            host = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        self.host: str = host
        self.backend = backend
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._device = (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        )
        # Tells this transport's groups apart on an engine that serves several owners.
        self._owner = uuid.uuid4().hex
        # One session at a time: a group's broadcasts must follow one order.
        self._session_lock = asyncio.Lock()
        # Owned by the session holding _session_lock (and close()).
        self._active: str | None = None
        self._group: RootGroup | None = None
        self._targets: dict[str, Any] = {}
        self._broadcasts: dict[int, asyncio.Future[None]] = {}
        self._generation = 0
        self._sessions = 0
        self._sent = 0
        self._sent_bytes = 0

    def stats(self) -> CollectiveStats:
        group = self._group
        return CollectiveStats(
            group_id=group.group_id if group else None,
            backend=group.backend if group else None,
            members=group.members if group else (),
            groups_built=self._generation,
            sessions=self._sessions,
            broadcasts=self._sent,
            bytes_broadcast=self._sent_bytes,
        )

    def __repr__(self) -> str:
        group = self._group
        where = (
            f"{group.backend} group {group.group_id[:8]} {list(group.members)}"
            if group
            else "no group"
        )
        return (
            f"<CollectiveTransport {self.host} {where} built={self._generation} "
            f"active={self._active}>"
        )

    # ----------------------------------------------------------------- protocol

    async def start(self, session: SessionContext) -> None:
        await self._session_lock.acquire()
        self._active = session.session_id
        self._broadcasts = {}
        self._sessions += 1
        group = self._group
        if group is None or group.failure is not None or self._targets != dict(session.targets):
            await self._drop_group("rebuilt for new targets or after a failure")
            group = await self._build_group(session)
        sizes = tuple(m.nbytes for m in session.manifest)
        announce = Announce(self._owner, group.group_id, session.session_id, sizes)
        await self._on_engines(
            session,
            "collective set-up (announce)",
            lambda name, handle: handle.transport_setup.remote(self.name, announce),
            self.connect_timeout_s,
        )

    async def put(self, session: SessionContext, index: int, bucket: Bucket) -> Any:
        group = self._session_group(session)
        if group.failure is not None:
            raise SessionError(
                f"session {session.session_id} (step {session.step}): the collective group "
                f"failed: {type(group.failure).__name__}: {group.failure}",
                session_id=session.session_id,
                step=session.step,
            )
        # Queued on the group's one thread: broadcasts leave in index order, and the
        # loop stays free while they run.
        done = asyncio.wrap_future(group.executor.submit(group.broadcast, bucket.buffer))
        self._broadcasts[index] = done
        self._sent += 1
        self._sent_bytes += bucket.nbytes
        return CollectivePayload(
            self._owner, group.group_id, session.session_id, index, bucket.manifest
        )

    async def release(self, session: SessionContext, index: int, payload: Any) -> None:
        done = self._broadcasts.pop(index, None)
        if done is None:
            return
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self._broadcasts[index] = done  # finish() accounts for it
            raise
        except Exception as exc:
            raise SessionError(
                f"session {session.session_id} (step {session.step}): broadcast of bucket "
                f"{index} failed on the owner: {type(exc).__name__}: {exc}",
                session_id=session.session_id,
                step=session.step,
            ) from exc

    async def finish(self, session: SessionContext, ok: bool) -> None:
        if self._active != session.session_id:
            return  # start() never ran for this session
        try:
            group = self._group
            if not ok and group is not None and group.failure is None:
                # Broadcasts still queued fail at once instead of waiting for engines
                # that gave up on this session.
                group.failure = RuntimeError(f"session {session.session_id} failed")
            pending = list(self._broadcasts.values())
            for done in pending:
                # Retrieved whenever it ends: no "exception never retrieved" noise.
                done.add_done_callback(_retrieve)
            if pending:
                # On success every broadcast is over (each engine acknowledged it). After
                # a failure one may still be running: gloo cannot interrupt an operation,
                # and a send to a peer that died can wait out the whole timeout_s. It only
                # reads its bucket (held alive by its own reference), so the pin need not
                # wait for it: give it a short grace, then leave it to end on its own
                # thread while the group is dropped.
                await asyncio.wait(pending, timeout=None if ok else _FAILED_GRACE_S)
            if group is not None and group.failure is not None:
                await self._drop_group(f"session {session.session_id} failed")
        except Exception:
            logger.exception("collective transport: finishing session %s", session.session_id)
        finally:
            self._broadcasts = {}
            self._active = None
            self._session_lock.release()

    async def close(self) -> None:
        await self._drop_group("the transport closed")

    # ----------------------------------------------------------------- groups

    def _session_group(self, session: SessionContext) -> RootGroup:
        if self._active != session.session_id or self._group is None:
            raise RuntimeError(f"session {session.session_id} has not started on this transport")
        return self._group

    async def _build_group(self, session: SessionContext) -> RootGroup:
        targets = dict(session.targets)
        backend = await self._choose_backend(session)
        self._generation += 1
        group = RootGroup(
            tuple(targets),
            self._generation,
            backend,
            self.host,
            self.timeout_s,
            self.connect_timeout_s,
            self._device if backend == NCCL else None,
        )
        # Set before forming it, so finish() drops it if forming fails.
        self._group = group
        self._targets = targets
        loop = asyncio.get_running_loop()
        port = await loop.run_in_executor(group.executor, group.open_store)
        join = Join(
            owner=self._owner,
            group_id=group.group_id,
            generation=group.generation,
            host=self.host,
            port=port,
            rank=0,
            size=group.size,
            backend=backend,
            timeout_s=self.timeout_s,
            connect_timeout_s=self.connect_timeout_s,
        )
        ranks = {name: rank for rank, name in enumerate(targets, start=1)}

        async def owner_side() -> None:
            try:
                await asyncio.wrap_future(group.executor.submit(group.connect))
            except NotJoinedError as exc:
                group.failure = exc
                missing = [group.members[r - 1] for r in exc.missing]
                raise SessionError(
                    f"session {session.session_id} (step {session.step}): "
                    + (
                        f"target {missing[0]!r} never joined the collective group within "
                        f"{self.connect_timeout_s}s"
                        if missing
                        else f"the collective group could not form: {exc}"
                    ),
                    session_id=session.session_id,
                    step=session.step,
                    target=missing[0] if missing else None,
                ) from exc

        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(owner_side())
                tasks.create_task(
                    self._on_engines(
                        session,
                        "joining the collective group",
                        lambda name, handle: handle.transport_setup.remote(
                            self.name, dataclasses.replace(join, rank=ranks[name])
                        ),
                        self.connect_timeout_s,
                    )
                )
        except BaseExceptionGroup as errors:
            group.failure = group.failure or RuntimeError("forming the group failed")
            raise first_session_error(errors) from None
        return group

    async def _choose_backend(self, session: SessionContext) -> str:
        if self.backend != "auto":
            return self.backend
        if self._device is None or not nccl_usable():
            return GLOO
        answers = await self._on_engines(
            session,
            "collective set-up (probe)",
            lambda name, handle: handle.transport_setup.remote(self.name, Probe()),
            self.connect_timeout_s,
        )
        return NCCL if all(a.get("nccl") for a in answers.values()) else GLOO

    async def _drop_group(self, reason: str) -> None:
        """Forget the current group; close it on its thread and tell its engines to leave."""
        group, targets = self._group, self._targets
        self._group, self._targets = None, {}
        if group is None:
            return
        if group.failure is None:
            group.failure = RuntimeError(f"group dropped: {reason}")
        # Queued behind any broadcast still running; the thread exits after it.
        group.executor.submit(group.close)
        group.executor.shutdown(wait=False)
        leave = Leave(self._owner, group.group_id)

        async def tell(handle: Any) -> None:
            try:
                async with asyncio.timeout(_LEAVE_TIMEOUT_S):
                    await handle.transport_setup.remote(self.name, leave)
            except Exception:  # a dead or stuck engine has nothing to leave
                pass

        await asyncio.gather(*(tell(h) for h in targets.values()))

    async def _on_engines(
        self,
        session: SessionContext,
        what: str,
        call: Callable[[str, Any], Awaitable[Any]],
        bound_s: float,
    ) -> dict[str, Any]:
        """``call(name, handle)`` on every target at once; the first failure is a SessionError."""
        results: dict[str, Any] = {}

        async def one(name: str, handle: Any) -> None:
            results[name] = await _as_target(
                session, name, what, call(name, handle), bound_s + _CALL_SLACK_S
            )

        try:
            async with asyncio.TaskGroup() as tasks:
                for name, handle in session.targets.items():
                    tasks.create_task(one(name, handle))
        except BaseExceptionGroup as errors:
            raise first_session_error(errors) from None
        return results


async def _as_target(
    session: SessionContext, name: str, what: str, call: Awaitable[T], bound_s: float
) -> T:
    timer = asyncio.timeout(bound_s)
    try:
        async with timer:
            return await call
    except asyncio.CancelledError:
        # Another target failed or the session ended: stop the engine-side call too,
        # or a join stuck waiting for its peers would hold an engine slot until its
        # own timeout.
        _cancel_remote(call)
        raise
    except Exception as exc:
        if timer.expired():
            _cancel_remote(call)
            detail = f"no answer within {bound_s:.0f}s"
        else:
            detail = f"{type(exc).__name__}: {last_line(exc)}"
        raise SessionError(
            f"session {session.session_id} (step {session.step}): target {name!r} failed in "
            f"{what}: {detail}",
            session_id=session.session_id,
            step=session.step,
            target=name,
        ) from exc


def _retrieve(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()


def _cancel_remote(call: object) -> None:
    import ray

    if isinstance(call, ray.ObjectRef):
        ray.cancel(call)
