"""Measure, inside an actor, how long its event loop was blocked.

A blocked loop is the failure asyncsync is built to avoid: while a copy, a
checksum or a ``ray.get`` runs on the actor's loop, no other method of that actor
is answered. Latency measured from outside mixes in Ray's own scheduling; the
probe here measures the loop itself.

:class:`LoopLagProbe` runs one task on the loop that sleeps in short intervals
and records how late each wake-up came (the *lag*). A loop blocked for 300 ms
shows a lag of about 300 ms, whichever task blocked it. A wake-up that is late
*right now* counts too, so a block that has not ended yet (or ended just before
the report was taken) is not missed. With ``history`` set, the probe also keeps
the last wake-ups as ``(wall time, lag)`` pairs (:meth:`LoopLagProbe.samples`), so
lag can be summarized over chosen windows afterwards (percentiles during builds,
say, against the rest).

:class:`LoopLagMixin` gives an async Ray actor class the two methods the pytest
plugin's ``loop_lag_guard`` calls (``loop_lag_start`` and ``loop_lag_report``).
They run in the actor's default concurrency group, so the probe measures the
loop that the cache and every default-group async method run on.

```python
import ray
from asyncsync.testing import LoopLagMixin

class Trainer(LoopLagMixin):
    async def step(self) -> None: ...

actor = ray.remote(Trainer).options(max_concurrency=16).remote()
```
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from dataclasses import dataclass

__all__ = ["LoopLagMixin", "LoopLagProbe", "LoopLagReport"]

DEFAULT_INTERVAL_S = 0.005


@dataclass(frozen=True)
class LoopLagReport:
    """What a probe saw since it started or was last reset.

    ``max_lag_s`` is the longest delay between when the probe task should have
    woken and when it did (or, while it is late now, how late it is). The
    resolution is about ``interval_s``: a block shorter than that may be seen
    only partly.
    """

    max_lag_s: float
    samples: int
    interval_s: float
    running: bool

    @property
    def max_lag_ms(self) -> float:
        return self.max_lag_s * 1e3


class LoopLagProbe:
    """A task on one event loop that records the loop's worst wake-up lag.

    Args:
        interval_s: how long the probe task sleeps between wake-ups; the
            resolution of the measurement and its cost (one wake-up per interval).
        history: how many of the latest wake-ups to keep as ``(wall time, lag)``
            pairs for :meth:`samples` (0: none, only the maximum is kept).

    :meth:`start` binds the probe to the running loop; every other method must be
    called on that loop's thread.
    """

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, *, history: int = 0) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        if history < 0:
            raise ValueError(f"history must be >= 0, got {history!r}")
        self.interval_s = interval_s
        self._history: deque[tuple[float, float]] = deque(maxlen=history)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        # Loop time at which the probe task should run next; a run later than
        # this is lag.
        self._due = 0.0
        self._max_lag = 0.0
        self._samples = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start measuring the running loop now; a no-op if already running.

        Synchronous on purpose: the first due time is set before this returns, so
        a block that starts right after (before the probe task first runs) is
        measured too. Raises ``RuntimeError`` outside a running loop or on a loop
        other than the one the probe was first started on.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not None and loop is not self._loop:
            raise RuntimeError("LoopLagProbe is bound to another event loop")
        if self.running:
            return
        self._loop = loop
        self._due = loop.time()
        self._task = loop.create_task(self._run(), name="asyncsync-loop-lag-probe")

    async def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        keep = self._history.maxlen != 0
        while True:
            now = loop.time()
            lag = now - self._due
            self._max_lag = max(self._max_lag, lag)
            self._samples += 1
            if keep:
                self._history.append((time.time(), max(lag, 0.0)))
            self._due = now + self.interval_s
            await asyncio.sleep(self.interval_s)

    def report(self, *, reset: bool = False) -> LoopLagReport:
        """The worst lag so far, including the current wake-up if it is late now.

        ``reset=True`` starts a new measurement window after taking the report.
        """
        lag = self._max_lag
        if self.running:
            assert self._loop is not None
            lag = max(lag, self._loop.time() - self._due)
        out = LoopLagReport(max(lag, 0.0), self._samples, self.interval_s, self.running)
        if reset:
            self._max_lag = 0.0
            self._samples = 0
            if self.running:
                assert self._loop is not None
                self._due = max(self._due, self._loop.time())
        return out

    def samples(self, since: float = 0.0) -> list[tuple[float, float]]:
        """The kept wake-ups at or after wall time ``since``: ``(time.time(), lag in s)``.

        Empty unless the probe was created with ``history``; the oldest are dropped
        once ``history`` wake-ups are kept.
        """
        return [(t, lag) for t, lag in self._history if t >= since]

    async def stop(self) -> LoopLagReport:
        """Stop the probe task and return the final report."""
        out = self.report()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                # Re-raise only if *we* were cancelled, not the probe task.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            self._task = None
        return LoopLagReport(out.max_lag_s, out.samples, out.interval_s, running=False)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<LoopLagProbe {state} max_lag={self._max_lag * 1e3:.1f} ms samples={self._samples}>"
        )


class LoopLagMixin:
    """Adds ``loop_lag_start`` / ``loop_lag_report`` to an async actor class.

    The probe is created on first use (no ``__init__`` cooperation needed) and
    measures the loop of the actor's default concurrency group. The
    ``loop_lag_guard`` fixture starts it on every actor it watches.
    """

    @functools.cached_property
    def loop_lag_probe(self) -> LoopLagProbe:
        return LoopLagProbe()

    async def loop_lag_start(self, reset: bool = False) -> None:
        """Start the probe on this actor's loop; ``reset=True`` also opens a new window."""
        self.loop_lag_probe.start()
        if reset:
            self.loop_lag_probe.report(reset=True)

    async def loop_lag_report(self, reset: bool = False) -> LoopLagReport:
        """The probe's report; starts the probe if it was not running."""
        report = self.loop_lag_probe.report(reset=reset)
        self.loop_lag_probe.start()
        return report
