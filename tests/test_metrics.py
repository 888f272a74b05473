"""The train actor's metrics: the recorder's bookkeeping, and Ray's Prometheus endpoint.

The end-to-end test runs a real fleet on the session's Ray, kills one engine in
the middle of a session (Ray restarts it), and scrapes the node's metrics
endpoint (``ray.nodes()[i]["MetricsExportPort"]``) until it shows the session,
engine-version and quarantine series with the values the fleet reports. Ray's
workers push their metrics to the node's agent every ``metrics_report_interval_ms``
(10 s by default), so the scrape polls within a bound.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import ray
from _fleet_actors import engine_class, trainer_class
from _waits import eventually, within

from asyncsync import ConfigError, Deadlines, EngineState, Health, SyncPlan
from asyncsync.metrics import METRICS, PREFIX, MetricsRecorder, SessionRecord
from asyncsync.plan import Outcome
from asyncsync.protocol import ReceiverStats

pytestmark = pytest.mark.timeout(180)

OPERATING = Path(__file__).resolve().parent.parent / "docs" / "guides" / "operating.md"


def state(name: str, health: Health, version: int | None = None) -> EngineState:
    return EngineState(name, health, version, "inc", None, None, 0.0)


def test_quarantines_are_counted_once_per_entry_into_quarantine() -> None:
    recorder = MetricsRecorder(enabled=False)
    for health in (
        Health.SERVING,
        Health.QUARANTINED,
        Health.QUARANTINED,  # the keeper marks it again while it waits: not a new one
        Health.CATCHING_UP,
        Health.SERVING,
        Health.QUARANTINED,
    ):
        recorder.health_changed(state("e0", health, 3))
    recorder.health_changed(state("e1", Health.SERVING, 3))
    assert recorder._quarantines == {"e0": 2}


def test_session_records_feed_the_summary() -> None:
    recorder = MetricsRecorder(enabled=False)
    outcomes = {"e0": Outcome.COMMITTED, "e1": Outcome.COMMITTED, "e2": Outcome.QUARANTINED}
    phases = {"begin": 0.1, "transfer": 1.0, "commit": 0.5}
    recorder.session(SessionRecord("session", "ok", 4, 100, 0.0, 2.0, outcomes, phases, 1.0))
    recorder.session(
        SessionRecord("catch_up", "ok", 4, 100, 0.0, 1.0, {"e2": Outcome.COMMITTED}, phases, 2.0)
    )
    recorder.session(SessionRecord("session", "QuorumError", 5, 100, 0.0, 1.0, {}, phases, 3.0))
    recorder.refused()
    status = recorder.status()
    assert (status.sessions, status.failed_sessions, status.catch_ups) == (3, 1, 1)
    assert status.admissions_refused == 1
    last = status.last_session
    assert last is not None and last.result == "QuorumError" and last.step == 5
    # Bytes delivered: the snapshot once per engine that committed it.
    recorder.session(SessionRecord("session", "ok", 6, 100, 0.0, 2.0, outcomes, phases, 4.0))
    last = recorder.status().last_session
    assert last is not None and last.delivered_bytes == 200 and last.bytes_per_s == 100.0


def test_every_metric_is_documented_with_its_exported_name() -> None:
    text = OPERATING.read_text()
    for name, (kind, _, _) in METRICS.items():
        exported = f"ray_{PREFIX}{name}" + ("_total" if kind == "counter" else "")
        assert f"`{exported}`" in text, f"{exported} is not in {OPERATING.name}"


def test_metrics_switch_and_interval_are_checked() -> None:
    from _fleet_actors import LightTrainer

    with pytest.raises(ConfigError, match="metrics_interval_s"):
        LightTrainer(metrics_interval_s=0)
    with pytest.raises(ConfigError, match="metrics must be True or False"):
        LightTrainer(metrics="off")


class Sink:
    """Stands in for one Ray metric: keeps what was recorded, by tags."""

    def __init__(self) -> None:
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def _key(self, tags: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((tags or {}).items()))

    def inc(self, value: float, tags: dict[str, str] | None = None) -> None:
        assert value > 0, "a counter only goes up"
        key = self._key(tags)
        self.values[key] = self.values.get(key, 0.0) + value

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.values[self._key(tags)] = value


def stats(incarnation: str, apply_s: float, aborted: int, staged: int) -> ReceiverStats:
    return ReceiverStats(
        version=1,
        incarnation=incarnation,
        open_sessions=(),
        staged_bytes=staged,
        commits=1,
        aborts=aborted,
        rejected_buckets=0,
        dropped={"aborted": aborted},
        apply_s=apply_s,
    )


def test_engine_totals_are_exported_as_increments_across_restarts() -> None:
    recorder = MetricsRecorder()
    recorder._ray = {n: Sink() for n in METRICS}
    recorder._engine_figures("e0", stats("a", 1.0, 2, 100))
    recorder._engine_figures("e0", stats("a", 1.5, 2, 0))
    # Restarted: the new process counts from zero; its totals are all new.
    recorder._engine_figures("e0", stats("b", 0.25, 1, 0))
    apply, dropped = recorder._ray["engine_apply_seconds"], recorder._ray["engine_staging_dropped"]
    assert apply.values == {(("engine", "e0"),): 1.75}
    assert dropped.values == {(("engine", "e0"), ("reason", "aborted")): 3.0}
    assert recorder._ray["engine_staged_bytes"].values == {(("engine", "e0"),): 0.0}


async def test_metrics_false_records_no_ray_metric_but_keeps_the_summary() -> None:
    from _fleet_actors import LightTrainer

    for enabled in (False, True):
        trainer = LightTrainer(metrics=enabled)
        try:
            await trainer.publish(0)
            status = await trainer.fleet_status()
            assert status.metrics is enabled and status.ready_step == 0
            assert set(trainer.metrics._ray) == (set(METRICS) if enabled else set())
        finally:
            await trainer.close()


# --------------------------------------------------------------------- Ray's endpoint


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text: str = answer.read().decode()
        return text


def series(text: str, name: str, **tags: str) -> float | None:
    """The value of the one series ``name`` with these tags (``None``: not there)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(labels.get(k) == v for k, v in tags.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


needs_agent = pytest.mark.skipif(
    importlib.util.find_spec("prometheus_client") is None
    or importlib.util.find_spec("opencensus") is None,
    reason="Ray's metrics agent needs ray[default] (asyncsync[metrics])",
)


@needs_agent
async def test_ray_endpoint_shows_a_killed_engine_quarantined_then_serving(ray_local: Any) -> None:
    trainer_name = f"ops-metrics-{uuid.uuid4().hex[:8]}"
    trainer = trainer_class(name=trainer_name).remote(
        deadlines=Deadlines(probe_interval_s=0.3, call_s=5.0), metrics_interval_s=0.5
    )
    engines = {n: engine_class(max_restarts=1).remote(n) for n in ("e0", "e1")}
    try:
        await within(asyncio.gather(*(e.pid.remote() for e in engines.values())), 120)
        for name, handle in engines.items():
            await within(trainer.fleet_add.remote(name, handle))
        await within(trainer.publish.remote(0))
        report = await within(trainer.run_sync_session.remote(SyncPlan()))
        assert sorted(report.committed) == ["e0", "e1"]

        # e0 dies in the middle of step 1's session; Ray restarts it, the keeper
        # brings the new incarnation to step 1.
        await within(trainer.publish.remote(1))
        await within(engines["e0"].set_faults.remote(die_on_bucket=2))
        report = await within(
            trainer.run_sync_session.remote(SyncPlan(policy="per_engine", min_engines=1))
        )
        assert report.committed == ("e1",)

        async def e0_back() -> bool:
            view = await trainer.fleet_view.remote()
            s = view.engines["e0"]
            return s.health is Health.SERVING and s.version == 1

        await eventually(e0_back, "the restarted e0 never served step 1 again")
        status = await within(trainer.fleet_status.remote())
        assert {e.name: e.quarantines for e in status.engines} == {"e0": 1, "e1": 0}

        node = next(n for n in ray.nodes() if n["Alive"])
        port = int(node["MetricsExportPort"])
        tags = {"trainer": trainer_name}
        want = [
            ("sessions_total", {"kind": "session", "result": "ok"}, 2.0),
            # killed mid-session: quarantined once, then caught up by the keeper
            ("quarantines_total", {"engine": "e0"}, 1.0),
            ("engine_health", {"engine": "e0", "health": "quarantined"}, 0.0),
            ("engine_health", {"engine": "e0", "health": "serving"}, 1.0),
            # step 0 by the session, step 1 by the catch-up of its new incarnation
            ("engine_outcomes_total", {"engine": "e0", "outcome": "committed"}, 2.0),
            ("engine_outcomes_total", {"engine": "e1", "outcome": "committed"}, 2.0),
            ("engine_version", {"engine": "e0"}, 1.0),
            ("engine_version", {"engine": "e1"}, 1.0),
            ("engine_staleness_steps", {"engine": "e0"}, 0.0),
            ("ready_step", {}, 1.0),
        ]
        seen: list[tuple[str, dict[str, str], float | None]] = []

        async def exported() -> bool:
            text = await asyncio.to_thread(scrape, port)
            seen[:] = [(n, t, series(text, f"ray_asyncsync_{n}", **tags, **t)) for n, t, _ in want]
            return seen == want

        try:
            await eventually(exported, "Ray's endpoint never showed the run's series", 60)
        except AssertionError:
            raise AssertionError(f"scraped {seen}, wanted {want}") from None
        # The catch-up that brought e0 back is there too, and the train actor's own figures.
        text = await asyncio.to_thread(scrape, port)
        caught_up = series(text, "ray_asyncsync_catch_ups_total", **tags, engine="e0", result="ok")
        assert caught_up is not None and caught_up >= 1
        assert series(text, "ray_asyncsync_build_seconds_count", **tags) == 2.0
        assert series(text, "ray_asyncsync_snapshot_bytes", **tags) == report.nbytes
        assert (series(text, "ray_asyncsync_resident_bytes", **tags) or 0) >= report.nbytes
        assert series(text, "ray_asyncsync_loop_lag_seconds", **tags) is not None
        received = series(text, "ray_asyncsync_engine_receive_seconds_total", **tags, engine="e1")
        assert received is not None and received > 0
    finally:
        await within(trainer.close.remote())
        for handle in [trainer, *engines.values()]:
            ray.kill(handle)
