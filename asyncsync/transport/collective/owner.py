"""Owner (train) side of the collective transport: the cache owner is rank 0.

:class:`CollectiveTransport` is what a sync session drives on the train actor's
loop (``start``, ``put``, ``release``, ``finish``); :class:`RootGroup` is rank 0's
end of one process group, with the one thread every blocking step of it runs on.

What this side promises:

* Sessions run one at a time (a second waits in ``start``, within its own session
  timeout): a group's broadcasts must follow one order.
* The group is kept while the targets stay the same (same names, same actors) and
  rebuilt when they change, after a failed session, or on ``close``. Nothing here
  touches the default process group.
* ``put`` returns at once: broadcasts leave in index order on the group's thread,
  and the loop keeps answering while they run.
* Forming a group is bounded by ``connect_timeout_s``, every call to an engine by
  that bound plus some slack, every broadcast by ``timeout_s``. An engine that dies
  or never joins fails the session with a :class:`~asyncsync.SessionError` naming
  it; the group is dropped and the next session builds a new one.
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
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch.distributed import TCPStore  # type: ignore[attr-defined]

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
        if backend not in _BACKEND_OPTIONS:
            raise ConfigError(f"backend must be one of {_BACKEND_OPTIONS}, got {backend!r}")
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
        # Owned by the session holding _session_lock (and close()). _formed_by is the
        # session that formed _group: its targets are the group's members.
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
            or dict(formed_by.targets) != dict(session.targets)
        ):
            await self._drop_group("rebuilt for new targets or after a failure")
            group = await self._build_group(session)
        sizes = tuple(m.nbytes for m in session.manifest)
        announce = Announce(self._owner, group.group_id, session.session_id, sizes)
        await self._on_engines(
            session,
            "collective set-up (announce)",
            lambda name, handle: handle.transport_setup.remote(self.name, announce),
            bound_s=self.connect_timeout_s + _CALL_SLACK_S,
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
        self._group, self._formed_by = group, session
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
                        bound_s=self.connect_timeout_s + _CALL_SLACK_S,
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
            bound_s=self.connect_timeout_s + _CALL_SLACK_S,
        )
        return NCCL if all(a.get("nccl") for a in answers.values()) else GLOO

    async def _drop_group(self, reason: str) -> None:
        """Forget the current group; close it on its thread and tell its engines to leave."""
        group, formed_by = self._group, self._formed_by
        self._group, self._formed_by = None, None
        if group is None:
            return
        if group.failure is None:
            group.failure = RuntimeError(f"group dropped: {reason}")
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
            lambda name, handle: handle.transport_setup.remote(self.name, leave),
            bound_s=_LEAVE_TIMEOUT_S,
            best_effort=True,
        )

    # ----------------------------------------------------------------- engines

    async def _on_engines(
        self,
        session: SessionContext,
        what: str,
        call: Callable[[str, Any], Awaitable[T]],
        *,
        bound_s: float,
        best_effort: bool = False,
    ) -> dict[str, T]:
        """``call(name, handle)`` on every engine of ``session`` at once; results by name.

        Each call is bounded by ``bound_s``. The first failure or timeout cancels the
        other calls, on the engines too, and raises a :class:`~asyncsync.SessionError`
        naming the engine and ``what`` it was doing. With ``best_effort`` failures and
        timeouts are dropped instead: the result holds the engines that answered.

        The one place this transport calls engines: bounds, cancellation and error
        naming for every engine call live here and nowhere else.
        """
        results: dict[str, T] = {}

        def cancel_remote(call: object) -> None:
            import ray

            if isinstance(call, ray.ObjectRef):
                try:
                    ray.cancel(call)
                except Exception:  # best effort: never replace the error being handled
                    pass

        async def one(name: str, handle: Any) -> None:
            pending: Awaitable[T] | None = None
            timer = asyncio.timeout(bound_s)
            try:
                async with timer:
                    pending = call(name, handle)
                    results[name] = await pending
            except asyncio.CancelledError:
                # Another engine failed or the session ended: stop the engine-side call
                # too, or a join stuck waiting for its peers would hold an engine slot
                # until its own timeout.
                cancel_remote(pending)
                raise
            except Exception as exc:
                if timer.expired():
                    cancel_remote(pending)
                if best_effort:
                    return
                detail = (
                    f"no answer within {bound_s:.0f}s"
                    if timer.expired()
                    else f"{type(exc).__name__}: {last_line(exc)}"
                )
                raise SessionError(
                    f"session {session.session_id} (step {session.step}): target {name!r} "
                    f"failed in {what}: {detail}",
                    session_id=session.session_id,
                    step=session.step,
                    target=name,
                ) from exc

        try:
            async with asyncio.TaskGroup() as tasks:
                for name, handle in session.targets.items():
                    tasks.create_task(one(name, handle))
        except BaseExceptionGroup as errors:
            raise first_session_error(errors) from None
        return results


def _retrieve(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()


# --------------------------------------------------------------------------- rank 0


class NotJoinedError(RuntimeError):
    """The group could not form; ``missing`` are the ranks that never arrived."""

    def __init__(self, message: str, missing: Sequence[int]) -> None:
        super().__init__(message)
        self.missing = tuple(missing)


class RootGroup:
    """Rank 0's end of one group.

    ``open_store``, ``connect``, ``broadcast`` and ``close`` are blocking and run on
    :attr:`executor` (one thread): broadcasts run in submission order, which is the
    order every engine receives in. ``failure`` is set by the first failed
    operation (or by the transport when a session failed); every later broadcast
    then fails at once instead of waiting for peers that will not come.
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
        self.failure: BaseException | None = None
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
        """Form the group with every engine (they join concurrently)."""
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
            self.failure = exc
            missing = [r for r in range(1, self.size) if not self._arrived(r)]
            raise NotJoinedError(f"{type(exc).__name__}: {exc}", missing) from exc
        self._channel = Channel(group, self.backend, self.device, self.timeout_s)

    def _arrived(self, rank: int) -> bool:
        try:
            return bool(self._store.check([arrived_key(rank)]))
        except Exception:
            return False

    def broadcast(self, buffer: np.ndarray) -> None:
        """Send one bucket to every engine; raises if the group failed."""
        if self.failure is not None:
            raise RuntimeError(f"the process group already failed: {self.failure}")
        if self._channel is None:
            raise RuntimeError("the process group was not formed")
        try:
            self._channel.send(buffer)
        except Exception as exc:
            self.failure = exc
            raise

    def close(self) -> None:
        """Drop the group and its store (queued after every broadcast already submitted)."""
        self._channel = None
        self._store = None
