"""In-actor measurements: resident set size, event-loop lag, cache residency; percentiles.

Every probe runs *inside* the actor it measures: an RSS sampler thread (works in
synchronous and async actors alike) and, for async actors, the library's
:class:`~asyncsync.testing.LoopLagProbe` on the actor's loop, keeping every wake-up
so that lag can be summarized over builds and over the rest.
"""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import psutil

from asyncsync.testing.looplag import LoopLagProbe

__all__ = [
    "LagSummary",
    "RssSampler",
    "Usage",
    "UsageMeter",
    "ValueSampler",
    "lag_probe",
    "lag_summary",
    "percentile",
]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; ``nan`` when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class RssSampler:
    """Samples this process's resident set size in a daemon thread and keeps the peaks.

    A thread rather than a loop task, so a synchronous actor busy in a long call
    is sampled too. The psutil call takes microseconds; the thread sleeps
    ``interval_s`` between samples. RSS includes shared-memory pages this process
    touched (object-store and ``/dev/shm`` mappings); the *private* figure leaves
    them out (RSS minus file-backed and shared-memory pages: anonymous memory).
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self._process = psutil.Process()
        self._peak = 0
        self._peak_private = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[int, int]:
        info = self._process.memory_info()
        return int(info.rss), int(info.rss - getattr(info, "shared", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._update()

    def _update(self) -> None:
        rss, private = self._sample()
        self._peak = max(self._peak, rss)
        self._peak_private = max(self._peak_private, private)

    def reset(self) -> None:
        """Start a new window: the peaks become the current values."""
        self._peak, self._peak_private = self._sample()

    def peak(self) -> int:
        """Largest RSS sampled since the last reset (including now)."""
        self._update()
        return self._peak

    def peak_private(self) -> int:
        """Largest private (anonymous) resident memory since the last reset (including now)."""
        self._update()
        return self._peak_private

    def stop(self) -> None:
        self._stop.set()


@dataclass(frozen=True)
class LagSummary:
    """Event-loop lag over the samples that fell inside the chosen windows."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    interval_ms: float


def lag_probe(interval_s: float = 0.002) -> LoopLagProbe:
    """A loop-lag probe that keeps its wake-ups for :func:`lag_summary` (start it on the loop)."""
    return LoopLagProbe(interval_s, history=500_000)


def lag_summary(
    probe: LoopLagProbe,
    windows: Sequence[tuple[float, float]],
    *,
    inside: bool = True,
    since: float = 0.0,
) -> LagSummary:
    """Lag of the probe's wake-ups (at or after wall time ``since``) inside ``windows``.

    ``inside=False``: of the wake-ups outside every window instead. Call on the
    probe's loop thread, or once the probe is stopped.
    """
    lags = [
        lag for t, lag in probe.samples(since) if any(a <= t <= b for a, b in windows) == inside
    ]
    return LagSummary(
        samples=len(lags),
        p50_ms=percentile(lags, 50) * 1e3,
        p99_ms=percentile(lags, 99) * 1e3,
        max_ms=max(lags, default=float("nan")) * 1e3,
        interval_ms=probe.interval_s * 1e3,
    )


class ValueSampler:
    """A task on the running loop that records ``(wall time, read())`` every ``interval_s``.

    ``read`` runs on the loop: it must be cheap and non-blocking.
    """

    def __init__(self, read: Callable[[], int], interval_s: float = 0.01) -> None:
        self._read = read
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="bench-sample")

    async def _run(self) -> None:
        while True:
            self.samples.append((time.time(), self._read()))
            await asyncio.sleep(self.interval_s)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


@dataclass(frozen=True)
class Usage:
    """Resource use of the train process while one build or session ran (``getrusage``).

    ``user_s``/``sys_s``: CPU seconds of the whole process (all threads; a session
    running at the same time is included). ``minor_faults``: page faults of the
    whole process (first touch of fresh memory). ``loop_preemptions``:
    involuntary context switches of the thread that started the call (the event
    loop's thread for asyncsync): how often the OS took the CPU away from it.
    ``pooled_before``: bytes the cache had pooled when a build started (a build
    needs fresh, faulting memory for the rest); ``-1`` where not applicable.
    """

    kind: str
    step: int
    wall_s: float
    user_s: float
    sys_s: float
    minor_faults: int
    loop_preemptions: int
    pooled_before: int = -1


class UsageMeter:
    """Measures one call's resource use: ``with meter.measure(kind, step): ...``.

    Started and ended on the same thread (for an async method: the loop thread,
    across its awaits). Records one :class:`Usage` per call in ``records``.
    """

    def __init__(self) -> None:
        self.records: list[Usage] = []

    @contextmanager
    def measure(self, kind: str, step: int, pooled_before: int = -1) -> Iterator[None]:
        start = time.perf_counter()
        proc = resource.getrusage(resource.RUSAGE_SELF)
        thread = resource.getrusage(resource.RUSAGE_THREAD)
        try:
            yield
        finally:
            proc_end = resource.getrusage(resource.RUSAGE_SELF)
            thread_end = resource.getrusage(resource.RUSAGE_THREAD)
            self.records.append(
                Usage(
                    kind=kind,
                    step=step,
                    wall_s=time.perf_counter() - start,
                    user_s=proc_end.ru_utime - proc.ru_utime,
                    sys_s=proc_end.ru_stime - proc.ru_stime,
                    minor_faults=proc_end.ru_minflt - proc.ru_minflt,
                    loop_preemptions=thread_end.ru_nivcsw - thread.ru_nivcsw,
                    pooled_before=pooled_before,
                )
            )
