"""The wire of the collective transport: what both sides share and send each other.

Neither side's state lives here. This module holds:

* the messages the owner sends to an engine's ``transport_setup("collective",
  message)``: :class:`Probe`, :class:`Join`, :class:`Announce`, :class:`Leave`;
* process-group creation (:func:`new_process_group`) and :class:`Channel`, one
  rank's end of a group, which moves the bytes of one bucket;
* the rendezvous store's keys (:func:`arrived_key`) and the address a process
  reaches a peer from (:func:`local_address`).

Both sides build a private group straight from a :class:`torch.distributed.TCPStore`
and the backend's process-group class, never through
``torch.distributed.init_process_group``: a train actor may already own the default
group (Megatron tensor parallelism), and a default group cannot be rebuilt. A
private group can be created, dropped and rebuilt at will; each one gets its own
store (a fresh port) so nothing of an old group can leak into a new one.

Timeouts: every collective is bounded by the group's ``timeout_s`` (gloo fails the
operation; NCCL's watchdog acts as ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` says, set it
to ``2`` to get an error instead of a process teardown). Rendezvous is bounded by
``connect_timeout_s``. Gloo cannot interrupt an operation in flight (``abort`` and
``shutdown`` are no-ops for it), so after a failure the survivors' operations end
at their timeout; the group is never used again and the next session builds a
new one. Everything here blocks: callers run it in threads, never on a loop.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ...buckets import _as_uint8_tensor
from ...errors import ConfigError

GLOO = "gloo"
NCCL = "nccl"
BACKENDS = (GLOO, NCCL)
"""The process-group backends a group can use."""


# --------------------------------------------------------------------------- messages
# What the owner sends to an engine's ``transport_setup("collective", message)``.


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


# --------------------------------------------------------------------------- rendezvous


def arrived_key(rank: int) -> str:
    """Store key an engine sets before it starts forming the group.

    The owner reads it when forming fails, to name the engines that never came.
    """
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


def timedelta(seconds: float) -> datetime.timedelta:
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
    ``timeout_s`` itself. Raises :class:`~asyncsync.ConfigError` for a backend not
    in :data:`BACKENDS`, and the backend's error if the group cannot form.
    """
    if backend == GLOO:
        from torch.distributed import ProcessGroupGloo

        # The options class is private in torch's stubs; it is the only way to pick
        # the network device (the default resolves the host name, which may not route).
        gloo_options = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        # Gloo's rendezvous waits as long as its default timeout: the connect bound.
        gloo_options._timeout = timedelta(connect_timeout_s)
        gloo_options._devices = [ProcessGroupGloo.create_device(hostname=address)]
        return ProcessGroupGloo(store, rank, size, gloo_options)
    if backend == NCCL:
        from torch.distributed import ProcessGroupNCCL

        nccl_options = ProcessGroupNCCL.Options()
        nccl_options.is_high_priority_stream = False
        nccl_options._timeout = timedelta(timeout_s)
        group = ProcessGroupNCCL(store, rank, size, nccl_options)
        # Form the communicator now (every rank is in its join call), so a rank that
        # cannot take part fails the join, not the first bucket.
        group.eager_connect_single_device(device)
        return group
    raise ConfigError(f"unknown collective backend {backend!r}; choose one of {BACKENDS}")


# --------------------------------------------------------------------------- bytes


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
        options.timeout = timedelta(self.timeout_s)
        work = self.group.broadcast([tensor], options)
        if self.backend == NCCL:
            # With a timeout, wait() blocks this thread until the kernel finished.
            work.wait(timedelta(self.timeout_s))
        else:
            # Gloo ends the operation at options.timeout; a wait() with its own timeout
            # could return while gloo still uses the buffer.
            work.wait()


def _synchronize(device: torch.device) -> None:
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(torch.cuda.current_stream(device))
    event.synchronize()
