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
from .wire import (
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
                raise RuntimeError(
                    f"join of collective group {join.group_id} (generation {join.generation}) "
                    f"is older than generation {self._latest[join.owner]}"
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
            raise RuntimeError(f"collective group {join.group_id} was superseded while forming")

    def get(self, owner: str, group_id: str) -> EngineGroup:
        with self._lock:
            group = self._groups.get(owner)
        if group is None or group.group_id != group_id:
            have = None if group is None else group.group_id
            raise RuntimeError(
                f"this engine is not in collective group {group_id} (its group of that owner: "
                f"{have}); it was restarted, or the group was replaced"
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
        if join.backend == NCCL and not nccl_usable():
            raise RuntimeError("the owner chose NCCL but this engine has no CUDA/NCCL")
        device = torch.device("cuda", torch.cuda.current_device()) if join.backend == NCCL else None
        wait = join.connect_timeout_s + _JOIN_SLACK_S
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
        return cls(join, store, Channel(group, join.backend, device, join.timeout_s))

    def announce(self, session_id: str, sizes: tuple[int, ...]) -> None:
        """Start receiving the buckets of ``session_id`` in the background."""
        with self._cond:
            if self._closed is not None:
                raise RuntimeError(f"collective group {self.group_id} is closed: {self._closed}")
            previous = self._incoming
            if previous is not None and previous.thread is not None and previous.thread.is_alive():
                raise RuntimeError(
                    f"collective group {self.group_id} is still receiving session "
                    f"{previous.session_id!r}"
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

        Raises ``RuntimeError`` if the session was not announced, the bucket was
        already taken, the group failed or closed, or the pump made no progress for
        longer than the group's timeout.
        """
        stall = self.timeout_s + _JOIN_SLACK_S
        with self._cond:
            while True:
                incoming = self._incoming
                if incoming is None or incoming.session_id != session_id:
                    raise RuntimeError(
                        f"session {session_id!r} was not announced on collective group "
                        f"{self.group_id}"
                    )
                if index in incoming.received:
                    incoming.taken.add(index)
                    return incoming.received.pop(index)
                if index in incoming.taken or not 0 <= index < len(incoming.sizes):
                    raise RuntimeError(f"bucket {index} of session {session_id!r} taken twice")
                if incoming.error is not None:
                    raise RuntimeError(
                        f"receiving bucket {incoming.next_index} failed: "
                        f"{type(incoming.error).__name__}: {incoming.error}"
                    ) from incoming.error
                if self._closed is not None:
                    raise RuntimeError(f"collective group {self.group_id} closed: {self._closed}")
                remaining = incoming.last_progress + stall - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(
                        f"no bucket arrived for {stall:.0f}s (waiting for bucket {index}, "
                        f"next to arrive: {incoming.next_index})"
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
