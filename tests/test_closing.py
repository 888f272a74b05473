"""Closing means closed, on a real local Ray.

``SyncCoordinator.close()``: a train loop waiting in ``after_build`` or ``drain``
wakes with :class:`~asyncsync.ClosedError`, every later call raises it,
and once ``close()`` returned no session of the coordinator is in flight (no
engine holds its staging) and none starts (the trainer records no session span
after it, the engines no commit).

``WeightSyncActor.close()``: the fleet keeper and its catch-up sessions stop (an
engine left behind is not caught up any more), sessions waiting for a step wake
with :class:`~asyncsync.ClosedError`, and later sessions, builds and fleet
changes raise it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray
from _fleet_actors import engine_class, trainer_class
from _waits import eventually, within

from asyncsync import (
    ClosedError,
    Deadlines,
    Health,
    SyncCoordinator,
    SyncPlan,
)

pytestmark = pytest.mark.timeout(180)

PROBE_S = 0.2
QUIET_S = 1.5
"""How long "nothing starts" is watched: several keeper probe intervals."""


class Rig:
    def __init__(self, engines: dict[str, Any]) -> None:
        self.engines = engines
        self.step = -1
        self.actors: list[Any] = []

    def next_step(self) -> int:
        self.step += 1
        return self.step

    async def trainer(self) -> Any:
        trainer = trainer_class().remote(deadlines=Deadlines(probe_interval_s=PROBE_S, call_s=5.0))
        self.actors.append(trainer)
        await within(trainer.pid.remote(), 120)
        return trainer

    async def engine_stats(self) -> dict[str, Any]:
        return {n: await within(e.receiver_stats.remote()) for n, e in self.engines.items()}

    async def faults(self, **faults: Any) -> None:
        await within(
            asyncio.gather(*(e.set_faults.remote(**faults) for e in self.engines.values()))
        )


@pytest.fixture(scope="module")
async def rig(ray_local: Any) -> AsyncIterator[Rig]:
    engines = {f"c{i}": engine_class().remote(f"c{i}") for i in range(3)}
    await within(asyncio.gather(*(e.pid.remote() for e in engines.values())), 120)
    rig = Rig(engines)
    yield rig
    for handle in [*rig.actors, *engines.values()]:
        ray.kill(handle, no_restart=True)


async def sessions_started_after(trainer: Any, moment: float) -> list[Any]:
    return [
        s
        for s in await within(trainer.sync_spans.remote())
        if s.kind == "session" and s.start >= moment
    ]


async def test_coordinator_close_wakes_waiters_and_nothing_runs_after(rig: Rig) -> None:
    trainer = await rig.trainer()
    coordinator = SyncCoordinator(trainer, rig.engines, staleness=0, plan=SyncPlan(timeout_s=30.0))
    step = await within(trainer.publish.remote(rig.next_step()))
    await within(coordinator.after_build(step))
    assert coordinator.engine_version == step

    # A slow session: the train loop waits for it in after_build and in drain.
    await rig.faults(receive_delay_s=0.5)
    try:
        step = await within(trainer.publish.remote(rig.next_step()))
        waiting = asyncio.ensure_future(coordinator.after_build(step))
        draining = asyncio.ensure_future(coordinator.drain())

        async def streaming() -> bool:
            return all(s.open_sessions for s in (await rig.engine_stats()).values())

        await eventually(streaming, "the coordinator's session never reached the engines")
        assert not waiting.done() and not draining.done()
        await within(coordinator.close())
        closed_at = time.time()
        # No session of it is in flight once close() returned: no staging anywhere.
        stats = await rig.engine_stats()
        assert all(s.open_sessions == () for s in stats.values()), stats
        for waiter in (waiting, draining):
            with pytest.raises(ClosedError):
                await within(waiter)
    finally:
        await rig.faults()
    # Every later call raises, and starts nothing.
    calls = [
        lambda: coordinator.after_build(step),
        coordinator.drain,
        coordinator.sync,
        lambda: coordinator.add_engine("x", rig.engines["c0"]),
        lambda: coordinator.remove_engine("c0"),
    ]
    for call in calls:
        with pytest.raises(ClosedError, match="closed"):
            await within(call())
    await within(coordinator.close())  # idempotent
    await asyncio.sleep(QUIET_S)
    assert await sessions_started_after(trainer, closed_at) == []
    after = await rig.engine_stats()
    assert {n: s.commits for n, s in after.items()} == {n: s.commits for n, s in stats.items()}
    assert all(s.open_sessions == () for s in after.values())
    # The engines kept the step before (the cancelled session aborted everywhere).
    assert {s.version for s in after.values()} == {step - 1}
    assert (await within(trainer.cache_stats.remote())).pins == {}
    await within(trainer.close.remote())


async def test_coordinator_close_during_sync_raises_in_the_loop_not_cancels_it(rig: Rig) -> None:
    """A train loop awaiting ``sync()`` when another task closes the coordinator gets
    ``ClosedError`` and goes on running (its own task was not cancelled by
    its owner); ``close()`` returns once the session ended, without waiting for the loop."""
    trainer = await rig.trainer()
    coordinator = SyncCoordinator(trainer, rig.engines, plan=SyncPlan(timeout_s=30.0))
    await within(trainer.publish.remote(rig.next_step()))
    # First at full speed: the engines join and serve, so the keeper has no
    # catch-up of its own streaming when the slow session below is closed.
    await within(coordinator.sync())
    await within(trainer.publish.remote(rig.next_step()))
    loop_went_on = asyncio.Event()
    release_loop = asyncio.Event()

    async def train_loop() -> BaseException | None:
        error: BaseException | None = None
        try:
            await coordinator.sync()
        except ClosedError as exc:
            error = exc
        loop_went_on.set()
        await release_loop.wait()  # the loop keeps running after close() returned
        return error

    await rig.faults(receive_delay_s=0.5)
    try:
        loop = asyncio.ensure_future(train_loop())

        async def streaming() -> bool:
            return all(s.open_sessions for s in (await rig.engine_stats()).values())

        await eventually(streaming, "the session never reached the engines")
        await within(coordinator.close())
        assert all(s.open_sessions == () for s in (await rig.engine_stats()).values())
        await within(loop_went_on.wait())
        assert not loop.done()
        release_loop.set()
        error = await within(loop)
    finally:
        await rig.faults()
    assert isinstance(error, ClosedError), repr(error)
    assert "closed while this sync ran" in str(error)
    with pytest.raises(ClosedError):
        await within(coordinator.sync())
    await within(trainer.close.remote())


async def test_train_actor_close_stops_keeper_and_catch_ups(rig: Rig) -> None:
    trainer = await rig.trainer()
    for name, engine in rig.engines.items():
        await within(trainer.fleet_add.remote(name, engine))
    step = await within(trainer.publish.remote(rig.next_step()))
    report = await within(trainer.run_sync_session.remote(SyncPlan(timeout_s=30.0)))
    assert sorted(report.committed) == sorted(rig.engines)

    # A new engine joins, slow: the keeper's catch-up session is streaming to it.
    late = engine_class().remote("late")
    rig.actors.append(late)
    await within(late.pid.remote(), 120)
    await within(late.set_faults.remote(receive_delay_s=0.5))
    await within(trainer.fleet_add.remote("late", late))

    async def catching_up() -> bool:
        return bool((await late.receiver_stats.remote()).open_sessions)

    await eventually(catching_up, "the keeper never started catching the new engine up")
    # A session waiting for a step that will never be built.
    waiting = trainer.run_sync_session.remote(
        SyncPlan(min_step=step + 1, pin_timeout_s=None, timeout_s=30.0)
    )
    await asyncio.sleep(0.2)
    await within(trainer.close.remote())
    closed_at = time.time()
    with pytest.raises(ClosedError):
        await within(waiting)
    # The catch-up was stopped and aborted on the engine; nothing catches it up later.
    stats = await within(late.receiver_stats.remote())
    assert stats.open_sessions == () and stats.version is None
    assert stats.dropped.get("aborted") == 1
    await within(late.set_faults.remote())
    await asyncio.sleep(QUIET_S)
    assert (await within(late.receiver_stats.remote())).commits == 0
    assert await sessions_started_after(trainer, closed_at) == []
    assert (await within(trainer.fleet_view.remote())).engines["late"].health is not Health.SERVING
    # Later sessions, builds and fleet changes raise ClosedError.
    refused = [
        trainer.run_sync_session.remote(SyncPlan()),
        trainer.run_sync_session.remote(SyncPlan(dict(rig.engines))),
        trainer.publish.remote(rig.next_step()),
        trainer.fleet_add.remote("again", late),
    ]
    for ref in refused:
        with pytest.raises(ClosedError, match="closed"):
            await within(ref)
    await within(trainer.close.remote())  # idempotent
    await within(trainer.fleet_remove.remote("late"))


async def test_train_actor_close_ends_a_session_in_flight(rig: Rig) -> None:
    """The session streaming when the actor closes is aborted everywhere before
    ``close()`` returns (its transports are closed only then); its caller gets
    ``ClosedError``, not a transport failing under it."""
    trainer = await rig.trainer()
    await within(trainer.publish.remote(rig.next_step()))
    before = await rig.engine_stats()
    await rig.faults(receive_delay_s=0.5)
    try:
        session = trainer.run_sync_session.remote(SyncPlan(dict(rig.engines), timeout_s=30.0))

        async def streaming() -> bool:
            return all(s.open_sessions for s in (await rig.engine_stats()).values())

        await eventually(streaming, "the session never reached the engines")
        await within(trainer.close.remote())
        after = await rig.engine_stats()
        with pytest.raises(ClosedError, match="closed while this session ran"):
            await within(session)
    finally:
        await rig.faults()
    for name, stats in after.items():
        assert stats.open_sessions == ()
        assert stats.version == before[name].version
        assert stats.dropped.get("aborted", 0) == before[name].dropped.get("aborted", 0) + 1
    assert (await within(trainer.cache_stats.remote())).pins == {}
