"""Traces of real runs: ``SyncCoordinator(trace=path)`` and :func:`write_sync_trace`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray
from _fleet_actors import engine_class, trainer_class
from _waits import within

from asyncsync import SyncCoordinator
from asyncsync.spans import Span, write_sync_trace

pytestmark = pytest.mark.timeout(120)


def events(path: Path) -> tuple[dict[int, str], dict[tuple[int, int], str], list[dict[str, Any]]]:
    """(process names by pid, lane names by (pid, tid), the complete events)."""
    trace = json.loads(path.read_text())["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in trace if e["name"] == "process_name"}
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace if e["name"] == "thread_name"}
    return processes, lanes, [e for e in trace if e["ph"] == "X"]


def test_write_sync_trace_lays_each_kind_on_its_lane(tmp_path: Path) -> None:
    trainer = [
        Span("build", 0, 10.0, 10.5),
        Span("session", 0, 10.5, 12.0),
        Span("build", 1, 11.0, 11.4),  # built while step 0 streams
        Span("session", 1, 12.0, 12.5, ok=False),
    ]
    driver = [Span("wait", 1, 11.4, 12.0)]
    path = write_sync_trace(tmp_path / "t.json", trainer, driver)
    processes, lanes, complete = events(path)
    assert processes == {1: "driver", 2: "train actor"}
    assert lanes == {(1, 1): "wait", (2, 1): "build", (2, 2): "session"}
    by_name = {e["name"]: e for e in complete}
    assert by_name["build 1"]["ts"] == 1e6 and by_name["build 1"]["tid"] == 1
    assert by_name["wait 1"]["ts"] == 1.4e6 and by_name["wait 1"]["dur"] == 0.6e6
    assert by_name["session 1"]["args"] == {"step": 1, "ok": False}


async def test_coordinator_writes_the_runs_trace_on_close(ray_local: Any, tmp_path: Path) -> None:
    trainer = trainer_class().remote(metrics=False)
    engine = engine_class().remote("e0", apply_delay_s=0.05)
    path = tmp_path / "run.json"
    coordinator = SyncCoordinator(trainer, {"e0": engine}, staleness=0, trace=path)
    try:
        for step in range(3):
            await within(trainer.publish.remote(step))
            await within(coordinator.after_build(step))
    finally:
        await within(coordinator.close())
    assert path.exists()
    processes, lanes, complete = events(path)
    assert set(processes.values()) == {"driver", "train actor"}
    names = {e["name"] for e in complete}
    assert {"build 0", "build 1", "build 2"} <= names
    assert "session 2" in names
    # staleness=0: once an engine serves, the train loop waits for each step's session.
    assert {"wait 1", "wait 2"} <= names
    driver = next(p for p, n in processes.items() if n == "driver")
    assert {lanes[(driver, e["tid"])] for e in complete if e["pid"] == driver} == {"wait"}
    for handle in (trainer, engine):
        ray.kill(handle)
