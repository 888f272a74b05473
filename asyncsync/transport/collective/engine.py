"""Engine side of the collective transport: join the owner's groups, receive its buckets.

This runs inside an engine actor, in its worker threads: the receiver's
``transport_setup("collective", message)`` runs :func:`engine_setup`, and its
``receive`` runs :meth:`CollectivePayload.load`. What lives between those calls
is kept in the receiver's ``transport_state`` under :data:`STATE_KEY` (an
:class:`EngineGroups`), never in this module.

What this side promises:

* One group per owner (train-side transport): a newer ``Join`` replaces the
  owner's older group, and a stale one is refused.
* One *pump* thread per announced session receives its buckets strictly in index
  order and parks them until the engine's ``receive`` for that bucket takes them;
  ``receive`` calls may therefore arrive in any order and any number at once (no
  worker-pool thread waits for another one, so no pool size can deadlock it).
* Nothing waits forever. Forming a group waits a little longer than the owner
  does, so that when a peer never arrives the owner fails first and names it; a
  ``receive`` fails once no bucket arrived for longer than the group's timeout.
* A group that failed or was left never delivers again: its waiters fail at once.
* Every error it raises is a :class:`~asyncsync.TransportError` that names the
  group, and the session and bucket when it concerns one; the engine keeps the
  version it had.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from ...buckets import Bucket, BucketManifest
from ...errors import TransportError, last_line
from .wire import (
    BACKENDS,
    NCCL,
    Announce,
    Channel,
    Join,
    Leave,
    Probe,
    arrived_key,
    local_address,
    nccl_usable,
    new_process_group,
    timedelta,
)

STATE_KEY = "collective"
"""Key of the engine's :class:`EngineGroups` in the receiver's ``transport_state``."""

_JOIN_SLACK_S = 2.0
"""Engines wait this much longer than the owner to form a group, so that when a peer
never arrives the owner fails first and can name it."""


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

        Raises :class:`~asyncsync.TransportError` if the engine never joined a group
        or is not in this one (it was restarted, or the group was replaced), the
        session was not announced, the broadcast failed, or nothing arrived within
        the group's timeout.
        """
        groups = state.get(STATE_KEY)
        if not isinstance(groups, EngineGroups):
            raise _error(
                "this engine never joined a collective group (was it restarted?)",
                group_id=self.group_id,
                session_id=self.session_id,
                index=self.index,
            )
        group = groups.get(self.owner, self.group_id, self.session_id, self.index)
        payload = group.take(self.session_id, self.index)
        return Bucket(payload, self.manifest.index, self.manifest.checksum)


def engine_setup(state: dict[str, Any], config: Any) -> Any:
    """Engine side of the transport's set-up; blocking, run in an engine worker thread.

    ``state`` is the receiver's ``transport_state``; ``config`` one of the owner's
    messages (probe, join, announce, leave). Returns the probe's answer, else ``None``.
    Raises :class:`~asyncsync.TransportError` for anything else, for a join that
    cannot form or is older than the group it would replace, and for an announce
    on a group this engine is not in.
    """
    if not isinstance(config, Probe | Join | Announce | Leave):
        raise _error(
            f"not a collective set-up message: a {type(config).__name__} "
            "(expected Probe, Join, Announce or Leave)"
        )
    groups = state.setdefault(STATE_KEY, EngineGroups())
    if not isinstance(groups, EngineGroups):
        raise _error(
            f"the receiver's transport_state[{STATE_KEY!r}] holds a {type(groups).__name__}, "
            "not this transport's groups"
        )
    if isinstance(config, Probe):
        return {"nccl": nccl_usable()}
    if isinstance(config, Join):
        groups.join(config)
    elif isinstance(config, Announce):
        group = groups.get(config.owner, config.group_id, config.session_id)
        group.announce(config.session_id, config.sizes)
    else:
        groups.leave(config)
    return None


def _error(
    detail: str,
    *,
    group_id: str | None = None,
    session_id: str | None = None,
    index: int | None = None,
) -> TransportError:
    """A :class:`TransportError` whose message starts with the group, session and bucket."""
    where = [f"collective group {group_id}" if group_id else "collective transport"]
    if session_id is not None:
        where.append(f"session {session_id!r}")
    if index is not None:
        where.append(f"bucket {index}")
    return TransportError(
        f"{', '.join(where)}: {detail}", transport=STATE_KEY, session_id=session_id, index=index
    )


class EngineGroups:
    """Every group one engine belongs to, one per owner (train-side transport)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Guarded by _lock.
        self._groups: dict[str, EngineGroup] = {}
        self._latest: dict[str, int] = {}

    def join(self, join: Join) -> None:
        """Replace the owner's group with a new one (blocking until it formed)."""
        with self._lock:
            if join.generation <= self._latest.get(join.owner, -1):
                raise _error(
                    f"join (generation {join.generation}) is not newer than this engine's "
                    f"group of that owner (generation {self._latest[join.owner]})",
                    group_id=join.group_id,
                )
            self._latest[join.owner] = join.generation
            old = self._groups.pop(join.owner, None)
        if old is not None:
            old.close(f"replaced by group {join.group_id}")
        group = EngineGroup.connect(join)
        with self._lock:
            if self._latest[join.owner] != join.generation:
                superseded = True
            else:
                superseded = False
                self._groups[join.owner] = group
        if superseded:
            group.close("superseded while forming")
            raise _error("superseded by a newer group while forming", group_id=join.group_id)

    def get(
        self, owner: str, group_id: str, session_id: str, index: int | None = None
    ) -> EngineGroup:
        """The owner's group ``group_id``, wanted for ``session_id`` (and bucket ``index``)."""
        with self._lock:
            group = self._groups.get(owner)
        if group is None or group.group_id != group_id:
            have = "none" if group is None else group.group_id
            raise _error(
                f"this engine is not in the group (its group of that owner: {have}); "
                "it was restarted, or the group was replaced",
                group_id=group_id,
                session_id=session_id,
                index=index,
            )
        return group

    def leave(self, leave: Leave) -> None:
        with self._lock:
            group = self._groups.get(leave.owner)
            if group is None or (leave.group_id is not None and group.group_id != leave.group_id):
                return
            del self._groups[leave.owner]
        group.close("left")

    def group_ids(self) -> dict[str, str]:
        """``{owner: group id}`` of the groups this engine is in."""
        with self._lock:
            return {owner: g.group_id for owner, g in self._groups.items()}


@dataclass(eq=False)
class _Incoming:
    """One session's buckets as the pump receives them. Guarded by the group's condition."""

    session_id: str
    sizes: tuple[int, ...]
    received: dict[int, np.ndarray] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)
    next_index: int = 0
    error: BaseException | None = None
    last_progress: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None


class EngineGroup:
    """An engine's end of one group: a pump thread per session, buckets parked until taken."""

    def __init__(self, join: Join, store: Any, channel: Channel) -> None:
        self.owner = join.owner
        self.group_id = join.group_id
        self.generation = join.generation
        self.rank = join.rank
        self.timeout_s = join.timeout_s
        self._store = store
        self._channel: Channel | None = channel
        self._cond = threading.Condition()
        # Guarded by _cond.
        self._closed: str | None = None
        self._incoming: _Incoming | None = None

    @classmethod
    def connect(cls, join: Join) -> EngineGroup:
        """Form the group with the owner and the other engines (blocking)."""
        if join.backend not in BACKENDS:
            raise _error(
                f"unknown backend {join.backend!r}; this engine knows {BACKENDS}",
                group_id=join.group_id,
            )
        if join.backend == NCCL and not nccl_usable():
            raise _error(
                "the owner chose NCCL but this engine has no CUDA/NCCL", group_id=join.group_id
            )
        device = torch.device("cuda", torch.cuda.current_device()) if join.backend == NCCL else None
        wait = join.connect_timeout_s + _JOIN_SLACK_S
        try:
            store = TCPStore(join.host, join.port, join.size, False, timeout=timedelta(wait))
            store.set(arrived_key(join.rank), "1")
            group = new_process_group(
                store,
                join.rank,
                join.size,
                join.backend,
                local_address(join.host),
                wait,
                join.timeout_s,
                device,
            )
        except Exception as exc:
            raise _error(
                f"joining as rank {join.rank} of {join.size} through {join.host}:{join.port} "
                f"failed: {type(exc).__name__}: {last_line(exc)}",
                group_id=join.group_id,
            ) from exc
        return cls(join, store, Channel(group, join.backend, device, join.timeout_s))

    def announce(self, session_id: str, sizes: tuple[int, ...]) -> None:
        """Start receiving the buckets of ``session_id`` in the background."""
        with self._cond:
            if self._closed is not None:
                raise _error(
                    f"the group is closed: {self._closed}",
                    group_id=self.group_id,
                    session_id=session_id,
                )
            previous = self._incoming
            if previous is not None and previous.thread is not None and previous.thread.is_alive():
                raise _error(
                    f"the group is still receiving session {previous.session_id!r}",
                    group_id=self.group_id,
                    session_id=session_id,
                )
            incoming = _Incoming(session_id, sizes)
            incoming.thread = threading.Thread(
                target=self._pump,
                args=(incoming,),
                name=f"asyncsync-collective-{session_id[:8]}",
                daemon=True,
            )
            self._incoming = incoming
            incoming.thread.start()

    def _pump(self, incoming: _Incoming) -> None:
        channel = self._channel
        for index, nbytes in enumerate(incoming.sizes):
            with self._cond:
                if self._closed is not None or self._incoming is not incoming or channel is None:
                    return
            try:
                payload = channel.recv(nbytes)
            except BaseException as exc:
                with self._cond:
                    incoming.error = exc
                    self._closed = f"broadcast of bucket {index} failed: {exc}"
                    self._cond.notify_all()
                return
            with self._cond:
                incoming.received[index] = payload
                incoming.next_index = index + 1
                incoming.last_progress = time.monotonic()
                self._cond.notify_all()

    def take(self, session_id: str, index: int) -> np.ndarray:
        """Bucket ``index`` of ``session_id`` once the pump has it (blocking).

        Raises :class:`~asyncsync.TransportError` if the session was not announced,
        the index is outside it or the bucket was already taken, the group failed or
        closed, or the pump made no progress for longer than the group's timeout.
        """
        stall = self.timeout_s + _JOIN_SLACK_S

        def error(detail: str) -> TransportError:
            return _error(detail, group_id=self.group_id, session_id=session_id, index=index)

        with self._cond:
            while True:
                incoming = self._incoming
                if incoming is None or incoming.session_id != session_id:
                    announced = None if incoming is None else incoming.session_id
                    raise error(f"the session was not announced (announced: {announced!r})")
                if index in incoming.received:
                    incoming.taken.add(index)
                    return incoming.received.pop(index)
                if not 0 <= index < len(incoming.sizes):
                    raise error(f"outside the {len(incoming.sizes)} buckets announced")
                if index in incoming.taken:
                    raise error("taken twice")
                if incoming.error is not None:
                    raise error(
                        f"receiving bucket {incoming.next_index} failed: "
                        f"{type(incoming.error).__name__}: {last_line(incoming.error)}"
                    ) from incoming.error
                if self._closed is not None:
                    raise error(f"the group closed: {self._closed}")
                remaining = incoming.last_progress + stall - time.monotonic()
                if remaining <= 0:
                    raise error(
                        f"nothing arrived for {stall:.0f}s (the group's timeout_s plus "
                        f"{_JOIN_SLACK_S:.0f}s; next to arrive: bucket {incoming.next_index})"
                    )
                self._cond.wait(remaining)

    def close(self, reason: str) -> None:
        """Fail every waiter and drop the group (a pump mid-receive ends at its timeout)."""
        with self._cond:
            if self._closed is None:
                self._closed = reason
            self._incoming = None
            self._channel = None
            self._store = None
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed is not None
