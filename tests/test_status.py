"""``asyncsync status`` against the session's Ray: a named train actor and its fleet.

The command runs as a separate driver (one Ray per process) joining the test's
``ray_local`` cluster by its address; the live view's first frame is checked in
this process with rich's recording console.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import ray
from _fleet_actors import engine_class, trainer_class
from _waits import eventually, within
from rich.console import Console

from asyncsync import Deadlines, Health, SyncPlan, status

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = f"ops-status-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
async def fleet(ray_local: Any) -> AsyncIterator[dict[str, Any]]:
    trainer = trainer_class(name="trainer", namespace=NAMESPACE).remote(
        deadlines=Deadlines(probe_interval_s=0.3, call_s=5.0), metrics=False
    )
    engines = {n: engine_class().remote(n) for n in ("gen0", "gen1")}
    await within(asyncio.gather(*(e.pid.remote() for e in engines.values())), 120)
    for name, handle in engines.items():
        await within(trainer.fleet_add.remote(name, handle))
    await within(trainer.publish.remote(0))
    await within(trainer.publish.remote(1))
    report = await within(trainer.run_sync_session.remote(SyncPlan()))
    assert sorted(report.committed) == ["gen0", "gen1"]

    async def both_serving() -> bool:
        view = await trainer.fleet_view.remote()
        return all(s.health is Health.SERVING for s in view.engines.values())

    await eventually(both_serving, "the fleet never served")
    yield {"address": ray_local["address"], "trainer": trainer, "engines": engines}
    await within(trainer.close.remote())
    for handle in [trainer, *engines.values()]:
        ray.kill(handle)


async def run_cli(address: str, *args: str) -> tuple[int, str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", COLUMNS="160")
    env.pop("RAY_ADDRESS", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "asyncsync.cli",
        "status",
        "--address",
        address,
        "--namespace",
        NAMESPACE,
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await within(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_json_lists_the_named_train_actor_and_its_engines(fleet: dict[str, Any]) -> None:
    code, out, err = await run_cli(fleet["address"], "--json")
    assert code == 0, err
    doc = json.loads(out)
    (actor,) = doc["train_actors"]
    assert (actor["namespace"], actor["name"], actor["error"]) == (NAMESPACE, "trainer", None)
    assert actor["ready_step"] == 1
    assert actor["metrics"] is False
    engines = {e["name"]: e for e in actor["engines"]}
    assert set(engines) == {"gen0", "gen1"}
    for engine in engines.values():
        assert (engine["health"], engine["version"], engine["staleness"]) == ("serving", 1, 0)
        assert engine["node_id"] == ray.get_runtime_context().get_node_id()
    last = actor["last_session"]
    assert last["result"] == "ok" and last["step"] == 1 and last["bytes_per_s"] > 0


async def test_once_prints_one_table(fleet: dict[str, Any]) -> None:
    code, out, err = await run_cli(fleet["address"], "--once")
    assert code == 0, err
    assert f"{NAMESPACE}/trainer" in out and "ready step 1" in out
    rows = [line for line in out.splitlines() if "gen0" in line or "gen1" in line]
    assert len(rows) == 2 and all("serving" in row for row in rows), out
    assert "last session: ok, step 1" in out


async def test_a_namespace_without_train_actors_says_so(fleet: dict[str, Any]) -> None:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "asyncsync.cli",
        "status",
        "--address",
        fleet["address"],
        "--namespace",
        "nobody-here",
        "--once",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await within(proc.communicate(), 120)
    assert proc.returncode == 0
    assert "no named train actor found" in out.decode()


async def test_live_view_first_frame(fleet: dict[str, Any]) -> None:
    console = Console(record=True, file=io.StringIO(), width=160, force_terminal=True)

    def source() -> list[status.Found]:
        return status.fetch(NAMESPACE)

    await asyncio.to_thread(status.watch, source, console, 0.1, 1)
    # What the console received: the frame drawn live, then the same frame again as
    # Live stops (in a terminal it is redrawn in place); check the first one.
    text = console.export_text()
    title = f"{NAMESPACE}/trainer  ready step 1"
    assert text.count(title) == 2, text
    first = text.split(title)[1]
    rows = [line for line in first.splitlines() if "gen0" in line or "gen1" in line]
    assert len(rows) == 2 and all("serving" in row for row in rows), text
    assert "last session: ok, step 1" in first


async def test_a_quarantined_engine_shows_as_quarantined(fleet: dict[str, Any]) -> None:
    trainer, engines = fleet["trainer"], fleet["engines"]
    await within(trainer.publish.remote(2))
    await within(engines["gen1"].set_faults.remote(fail_on_bucket=1))
    try:
        report = await within(
            trainer.run_sync_session.remote(SyncPlan(policy="per_engine", min_engines=1))
        )
        assert report.quarantined == ("gen1",)
        found = await asyncio.to_thread(status.fetch, NAMESPACE)
    finally:
        await within(engines["gen1"].set_faults.remote())
    (actor,) = found
    assert actor.status is not None
    gen1 = next(e for e in actor.status.engines if e.name == "gen1")
    # The keeper may already be catching it up: what counts is that it left serving.
    assert gen1.quarantines == 1 and gen1.health in ("quarantined", "catching_up")
    assert gen1.version == 1 and gen1.staleness == 1
