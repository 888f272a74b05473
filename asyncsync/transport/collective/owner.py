"""Owner (train) side of the collective transport: the cache owner is rank 0.

:class:`CollectiveTransport` is what a sync session drives on the train actor's
loop (``start``, ``put``, ``release``, ``finish``); :class:`RootGroup` is rank 0's
end of one process group, with the one thread every blocking step of it runs on.

What this side promises:

* Sessions run one at a time (a second waits in ``start``, within its own session
  timeout): a group's broadcasts must follow one order.
* The group is kept while the engines stay the same (same names, same actors) and
  rebuilt when they change, after a failed session, or on ``close``. Nothing here
  touches the default process group.
* ``put`` returns at once: broadcasts leave in index order on the group's thread,
  and the loop keeps answering while they run.
* Forming a group is bounded by ``connect_timeout_s``, every call to an engine by
  that bound plus some slack, every broadcast by ``timeout_s``. An engine that dies
  or never joins fails the session with a :class:`~asyncsync.SessionError` naming
  it; the group is dropped and the next session builds a new one.
* Every error it raises is a :class:`~asyncsync.SessionError` that names the
  session, its step and this transport, and the bucket or engine at fault
  (options: :class:`~asyncsync.ConfigError`).
* ``finish`` never raises. After a failure it waits for running broadcasts only
  briefly: gloo cannot interrupt a send to a peer that died (it ends at
  ``timeout_s``), and a broadcast only reads its bucket, whose memory its own
  reference keeps alive.
* Every call to the engines goes through one method,
  :meth:`CollectiveTransport._on_engines`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from ..._checks import is_number
from ...buckets import Bucket
from ...errors import ConfigError, SessionError, first_session_error, last_line
from .. import SessionContext
from .engine import CollectivePayload
from .wire import (
    BACKENDS,
    GLOO,
    NCCL,
    Announce,
    Channel,
    Join,
    Leave,
    Probe,
    arrived_key,
    nccl_usable,
    new_process_group,
    timedelta,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

_BACKEND_OPTIONS = ("auto", *BACKENDS)
_LEAVE_TIMEOUT_S = 5.0
"""Bound on telling the engines of a dropped group to leave it (best effort)."""
_FAILED_GRACE_S = 1.0
"""How long a failed session waits for the owner's broadcasts still running."""
_CALL_SLACK_S = 10.0
"""Extra time an engine call may take beyond the collective bound it waits on."""


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
        host: address the engines reach the owner at (store and gloo); it must be
            an address of this host. ``None``: the Ray node address of this process.
        backend: ``"auto"`` (NCCL when the owner and every engine have CUDA, else
            gloo), ``"gloo"`` or ``"nccl"``.
        timeout_s: bound on each collective (one bucket to every engine).
        connect_timeout_s: bound on forming a group.

    The NCCL device is the owner's current CUDA device when the transport is
    created; each engine uses its own current device.

    Raises :class:`~asyncsync.ConfigError` for an unknown backend, a timeout that is
    not a positive finite number of seconds, or a host that is not a non-empty string.
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
        if backend not in _BACKEND_OPTIONS:
            raise ConfigError(
                f"collective transport: backend must be one of {_BACKEND_OPTIONS}, got {backend!r}"
            )
        for option, seconds in (("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if not _positive_seconds(seconds):
                raise ConfigError(
                    f"collective transport: {option} must be a positive, finite number of "
                    f"seconds, got {seconds!r}"
                )
        if host is not None and (not isinstance(host, str) or not host):
            raise ConfigError(
                f"collective transport: host must be a non-empty address or None, got {host!r}"
            )
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
        # Owned by the session holding _session_lock (and close()). _formed_by is the
        # session that formed _group: its engines are the group's members.
        self._active: str | None = None
        self._group: RootGroup | None = None
        self._formed_by: SessionContext | None = None
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
        group, formed_by = self._group, self._formed_by
        if (
            group is None
            or group.failure is not None
            or formed_by is None
            or dict(formed_by.engines) != dict(session.engines)
        ):
            await self._drop_group("rebuilt for new engines or after a failure")
            group = await self._build_group(session)
        sizes = tuple(m.nbytes for m in session.manifest)
        announce = Announce(self._owner, group.group_id, session.session_id, sizes)
        await self._on_engines(
            session,
            "collective set-up (announce)",
            lambda name: announce,
            bound_s=self.connect_timeout_s + _CALL_SLACK_S,
        )

    async def put(self, session: SessionContext, index: int, bucket: Bucket) -> Any:
        group = self._session_group(session, index)
        if group.failure is not None:
            raise self._error(
                session,
                f"bucket {index} not sent: collective group {group.group_id} failed: "
                f"{group.failure}",
            )
        # Queued on the group's one thread: broadcasts leave in index order, and the
        # loop stays free while they run.
        done = asyncio.wrap_future(group.executor.submit(group.broadcast, index, bucket.buffer))
        self._broadcasts[index] = done
        self._sent += 1
        self._sent_bytes += bucket.nbytes
        return CollectivePayload(
            self._owner, group.group_id, session.session_id, index, bucket.manifest
        )

    async def release(self, session: SessionContext, index: int, payload: Any) -> None:
        # Called once every engine still in the session has acknowledged this
        # bucket, which also happens when the last engine without it leaves the
        # session (it failed, its node went): then the broadcast may have failed,
        # or may still be sending to a peer that died (gloo cannot interrupt it
        # before timeout_s). Neither is this release's failure: the engines left
        # have the bucket, verified; a failed broadcast has set the group's
        # failure, which fails the next put and makes finish() drop the group;
        # finish() also waits for a broadcast still running.
        done = self._broadcasts.get(index)
        if done is not None and done.done():
            del self._broadcasts[index]
            _retrieve(done)

    async def finish(self, session: SessionContext, ok: bool) -> None:
        if self._active != session.session_id:
            return  # start() never ran for this session
        try:
            group = self._group
            if not ok and group is not None and group.failure is None:
                # Broadcasts still queued fail at once instead of waiting for engines
                # that gave up on this session.
                group.failure = f"session {session.session_id} failed"
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

    def _session_group(self, session: SessionContext, index: int) -> RootGroup:
        if self._active != session.session_id:
            raise self._error(
                session, f"bucket {index} not sent: the session has not started on this transport"
            )
        if self._group is None:
            raise self._error(
                session, f"bucket {index} not sent: the transport was closed during the session"
            )
        return self._group

    def _error(
        self, session: SessionContext, detail: str, engine: str | None = None
    ) -> SessionError:
        """A :class:`SessionError` of ``session`` that says it came from this transport."""
        return SessionError(
            f"session {session.session_id} (step {session.step}): {self.name} transport: {detail}",
            session_id=session.session_id,
            step=session.step,
            engine=engine,
        )

    async def _build_group(self, session: SessionContext) -> RootGroup:
        engines = dict(session.engines)
        backend = await self._choose_backend(session)
        self._generation += 1
        group = RootGroup(
            tuple(engines),
            self._generation,
            backend,
            self.host,
            self.timeout_s,
            self.connect_timeout_s,
            self._device if backend == NCCL else None,
        )
        # Set before forming it, so finish() drops it if forming fails.
        self._group, self._formed_by = group, session
        try:
            port = await asyncio.wrap_future(group.executor.submit(group.open_store))
        except Exception as exc:
            group.failure = f"no rendezvous store: {type(exc).__name__}: {last_line(exc)}"
            raise self._error(
                session,
                f"collective group {group.group_id} could not open its rendezvous store at "
                f"{self.host!r} (is it an address of this host?): "
                f"{type(exc).__name__}: {last_line(exc)}",
            ) from exc
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
        ranks = {name: rank for rank, name in enumerate(engines, start=1)}

        async def owner_side() -> None:
            try:
                await asyncio.wrap_future(group.executor.submit(group.connect))
            except Exception as exc:
                if group.missing:
                    raise self._error(
                        session,
                        f"engine {group.missing[0]!r} never joined the collective group "
                        f"{group.group_id} within {self.connect_timeout_s}s",
                        engine=group.missing[0],
                    ) from exc
                raise self._error(
                    session,
                    f"collective group {group.group_id} could not form: "
                    f"{type(exc).__name__}: {last_line(exc)}",
                ) from exc

        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(owner_side())
                tasks.create_task(
                    self._on_engines(
                        session,
                        "joining the collective group",
                        lambda name: dataclasses.replace(join, rank=ranks[name]),
                        bound_s=self.connect_timeout_s + _CALL_SLACK_S,
                    )
                )
        except BaseExceptionGroup as errors:
            group.failure = group.failure or "forming the group failed"
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
            lambda name: Probe(),
            bound_s=self.connect_timeout_s + _CALL_SLACK_S,
        )
        return (
            NCCL if all(isinstance(a, dict) and a.get("nccl") for a in answers.values()) else GLOO
        )

    async def _drop_group(self, reason: str) -> None:
        """Forget the current group; close it on its thread and tell its engines to leave."""
        group, formed_by = self._group, self._formed_by
        self._group, self._formed_by = None, None
        if group is None:
            return
        if group.failure is None:
            group.failure = f"dropped: {reason}"
        # Queued behind any broadcast still running; the thread exits after it.
        group.executor.submit(group.close)
        group.executor.shutdown(wait=False)
        if formed_by is None:
            return
        leave = Leave(self._owner, group.group_id)
        # A dead or stuck engine has nothing to leave.
        await self._on_engines(
            formed_by,
            "leaving the collective group",
            lambda name: leave,
            bound_s=_LEAVE_TIMEOUT_S,
            best_effort=True,
        )

    # ----------------------------------------------------------------- engines

    async def _on_engines(
        self,
        session: SessionContext,
        what: str,
        message: Callable[[str], Any],
        *,
        bound_s: float,
        best_effort: bool = False,
    ) -> dict[str, Any]:
        """Send ``message(name)`` to every engine's ``transport_setup`` at once; answers by name.

        The calls go through the session's client (:meth:`~asyncsync.client.EngineClient.fan_out`):
        each bounded by ``bound_s``; the first failure or timeout cancels the other
        calls, on the engines too, and raises a :class:`~asyncsync.SessionError`
        naming the engine and ``what`` it was doing. With ``best_effort`` failures and
        timeouts are dropped instead: the result holds the engines that answered.
        """
        client = session.client
        what = f"{what} ({self.name} transport)"

        async def call(name: str) -> Any:
            return await client.transport_setup(
                name, self.name, message(name), bound_s=bound_s, what=what, session=session.tag
            )

        names = list(session.engines)
        if not best_effort:
            return await client.fan_out(names, call)
        answers = await client.settle(names, call)
        return {n: a for n, a in answers.items() if not isinstance(a, BaseException)}


def _retrieve(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()


def _positive_seconds(value: object) -> bool:
    return is_number(value) and value > 0


# --------------------------------------------------------------------------- rank 0


class RootGroup:
    """Rank 0's end of one group.

    ``open_store``, ``connect``, ``broadcast`` and ``close`` are blocking and run on
    :attr:`executor` (one thread): broadcasts run in submission order, which is the
    order every engine receives in. ``failure`` says what went wrong first: a failed
    operation, or the transport's note that a session failed or the group was
    dropped; every later broadcast then fails at once instead of waiting for peers
    that will not come. ``missing`` names the members that never reached the store
    when forming the group failed.
    """

    def __init__(
        self,
        members: tuple[str, ...],
        generation: int,
        backend: str,
        host: str,
        timeout_s: float,
        connect_timeout_s: float,
        device: torch.device | None,
    ) -> None:
        self.group_id = uuid.uuid4().hex
        self.members = members
        self.generation = generation
        self.backend = backend
        self.host = host
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.device = device
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncsync-collective")
        self.failure: str | None = None
        self.missing: tuple[str, ...] = ()
        self.port: int | None = None
        self._store: Any = None
        self._channel: Channel | None = None

    @property
    def size(self) -> int:
        return len(self.members) + 1

    def open_store(self) -> int:
        """Start the rendezvous store on a free port; return the port."""
        self._store = TCPStore(
            self.host,
            0,
            self.size,
            True,
            timeout=timedelta(self.connect_timeout_s),
            wait_for_workers=False,
        )
        self.port = int(self._store.port)
        return self.port

    def connect(self) -> None:
        """Form the group with every engine (they join concurrently).

        On failure sets ``failure`` and ``missing`` and raises the backend's error.
        """
        try:
            group = new_process_group(
                self._store,
                0,
                self.size,
                self.backend,
                self.host,
                self.connect_timeout_s,
                self.timeout_s,
                self.device,
            )
        except Exception as exc:
            self.failure = f"forming the group failed: {type(exc).__name__}: {last_line(exc)}"
            self.missing = tuple(
                name for rank, name in enumerate(self.members, 1) if not self._arrived(rank)
            )
            raise
        self._channel = Channel(group, self.backend, self.device, self.timeout_s)

    def _arrived(self, rank: int) -> bool:
        try:
            return bool(self._store.check([arrived_key(rank)]))
        except Exception:
            return False

    def broadcast(self, index: int, buffer: np.ndarray) -> None:
        """Send bucket ``index`` to every engine.

        Raises :class:`~asyncsync.SessionError` if the group failed earlier or never
        formed, and the backend's error if this broadcast fails (which then becomes
        the group's ``failure``).
        """
        if self.failure is not None:
            raise SessionError(
                f"collective group {self.group_id}: bucket {index} not sent, the group "
                f"failed earlier: {self.failure}"
            )
        if self._channel is None:
            raise SessionError(
                f"collective group {self.group_id}: bucket {index} not sent, the group "
                "was not formed"
            )
        try:
            self._channel.send(buffer)
        except Exception as exc:
            self.failure = (
                f"broadcast of bucket {index} failed: {type(exc).__name__}: {last_line(exc)}"
            )
            raise

    def close(self) -> None:
        """Drop the group and its store (queued after every broadcast already submitted)."""
        self._channel = None
        self._store = None
