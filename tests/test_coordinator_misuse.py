"""Misuse of a :class:`~asyncsync.SyncCoordinator` fails at once, typed, on a real local Ray.

- ``after_build(step)`` for a step the train actor never built (not ready, not
  older than the ready step, not building) raises
  :class:`~asyncsync.NothingBuiltError` at once under any staleness, and ``drain``
  does not wait for that step.
- A second coordinator on one train actor raises :class:`~asyncsync.ConfigError`
  from every call that would run a session or change the fleet while the first is
  open; once the first is closed (or dropped unclosed and collected) it works.
  Adding the same engine under the same name concurrently is a no-op.
- ``NothingBuiltError`` from a session names the fix of its caller:
  ``SyncPlan(min_step=...)`` from ``run_sync_session``, ``sync(min_step=...)`` from
  the coordinator, never the cache's ``read(min_step=...)``.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray
from _fleet_actors import engine_class, trainer_class
from _waits import within

from asyncsync import ConfigError, FleetError, NothingBuiltError, SyncCoordinator, SyncPlan
from asyncsync.client import Deadlines
from asyncsync.fleet import EngineFleet

pytestmark = pytest.mark.timeout(120)


class Rig:
    def __init__(self, engines: dict[str, Any]) -> None:
        self.engines = engines
        self.actors: list[Any] = []
        self.base = 0

    def steps(self) -> int:
        """A base step above every step the shared engines may serve (fresh trainers
        start from nothing built; the engines keep what they serve)."""
        self.base += 10
        return self.base

    async def trainer(self) -> Any:
        """A fresh train actor: nothing built, no coordinator, engines not yet added."""
        trainer = trainer_class().remote(deadlines=Deadlines(probe_interval_s=0.2, call_s=5.0))
        self.actors.append(trainer)
        await within(trainer.pid.remote(), 120)
        return trainer

    async def served(self) -> set[int | None]:
        return {(await within(e.receiver_stats.remote())).version for e in self.engines.values()}


@pytest.fixture(scope="module")
async def rig(ray_local: Any) -> AsyncIterator[Rig]:
    engines = {f"m{i}": engine_class().remote(f"m{i}") for i in range(2)}
    await within(asyncio.gather(*(e.pid.remote() for e in engines.values())), 120)
    rig = Rig(engines)
    yield rig
    for handle in [*rig.actors, *engines.values()]:
        ray.kill(handle, no_restart=True)


async def session_spans(trainer: Any) -> int:
    return sum(s.kind == "session" for s in await within(trainer.sync_spans.remote()))


@pytest.mark.parametrize("staleness", [0, 1])
async def test_after_build_of_a_step_never_built_raises_at_once(rig: Rig, staleness: int) -> None:
    trainer, b = await rig.trainer(), rig.steps()
    # No pin bound: a session asked for a step never built would wait forever.
    coordinator = SyncCoordinator(
        trainer, rig.engines, staleness=staleness, plan=SyncPlan(pin_timeout_s=None)
    )
    try:
        with pytest.raises(NothingBuiltError) as info:
            await within(coordinator.after_build(b))
        assert f"never built step {b}" in str(info.value)
        assert "ready step None, no build is in flight" in str(info.value)
        assert await session_spans(trainer) == 0  # nothing was started for it

        await within(trainer.publish.remote(b))
        await within(coordinator.after_build(b))
        await within(coordinator.drain())
        assert coordinator.engine_version == b

        with pytest.raises(NothingBuiltError) as info:
            await within(coordinator.after_build(b + 2))
        assert f"never built step {b + 2}" in str(info.value)
        assert f"ready step {b}, no build is in flight" in str(info.value)
        # The refused step is not waited for: drain returns with the engines at b.
        await within(coordinator.drain())
        assert coordinator.engine_version == b and await rig.served() == {b}

        # A step older than the ready one was superseded, not missing: accepted.
        await within(trainer.publish.remote(b + 3))
        await within(coordinator.after_build(b + 1))
        await within(coordinator.drain())
        assert coordinator.engine_version == b + 3 and await rig.served() == {b + 3}
    finally:
        await within(coordinator.close())


async def test_second_coordinator_is_refused_until_the_first_is_closed(rig: Rig) -> None:
    trainer, b = await rig.trainer(), rig.steps()
    await within(trainer.publish.remote(b))
    first = SyncCoordinator(trainer, rig.engines, staleness=0)
    second = SyncCoordinator(trainer, rig.engines, staleness=0)
    await within(first.after_build(b))
    sessions = await session_spans(trainer)
    calls = [
        lambda: second.after_build(b),
        second.drain,
        second.sync,
        lambda: second.add_engine("m0", rig.engines["m0"]),
        lambda: second.remove_engine("m0"),
    ]
    for call in calls:
        with pytest.raises(ConfigError) as info:
            await within(call())
        message = str(info.value)
        assert repr(trainer) in message, message  # names the train actor
        assert f"pid {os.getpid()}" in message and "close()" in message, message
    assert await session_spans(trainer) == sessions  # the refused one started nothing
    assert set((await within(trainer.fleet_view.remote())).engines) == set(rig.engines)

    await within(first.close())
    # Released: the second one drives the fleet now; re-adding its engines is a no-op.
    await within(trainer.publish.remote(b + 1))
    await within(second.after_build(b + 1))
    assert second.engine_version == b + 1 and await rig.served() == {b + 1}
    with pytest.raises(ConfigError, match="already has an open SyncCoordinator"):
        await within(SyncCoordinator(trainer).drain())  # nor a third while one is open

    # A coordinator dropped unclosed releases the train actor once collected.
    await within(second.close())
    third = SyncCoordinator(trainer, staleness=0)
    await within(third.drain())
    del third
    gc.collect()
    fourth = SyncCoordinator(trainer, staleness=0)
    await within(trainer.publish.remote(b + 2))
    await within(fourth.after_build(b + 2))
    assert fourth.engine_version == b + 2
    await within(fourth.close())


async def test_concurrent_adds_of_one_engine_under_one_name_are_a_no_op(rig: Rig) -> None:
    fleet = EngineFleet(deadlines=Deadlines(call_s=10.0))
    engine, other = rig.engines["m0"], rig.engines["m1"]
    try:
        # Both probe the engine before either is recorded.
        first, again = await within(asyncio.gather(fleet.add("a", engine), fleet.add("a", engine)))
        assert first == again and list(fleet.view().engines) == ["a"]
        results = await within(
            asyncio.gather(fleet.add("b", engine), fleet.add("b", other), return_exceptions=True)
        )
        # Whichever probe answered second finds the name taken by the other handle.
        errors = [r for r in results if isinstance(r, FleetError)]
        assert len(errors) == 1, results
        assert "'b' is already used by another handle" in str(errors[0])
        winner = engine if isinstance(results[1], FleetError) else other
        assert fleet.handle("b") == winner
    finally:
        fleet.close()


async def test_nothing_built_names_the_callers_fix(rig: Rig) -> None:
    trainer = await rig.trainer()
    with pytest.raises(NothingBuiltError) as info:
        await within(trainer.run_sync_session.remote(SyncPlan(rig.engines, timeout_s=30.0)))
    assert "SyncPlan(min_step=...)" in str(info.value)
    assert "read(min_step" not in str(info.value)

    coordinator = SyncCoordinator(trainer, rig.engines)
    try:
        with pytest.raises(NothingBuiltError) as info:
            await within(coordinator.sync())
        assert "sync(min_step=...)" in str(info.value)
        assert "read(min_step" not in str(info.value)
        assert "SyncPlan(" not in str(info.value)
    finally:
        await within(coordinator.close())
