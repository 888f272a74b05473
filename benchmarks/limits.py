"""The machine's limits, measured in the same run: copy, checksum, object store, device-to-host.

:class:`LimitsProbe` is a plain synchronous actor (measurement only). Bandwidths
are bytes per second of wall time, medians over repetitions, one torch thread.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from asyncsync.buckets import checksum
from asyncsync.engines.tensors import copy_threads

__all__ = [
    "DeviceLimits",
    "HostLimits",
    "LagFloor",
    "LimitsProbe",
    "MachineLimits",
    "ObjectStoreLimits",
    "limits_probe_actor",
]


@dataclass(frozen=True)
class HostLimits:
    """Single-thread host bandwidths in GB/s (1e9 bytes per second), best of the repetitions.

    ``copy_gbps``: ``tensor.copy_`` into an already touched buffer (the copy
    limit). ``fresh_copy_gbps``: the same into a freshly allocated buffer (page
    faults included). ``checksum_gbps``: xxh3-64 of a buffer.
    ``parallel_copy_gbps``: the same copy cut into ``copy_threads`` equal parts,
    each copied by its own thread at once (the bytes of all of them per second):
    what a second core adds when memory bandwidth is the limit.
    """

    nbytes: int
    copy_gbps: float
    fresh_copy_gbps: float
    checksum_gbps: float
    parallel_copy_gbps: float = 0.0
    copy_threads: int = 1


@dataclass(frozen=True)
class ObjectStoreLimits:
    """``ray.put`` of a numpy buffer and ``ray.get`` plus one copy out in another process.

    ``put_gbps``: the best of several puts (the store reuses freed, already
    faulted memory). ``put_fresh_gbps``: the first put, into store pages never
    touched before: what a session pays until the object store has been cycled
    through once.
    """

    nbytes: int
    put_gbps: float
    put_fresh_gbps: float
    get_copy_gbps: float


@dataclass(frozen=True)
class LagFloor:
    """Event-loop lag of an idle asyncio loop (the bench driver's), p99 and max in ms.

    ``idle``: nothing else of the bench running. ``one_busy`` / ``two_busy``:
    while one / two other processes copy memory, sharing no GIL or loop with it:
    what any async actor's loop shows on this machine when a build keeps one core
    (copy) or two (copy and overlapped checksum) busy; the floor for the loop
    lag measured during builds.
    """

    idle_p99_ms: float
    one_busy_p99_ms: float
    two_busy_p99_ms: float
    idle_max_ms: float
    one_busy_max_ms: float
    two_busy_max_ms: float


@dataclass(frozen=True)
class DeviceLimits:
    """Device-to-host bandwidth in GB/s, or why it was skipped (``skipped`` is then set)."""

    nbytes: int
    pinned_gbps: float | None = None
    pageable_gbps: float | None = None
    device: str | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class MachineLimits:
    """Every limit one bench run measured: host bandwidths at its start and at its end,
    the object store, the device (or why not), and the event-loop lag floor."""

    host_start: HostLimits
    host_end: HostLimits
    object_store: ObjectStoreLimits
    device: DeviceLimits
    lag_floor: LagFloor

    @property
    def copy_gbps(self) -> float:
        """The copy limit: mean of the measurements at the start and the end of the run."""
        return (self.host_start.copy_gbps + self.host_end.copy_gbps) / 2

    @property
    def checksum_gbps(self) -> float:
        """The checksum limit: mean of the measurements at the start and the end of the run."""
        return (self.host_start.checksum_gbps + self.host_end.checksum_gbps) / 2


def _gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


def _best_gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / min(seconds) / 1e9


class LimitsProbe:
    """Measures one process's bandwidths; blocking methods (it is a synchronous actor).

    Host limits are the best of the repetitions (a limit is what the machine can
    do; other processes only ever slow a repetition down); object-store and
    device figures are medians.
    """

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self._held: list[Any] = []

    def host(self, nbytes: int, reps: int = 5) -> HostLimits:
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
        dst = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
        copies, fresh, sums = [], [], []
        for _ in range(reps):
            start = time.perf_counter()
            dst.copy_(src)
            copies.append(time.perf_counter() - start)
        for _ in range(min(reps, 2)):  # each one faults in fresh pages: slow on some VMs
            start = time.perf_counter()
            new = torch.from_numpy(np.empty(nbytes, dtype=np.uint8))
            new.copy_(src)
            fresh.append(time.perf_counter() - start)
            del new
        array = dst.numpy()
        for _ in range(reps):
            start = time.perf_counter()
            checksum(array)
            sums.append(time.perf_counter() - start)
        threads = copy_threads()
        parts = list(zip(dst.chunk(threads), src.chunk(threads), strict=True))
        parallel = []
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(reps):
                start = time.perf_counter()
                list(pool.map(lambda part: part[0].copy_(part[1]), parts))
                parallel.append(time.perf_counter() - start)
        return HostLimits(
            nbytes,
            _best_gbps(nbytes, copies),
            _best_gbps(nbytes, fresh),
            _best_gbps(nbytes, sums),
            _best_gbps(nbytes, parallel),
            threads,
        )

    def busy_copy(self, nbytes: int, seconds: float) -> int:
        """Copy ``nbytes`` over and over for ``seconds`` (one core busy); return the copies made."""
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
        dst = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
        copies = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            dst.copy_(src)
            copies += 1
        return copies

    def put(self, nbytes: int, reps: int = 8) -> tuple[float, float, list[Any]]:
        """``ray.put`` bandwidth, best and first; and the last object's ref (in a list).

        Each put frees the previous object first, so the store can reuse its memory.
        """
        import ray

        array = np.full(nbytes, 3, dtype=np.uint8)
        times = []
        ref: Any = None
        for _ in range(reps):
            ref = None
            start = time.perf_counter()
            ref = ray.put(array)
            times.append(time.perf_counter() - start)
        self._held = [ref]
        return _best_gbps(nbytes, times), nbytes / times[0] / 1e9, [ref]

    def get_copy(self, refs: list[Any], reps: int = 3) -> float:
        """``ray.get`` of ``refs[0]`` (a numpy buffer) plus one copy into a touched buffer."""
        import ray

        first = ray.get(refs[0])
        dst = np.zeros_like(first)
        del first
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            array = ray.get(refs[0])
            np.copyto(dst, array)
            times.append(time.perf_counter() - start)
            del array
        return _gbps(int(dst.nbytes), times)

    def release(self) -> None:
        self._held = []

    def device_to_host(self, nbytes: int, reps: int = 3) -> DeviceLimits:
        """Device-to-host copy into pinned and pageable buffers; skipped without CUDA."""
        if not torch.cuda.is_available():
            return DeviceLimits(
                nbytes,
                skipped="no CUDA device in this process (torch.cuda.is_available() is False)",
            )
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").fill_(5)
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(nbytes, dtype=torch.uint8).fill_(0)
        results = {}
        for name, dst in (("pinned", pinned), ("pageable", pageable)):
            dst.copy_(src, non_blocking=True)  # warm up
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            results[name] = _gbps(nbytes, times)
        return DeviceLimits(
            nbytes,
            pinned_gbps=results["pinned"],
            pageable_gbps=results["pageable"],
            device=torch.cuda.get_device_name(0),
        )


def limits_probe_actor(num_gpus: float = 0) -> Any:
    """The remote :class:`LimitsProbe` class (synchronous, no CPU reserved)."""
    import ray

    return ray.remote(LimitsProbe).options(num_cpus=0, num_gpus=num_gpus)
