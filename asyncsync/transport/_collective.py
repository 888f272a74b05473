"""Process groups of the collective transport: creation, broadcast, engine-side state (private).

Both sides build a private group straight from a :class:`torch.distributed.TCPStore`
and the backend's process-group class, never through
``torch.distributed.init_process_group``: a train actor may already own the default
group (Megatron tensor parallelism), and a default group cannot be rebuilt. A
private group can be created, dropped and rebuilt at will; each one gets its own
store (a fresh port) so nothing of an old group can leak into a new one.

Threads, not the event loop, do every blocking step here. The owner (rank 0) runs
one :class:`RootGroup` per group on a single-thread executor, so its broadcasts
run in submission order. Each engine runs one *pump* thread per session that
receives the session's buckets strictly in index order and parks them until the
engine's ``receive`` for that bucket takes them; ``receive`` calls may therefore
arrive in any order and any number at once (no worker-pool thread waits for
another one, so no pool size can deadlock it).

Timeouts: every collective is bounded by the group's ``timeout_s`` (gloo fails the
operation; NCCL's watchdog acts as ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` says, set it
to ``2`` to get an error instead of a process teardown). Rendezvous is bounded by
``connect_timeout_s``. Gloo cannot interrupt an operation in flight (``abort`` and
``shutdown`` are no-ops for it), so after a failure the survivors' operations end
at their timeout; the group is never used again and the next session builds a
new one.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from ..buckets import _as_uint8_tensor

GLOO = "gloo"
NCCL = "nccl"
BACKENDS = ("auto", GLOO, NCCL)
STATE_KEY = "collective"
"""Key of the engine's :class:`EngineGroups` in the receiver's ``transport_state``."""

_JOIN_SLACK_S = 2.0
"""Engines wait this much longer than the owner to form a group, so that when a peer
never arrives the owner fails first and can name it."""


def arrived_key(rank: int) -> str:
    """Store key an engine sets before it starts forming the group."""
    return f"asyncsync/arrived/{rank}"


def nccl_usable() -> bool:
    """Whether this process can take part in an NCCL group."""
    return torch.cuda.is_available() and dist.is_nccl_available()


def local_address(peer_host: str) -> str:
    """The local address this process uses to reach ``peer_host`` (no packet is sent)."""
    try:
        if ipaddress.ip_address(peer_host).is_loopback:
            return peer_host
    except ValueError:
        pass  # a host name, resolved below
    family, _, _, _, addr = socket.getaddrinfo(peer_host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(addr)  # UDP: only picks the route
        return str(probe.getsockname()[0])


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def new_process_group(
    store: Any,
    rank: int,
    size: int,
    backend: str,
    address: str,
    connect_timeout_s: float,
    timeout_s: float,
    device: torch.device | None,
) -> Any:
    """A private process group (blocking until every rank joined, or ``connect_timeout_s``).

    ``address`` is the local address gloo binds to and advertises; ``device`` the
    CUDA device of an NCCL rank. :class:`Channel` bounds each collective by
    ``timeout_s`` itself.
    """
    if backend == GLOO:
        from torch.distributed import ProcessGroupGloo

        # The options class is private in torch's stubs; it is the only way to pick
        # the network device (the default resolves the host name, which may not route).
        gloo_options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        # Gloo's rendezvous waits as long as its default timeout: the connect bound.
        gloo_options._timeout = _timedelta(connect_timeout_s)
        gloo_options._devices = [ProcessGroupGloo.create_device(hostname=address)]
        return ProcessGroupGloo(store, rank, size, gloo_options)
    if backend == NCCL:
        from torch.distributed import ProcessGroupNCCL

        nccl_options = ProcessGroupNCCL.Options()
        nccl_options.is_high_priority_stream = False
        nccl_options._timeout = _timedelta(timeout_s)
        group = ProcessGroupNCCL(store, rank, size, nccl_options)
        # Form the communicator now (every rank is in its join call), so a rank that
        # cannot take part fails the join, not the first bucket.
        group.eager_connect_single_device(device)
        return group
    raise ValueError(f"unknown collective backend {backend!r}; choose one of {BACKENDS}")


class Channel:
    """One rank's end of a group: broadcasts from rank 0. Use from one thread at a time."""

    def __init__(self, group: Any, backend: str, device: torch.device | None, timeout_s: float):
        self.group = group
        self.backend = backend
        self.device = device
        self.timeout_s = timeout_s
        # NCCL on rank 0: a device buffer reused for every bucket (grown as needed).
        self._device_buffer: torch.Tensor | None = None

    def send(self, buffer: np.ndarray) -> None:
        """Broadcast ``buffer`` (rank 0); returns when every rank has it, raises on failure."""
        tensor = _as_uint8_tensor(buffer)
        if self.backend == NCCL:
            assert self.device is not None
            n = tensor.numel()
            if self._device_buffer is None or self._device_buffer.numel() < n:
                self._device_buffer = None  # free the old one before allocating
                self._device_buffer = torch.empty(n, dtype=torch.uint8, device=self.device)
            staging = self._device_buffer[:n]
            # Host buffers of the cache are pinned where CUDA exists: an async copy,
            # ordered before the broadcast on the current stream.
            staging.copy_(tensor, non_blocking=True)
            tensor = staging
        self._run(tensor)

    def recv(self, nbytes: int) -> np.ndarray:
        """Receive the next broadcast of ``nbytes`` bytes into a fresh host buffer."""
        if self.backend == NCCL:
            assert self.device is not None
            staging = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._run(staging)
            # The caching host allocator hands back pinned blocks of earlier buckets.
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            host.copy_(staging, non_blocking=True)
            _synchronize(self.device)
            return host.numpy()
        payload = np.empty(nbytes, dtype=np.uint8)
        self._run(torch.from_numpy(payload))
        return payload

    def _run(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        options.timeout = _timedelta(self.timeout_s)
        work = self.group.broadcast([tensor], options)
        if self.backend == NCCL:
            # With a timeout, wait() blocks this thread until the kernel finished.
            work.wait(_timedelta(self.timeout_s))
        else:
            # Gloo ends the operation at options.timeout; a wait() with its own timeout
            # could return while gloo still uses the buffer.
            work.wait()


def _synchronize(device: torch.device) -> None:
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(device))
    event.synchronize()


# --------------------------------------------------------------------------- messages
# What the owner sends to an engine's ``transport_setup("collective", config)``.


@dataclass(frozen=True)
class Probe:
    """Ask an engine what it can do; answered with ``{"nccl": bool}``."""


@dataclass(frozen=True)
class Join:
    """Join group ``group_id`` of ``owner`` as ``rank`` (replaces the owner's older group)."""

    owner: str
    group_id: str
    generation: int
    host: str
    port: int
    rank: int
    size: int
    backend: str
    timeout_s: float
    connect_timeout_s: float


@dataclass(frozen=True)
class Announce:
    """The next session on a group: its bucket sizes, in broadcast order."""

    owner: str
    group_id: str
    session_id: str
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Leave:
    """Drop the owner's group ``group_id`` (any group of the owner when ``None``)."""

    owner: str
    group_id: str | None = None


# --------------------------------------------------------------------------- owner side


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
            timeout=_timedelta(self.connect_timeout_s),
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


# --------------------------------------------------------------------------- engine side


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
        store = TCPStore(join.host, join.port, join.size, False, timeout=_timedelta(wait))
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
