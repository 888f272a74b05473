"""What a train actor exports about itself, its sessions and its engines.

One :class:`MetricsRecorder` per train actor (:class:`~asyncsync.WeightSyncActor`
owns it). It does two things:

* it keeps a small in-memory summary (:class:`FleetStatus`, read by ``asyncsync
  status`` through the actor's ``fleet_status()``), always;
* unless the actor was made with ``metrics=False``, it records Ray metrics
  (``ray.util.metrics``), which Ray's metrics agent serves on each node's
  Prometheus endpoint (``ray_`` is prefixed to every name there; counters get
  ``<name>_total``). Serving them needs Ray's ``default`` extra (``asyncsync[metrics]``);
  without it, recording costs the same and nothing is served.

Where figures come from:

* the session, build and admission hooks (a few lines in the actor and the
  session) record what happened when it happened: sessions by kind and result,
  phase times, bytes delivered, each engine's outcome, refusals;
* the fleet tells the recorder of every health change (``EngineFleet.on_change``),
  so a quarantine is counted once, when it happens, whatever the scrape interval;
* a sampler task on the actor's loop wakes every :data:`LAG_TICK_S` (the loop lag
  is how late it wakes) and every ``interval_s`` sets the gauges: the cache's
  ready step, pins, resident bytes and lock hold; each engine's served version,
  health and staleness; and, from each engine's ``receiver_stats()`` (one bounded
  call per engine per interval, which never changes the engine's health), its
  receive/verify/apply time, staged bytes and dropped staging. Engines export
  nothing themselves: an engine process needs neither Ray's metrics agent nor a
  recorder, and every figure carries the train actor's ``trainer`` tag.

Tags are low-cardinality on purpose: the train actor's name, engine names, a
phase, a health, an outcome, a reason, an error class. Never a session id or a
step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .client import EngineClient
from .fleet import EngineFleet, EngineState, Health
from .plan import Outcome
from .protocol import ReceiverStats

if TYPE_CHECKING:
    from .cache import BucketCache

__all__ = [
    "EngineStatus",
    "FleetStatus",
    "LastSession",
    "METRICS",
    "MetricsRecorder",
    "PHASES",
    "SessionRecord",
]

_log = logging.getLogger(__name__)

PREFIX = "asyncsync_"
LAG_TICK_S = 0.25
"""How often the sampler wakes to measure the loop's lag (a sleep and a clock read)."""

PHASES = ("pin_wait", "begin", "transfer", "commit", "total")
"""Phases of ``asyncsync_session_seconds``: waiting for the step's pin, then the
slowest engine's ``begin``, transfer and commit, then the whole session after the pin."""

_SECONDS = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]

# name -> (kind, description, tag keys besides "trainer"). Documented in
# docs/guides/operating.md; tests/test_metrics.py checks both agree.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # the train actor
    "ready_step": ("gauge", "Newest published step of the train actor's cache.", ()),
    "build_seconds": ("histogram", "Time to build and publish one snapshot.", ()),
    "snapshot_bytes": ("gauge", "Payload bytes of the newest snapshot built.", ()),
    "lock_hold_max_seconds": (
        "gauge",
        "Longest hold of the cache's lock since the actor started.",
        (),
    ),
    "loop_lag_seconds": (
        "gauge",
        "Worst lateness of the actor's event loop over the last sampling interval.",
        (),
    ),
    "pins_held": ("gauge", "Pins held on the cache's snapshots now (readers in flight).", ()),
    "resident_bytes": ("gauge", "Host memory held by the cache's snapshots and pool.", ()),
    "admissions_refused": (
        "counter",
        "Sessions refused at once because the actor ran as many as it admits.",
        (),
    ),
    # sessions
    "sessions": (
        "counter",
        "Sessions that ended, by kind and result (ok or the error).",
        ("kind", "result"),
    ),
    "session_seconds": ("histogram", "Session time by phase.", ("kind", "phase")),
    "delivered_bytes": (
        "counter",
        "Snapshot bytes delivered: the snapshot's size for each engine that committed it.",
        ("kind",),
    ),
    "engine_outcomes": (
        "counter",
        "What became of each engine in each session (committed, current, quarantined, ...).",
        ("engine", "outcome"),
    ),
    "quarantines": (
        "counter",
        "Times an engine was quarantined (failed, hung, unreachable).",
        ("engine",),
    ),
    "catch_ups": (
        "counter",
        "Catch-up sessions the fleet's keeper ran, by result.",
        ("engine", "result"),
    ),
    # engines, as the train actor sees them
    "engine_version": ("gauge", "Step an engine serves, as the engine reported it.", ("engine",)),
    "engine_health": (
        "gauge",
        "1 for an engine's current health, 0 for the others.",
        ("engine", "health"),
    ),
    "engine_staleness_steps": (
        "gauge",
        "Steps an engine's served version is behind the ready step.",
        ("engine",),
    ),
    "engine_receive_seconds": (
        "counter",
        "Engine worker-thread time getting received buckets' bytes (load).",
        ("engine",),
    ),
    "engine_verify_seconds": ("counter", "Engine time verifying buckets (checksums).", ("engine",)),
    "engine_apply_seconds": ("counter", "Engine time applying commits.", ("engine",)),
    "engine_staged_bytes": (
        "gauge",
        "Bytes an engine holds staged, not yet committed.",
        ("engine",),
    ),
    "engine_staging_dropped": (
        "counter",
        "Staging an engine dropped without a commit, by reason.",
        ("engine", "reason"),
    ),
}


@dataclass(frozen=True)
class SessionRecord:
    """What one ended session tells the recorder (built by the session itself)."""

    kind: str
    result: str
    """``"ok"``, or the class name of the error it ended with."""
    step: int | None
    nbytes: int
    pin_wait_s: float
    seconds: float
    """After the pin; ``0`` if it never pinned."""
    outcomes: Mapping[str, Outcome]
    phases: Mapping[str, float]
    """``begin``, ``transfer``, ``commit``: the slowest engine's time in each."""
    ended_at: float


@dataclass(frozen=True)
class LastSession:
    ended_at: float
    kind: str
    result: str
    step: int | None
    seconds: float
    delivered_bytes: int

    @property
    def bytes_per_s(self) -> float:
        return self.delivered_bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EngineStatus:
    name: str
    node_id: str | None
    health: str
    version: int | None
    staleness: int | None
    """Steps behind the ready step (``None``: nothing ready, or no delivered version)."""
    reason: str | None
    since: float
    quarantines: int


@dataclass(frozen=True)
class FleetStatus:
    """One train actor and its fleet at one instant (what ``asyncsync status`` shows)."""

    trainer: str
    ready_step: int | None
    building_step: int | None
    pins: int
    resident_bytes: int
    sessions: int
    failed_sessions: int
    catch_ups: int
    admissions_refused: int
    last_session: LastSession | None
    engines: tuple[EngineStatus, ...]
    metrics: bool
    """Whether the actor records Ray metrics."""
    taken_at: float = field(default_factory=time.time)


class MetricsRecorder:
    """The train actor's figures; see the module docstring.

    Args:
        enabled: record Ray metrics (``False``: only the in-memory summary).
        interval_s: how often the sampler sets the gauges and asks each engine
            for its ``receiver_stats()``. Keep it under twice Ray's
            ``metrics_report_interval_ms`` (10 s by default): Ray's agent drops a
            gauge's series that was not recorded again within that.

    Use from the train actor's loop. :meth:`start` binds it to the cache and the
    fleet and starts the sampler; :meth:`close` stops it.
    """

    def __init__(self, *, enabled: bool = True, interval_s: float = 5.0) -> None:
        self.enabled = enabled
        self.interval_s = interval_s
        self.trainer = "local"
        self._ray: dict[str, Any] = {}
        self._cache: BucketCache | None = None
        self._fleet: EngineFleet | None = None
        self._stats_client: EngineClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._lag_max = 0.0
        # The in-memory summary.
        self._sessions = 0
        self._failed = 0
        self._catch_ups = 0
        self._refused = 0
        self._last: LastSession | None = None
        self._quarantines: dict[str, int] = {}
        self._health: dict[str, Health] = {}
        # Per engine: (incarnation, the last ReceiverStats seen), to export deltas.
        self._engine_stats: dict[str, tuple[str, ReceiverStats]] = {}

    def __repr__(self) -> str:
        state = "on" if self.enabled else "off"
        return (
            f"<MetricsRecorder {self.trainer} ray-metrics={state} sessions={self._sessions} "
            f"failed={self._failed} refused={self._refused}>"
        )

    # ----------------------------------------------------------------- life

    def start(self, cache: BucketCache, fleet: EngineFleet) -> None:
        """Bind to the actor's cache and fleet and start the sampler (idempotent)."""
        if self._closed or self._task is not None:
            return
        self._cache, self._fleet = cache, fleet
        self._stats_client = EngineClient(fleet.handle, fleet.deadlines)  # no on_failure
        fleet.on_change = self.health_changed
        self.trainer = _trainer_name()
        if self.enabled:
            self._ray = _make_metrics(self.trainer)
        for state in fleet.view().engines.values():
            self.health_changed(state)
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def close(self) -> None:
        """Stop the sampler (idempotent)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ----------------------------------------------------------------- hooks

    def build(self, seconds: float, nbytes: int) -> None:
        """A snapshot was built and published."""
        self._observe("build_seconds", seconds)
        self._set("snapshot_bytes", nbytes)

    def refused(self) -> None:
        """A session was refused admission."""
        self._refused += 1
        self._inc("admissions_refused")

    def session(self, record: SessionRecord) -> None:
        """A session (or catch-up) ended."""
        ok = record.result == "ok"
        committed = sum(1 for o in record.outcomes.values() if o is Outcome.COMMITTED)
        delivered = record.nbytes * committed
        self._sessions += 1
        self._failed += 0 if ok else 1
        self._last = LastSession(
            record.ended_at, record.kind, record.result, record.step, record.seconds, delivered
        )
        kind = record.kind
        self._inc("sessions", kind=kind, result=record.result)
        if kind == "catch_up":
            self._catch_ups += 1
            for engine in record.outcomes:
                self._inc("catch_ups", engine=engine, result=record.result)
        if record.step is None:
            return  # never pinned: no phase but the wait
        self._observe("session_seconds", record.pin_wait_s, kind=kind, phase="pin_wait")
        for phase, seconds in record.phases.items():
            self._observe("session_seconds", seconds, kind=kind, phase=phase)
        self._observe("session_seconds", record.seconds, kind=kind, phase="total")
        if delivered:
            self._inc("delivered_bytes", delivered, kind=kind)
        for engine, outcome in record.outcomes.items():
            self._inc("engine_outcomes", engine=engine, outcome=outcome.value)

    def health_changed(self, state: EngineState) -> None:
        """The fleet set an engine's health (called by the fleet on every change)."""
        name = state.name
        old = self._health.get(name)
        self._health[name] = state.health
        if state.health is Health.QUARANTINED and old is not Health.QUARANTINED:
            self._quarantines[name] = self._quarantines.get(name, 0) + 1
            self._inc("quarantines", engine=name)
        if old is not state.health:
            self._set_health(name, state.health)
        self._set_version(name, state.version)

    # ----------------------------------------------------------------- summary

    def status(self) -> FleetStatus:
        """The train actor and its fleet now (call on the actor's loop, after :meth:`start`)."""
        ready = building = None
        pins = resident = 0
        if self._cache is not None:
            stats = self._cache.stats()
            ready, building = stats.ready_step, stats.building_step
            pins, resident = sum(stats.pins.values()), stats.resident_bytes
        engines = []
        if self._fleet is not None:
            for state in self._fleet.view().engines.values():
                engines.append(
                    EngineStatus(
                        name=state.name,
                        node_id=state.node_id,
                        health=state.health.value,
                        version=state.version,
                        staleness=_staleness(ready, state.version),
                        reason=state.reason,
                        since=state.since,
                        quarantines=self._quarantines.get(state.name, 0),
                    )
                )
        return FleetStatus(
            trainer=self.trainer,
            ready_step=ready,
            building_step=building,
            pins=pins,
            resident_bytes=resident,
            sessions=self._sessions,
            failed_sessions=self._failed,
            catch_ups=self._catch_ups,
            admissions_refused=self._refused,
            last_session=self._last,
            engines=tuple(sorted(engines, key=lambda e: e.name)),
            metrics=self.enabled,
        )

    # ----------------------------------------------------------------- the sampler

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        next_gauges = loop.time()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_TICK_S)
            self._lag_max = max(self._lag_max, loop.time() - before - LAG_TICK_S)
            if loop.time() >= next_gauges:
                next_gauges = loop.time() + self.interval_s
                self._set("loop_lag_seconds", self._lag_max)
                self._lag_max = 0.0
                try:
                    self._sample_cache()
                    await self._sample_engines()
                except Exception:
                    # Figures are never worth failing the actor for; say so and go on.
                    _log.warning("asyncsync metrics: sampling failed", exc_info=True)

    def _sample_cache(self) -> None:
        if self._cache is None:
            return
        stats = self._cache.stats()
        if stats.ready_step is not None:
            self._set("ready_step", stats.ready_step)
        self._set("pins_held", sum(stats.pins.values()))
        self._set("resident_bytes", stats.resident_bytes)
        self._set("lock_hold_max_seconds", stats.max_lock_hold_s)

    async def _sample_engines(self) -> None:
        fleet, client = self._fleet, self._stats_client
        if fleet is None or client is None:
            return
        view = fleet.view()
        for state in view.engines.values():
            # Set again every interval, changed or not: Ray's metrics agent evicts a
            # gauge's series not recorded again within two of its report intervals
            # (ray/_private/telemetry/open_telemetry_metric_recorder.py, Ray 2.60).
            self._set_health(state.name, state.health)
            self._set_version(state.name, state.version)
        if not self.enabled:
            return  # the summary needs no engine figures
        names = [n for n, s in view.engines.items() if s.health is not Health.GONE]
        results = await asyncio.gather(
            *(client.receiver_stats(n) for n in names), return_exceptions=True
        )
        for name, stats in zip(names, results, strict=True):
            if isinstance(stats, ReceiverStats):
                self._engine_figures(name, stats)

    def _engine_figures(self, name: str, stats: ReceiverStats) -> None:
        seen = self._engine_stats.get(name)
        # A new incarnation starts its totals from zero: count them all.
        last = seen[1] if seen is not None and seen[0] == stats.incarnation else None
        self._engine_stats[name] = (stats.incarnation, stats)
        for metric, attr in (
            ("engine_receive_seconds", "load_s"),
            ("engine_verify_seconds", "verify_s"),
            ("engine_apply_seconds", "apply_s"),
        ):
            delta = getattr(stats, attr) - (getattr(last, attr) if last else 0.0)
            if delta > 0:
                self._inc(metric, delta, engine=name)
        for reason, count in stats.dropped.items():
            delta = count - (last.dropped.get(reason, 0) if last else 0)
            if delta > 0:
                self._inc("engine_staging_dropped", delta, engine=name, reason=reason)
        self._set("engine_staged_bytes", stats.staged_bytes, engine=name)

    def _set_health(self, name: str, now: Health) -> None:
        for health in Health:
            self._set("engine_health", float(health is now), engine=name, health=health.value)

    def _set_version(self, name: str, version: int | None) -> None:
        # An engine serving its initial weights (no delivered version) has no series.
        if version is None:
            return
        self._set("engine_version", version, engine=name)
        ready = self._cache.ready_step if self._cache is not None else None
        staleness = _staleness(ready, version)
        if staleness is not None:
            self._set("engine_staleness_steps", staleness, engine=name)

    # ----------------------------------------------------------------- Ray

    def _set(self, name: str, value: float, **tags: str) -> None:
        metric = self._ray.get(name)
        if metric is not None:
            metric.set(value, tags=tags or None)

    def _inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        metric = self._ray.get(name)
        if metric is not None:
            metric.inc(value, tags=tags or None)

    def _observe(self, name: str, value: float, **tags: str) -> None:
        metric = self._ray.get(name)
        if metric is not None:
            metric.observe(value, tags=tags or None)


def session_phases(times: Sequence[tuple[float, float, float]]) -> dict[str, float]:
    """``begin``, ``transfer``, ``commit``: the slowest engine's time in each."""
    return {
        phase: max((t[i] for t in times), default=0.0)
        for i, phase in enumerate(("begin", "transfer", "commit"))
    }


def _staleness(ready: int | None, version: int | None) -> int | None:
    if ready is None or version is None:
        return None
    return max(0, ready - version)


def _trainer_name() -> str:
    """The train actor's Ray name, else its actor id, else ``"local"`` (outside an actor)."""
    try:
        import ray

        if not ray.is_initialized():
            return "local"
        context = ray.get_runtime_context()
        actor_id = context.get_actor_id()
        if actor_id is None:
            return "local"
        name: str | None = context.get_actor_name()
        return name or f"actor-{actor_id[:12]}"
    except Exception:  # Ray's context API differs by version: a name is not worth failing for
        return "local"


def _make_metrics(trainer: str) -> dict[str, Any]:
    from ray.util import metrics

    made: dict[str, Any] = {}
    for name, (kind, description, tags) in METRICS.items():
        keys = ("trainer", *tags)
        full = PREFIX + name
        metric: Any
        if kind == "gauge":
            metric = metrics.Gauge(full, description, tag_keys=keys)
        elif kind == "counter":
            metric = metrics.Counter(full, description, tag_keys=keys)
        else:
            metric = metrics.Histogram(full, description, boundaries=_SECONDS, tag_keys=keys)
        metric.set_default_tags({"trainer": trainer})
        made[name] = metric
    return made
