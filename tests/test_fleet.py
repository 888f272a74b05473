"""The fleet itself: views, quorum, membership and the keeper, driven from the test's loop.

An :class:`~asyncsync.EngineFleet` is a plain class made to run on the train
actor's loop; here it runs on the test's loop with real engine actors as its
members (no stand-in handles), so its bookkeeping can be checked directly. The
fleet under a train actor and its faults are in ``test_fleet_faults.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray
from _fleet_actors import engine_class
from _waits import eventually, within

from asyncsync import EngineState, FleetError, FleetView, Health, SyncPlan
from asyncsync.client import Deadlines
from asyncsync.fleet import EngineFleet
from asyncsync.keeper import FleetKeeper

pytestmark = pytest.mark.timeout(120)


def state(name: str, health: Health, version: int | None) -> EngineState:
    return EngineState(name, health, version, "inc", None, None, 0.0)


def test_view_routes_by_version_and_counts_only_serving_engines() -> None:
    view = FleetView(
        {
            "a": state("a", Health.SERVING, 7),
            "b": state("b", Health.SERVING, 6),
            "c": state("c", Health.SERVING, 7),
            "d": state("d", Health.CATCHING_UP, 3),
            "e": state("e", Health.QUARANTINED, 1),
            "f": state("f", Health.GONE, 0),
        }
    )
    assert view.serving() == {"a": 7, "b": 6, "c": 7}
    assert view.by_version() == {7: ("a", "c"), 6: ("b",)}
    assert view.oldest_serving() == 6
    assert view.names(Health.CATCHING_UP, Health.QUARANTINED) == ("d", "e")
    assert "a=serving@7" in repr(view) and "e=quarantined@1" in repr(view)
    fresh = FleetView({"a": state("a", Health.SERVING, None)})
    assert fresh.oldest_serving() == -1  # initial weights count as -1
    assert FleetView({}).oldest_serving() is None


@pytest.mark.parametrize(
    ("policy", "min_engines", "engines", "quorum"),
    [
        ("all_or_nothing", 1, 8, 8),  # every engine
        ("per_engine", 1, 8, 1),
        ("per_engine", 6, 8, 6),
        ("per_engine", 12, 8, 8),  # never more than there are
        ("per_engine", 0.75, 8, 6),
        ("per_engine", 0.7, 8, 6),  # rounded up
        ("per_engine", 0.01, 8, 1),  # at least one
        ("per_engine", 1.0, 8, 8),
    ],
)
def test_quorum(policy: str, min_engines: float, engines: int, quorum: int) -> None:
    assert SyncPlan(policy=policy, min_engines=min_engines).quorum(engines) == quorum


@pytest.fixture(scope="module")
async def engines(ray_local: Any) -> AsyncIterator[dict[str, Any]]:
    handles = {f"f{i}": engine_class(max_restarts=2).remote(f"f{i}") for i in range(2)}
    await within(asyncio.gather(*(h.pid.remote() for h in handles.values())), 120)
    yield handles
    for handle in handles.values():
        ray.kill(handle, no_restart=True)


async def test_membership(engines: dict[str, Any]) -> None:
    fleet = EngineFleet(deadlines=Deadlines(call_s=10.0))
    added = await within(fleet.add("f0", engines["f0"]))
    assert (added.health, added.version, added.reason) == (Health.CATCHING_UP, None, "joined")
    assert added.incarnation and added.node_id  # asked the engine, not inferred
    assert (await within(fleet.add("f0", engines["f0"]))) == added  # the same again: no-op
    with pytest.raises(FleetError, match="'f0' is already used"):
        await within(fleet.add("f0", engines["f1"]))
    removed = fleet.removed("f0")
    gone = await fleet.remove("f0")
    assert (gone.health, gone.reason) == (Health.GONE, "removed")
    assert removed.is_set() and "f0" not in fleet
    with pytest.raises(FleetError, match="'f0' is not in the fleet"):
        await fleet.remove("f0")
    await within(fleet.add("f0", engines["f0"]))  # back in, as a new member
    assert fleet.view().engines["f0"].health is Health.CATCHING_UP


async def test_restarted_engine_is_caught_up_at_once_whatever_its_old_back_off(
    engines: dict[str, Any],
) -> None:
    """A quarantined engine backs off (up to 30 s) between catch-ups; a restart by Ray
    is a new process, so the keeper catches the new incarnation up at its next round."""
    probe_s = 1.0
    fleet = EngineFleet(
        {"f1": engines["f1"]},
        initial=Health.SERVING,
        deadlines=Deadlines(probe_interval_s=probe_s),
    )
    await within(fleet.refresh())
    old = fleet.view().engines["f1"].incarnation
    for _ in range(6):  # six failures: a 30 s back-off (1 s doubled, capped)
        fleet.mark("f1", Health.QUARANTINED, "failed")
        fleet.mark("f1", Health.CATCHING_UP, "retrying")
    fleet.mark("f1", Health.QUARANTINED, "failed")
    caught_up: list[float] = []

    async def catch_up(name: str) -> None:
        caught_up.append(time.monotonic())
        fleet.mark(name, Health.SERVING, "caught up")

    keeper = FleetKeeper(fleet, catch_up, lambda: 0)
    keeper.start()
    try:
        await asyncio.sleep(2 * probe_s)
        assert caught_up == []  # still backing off
        ray.kill(engines["f1"], no_restart=False)
        restarted = time.monotonic()

        async def new_incarnation() -> bool:
            return fleet.view().engines["f1"].incarnation not in (None, old)

        await eventually(new_incarnation, "the keeper never saw the restart")

        async def caught() -> bool:
            return bool(caught_up)

        # Well within the 30 s back-off the old process had earned.
        await eventually(caught, "the restarted engine waited for the old back-off", 15.0)
        assert caught_up[0] - restarted < 15.0
        assert fleet.view().engines["f1"].health is Health.SERVING
    finally:
        await keeper.close()
