"""Waiting never starves the train actor (DESIGN contract 7), on a real local Ray.

Every call in flight holds one of the actor's ``max_concurrency`` slots, a session
waiting for a step not yet built included. The train actor admits at most
``max_concurrency - reserved_slots`` sessions; the rest fail at once with
:class:`~asyncsync.AdmissionError`, so however many sessions wait, the build they
wait for and the small control calls still get a slot.

Each test sends three times ``max_concurrency`` sessions for a step not yet built
and checks, by state rather than by the clock: the excess fail while the admitted
ones still wait (so at once, not after a timeout), naming the bound; control
calls and a user method answer within a generous bound (without the reserve they
would queue behind the waiting sessions forever); the build runs; the admitted
sessions then deliver it, bit for bit; and the next round is admitted again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray
from _fleet_actors import engine_class, trainer_class
from _waits import WAIT_S, within

from asyncsync import AdmissionError, SyncPlan
from asyncsync.actor import RESERVED_SLOTS

pytestmark = pytest.mark.timeout(180)

CONTROL_S = 10.0
"""Bound on a control call while sessions wait (it answers in milliseconds when a slot
is free; without one it would wait for ever)."""


class Rig:
    def __init__(self, trainers: dict[int, Any], engines: dict[str, Any]) -> None:
        self.trainers = trainers
        self.engines = engines
        # One counter for every trainer: they share the engines, whose versions only
        # move forward.
        self.step = -1

    async def publish(self, max_concurrency: int) -> int:
        self.step += 1
        return int(await within(self.trainers[max_concurrency].publish.remote(self.step)))


@pytest.fixture(scope="module")
async def rig(ray_local: Any) -> AsyncIterator[Rig]:
    trainers = {mc: trainer_class(max_concurrency=mc).remote() for mc in (3, 6)}
    engines = {f"a{i}": engine_class().remote(f"a{i}") for i in range(2)}
    await within(
        asyncio.gather(
            *(t.pid.remote() for t in trainers.values()),
            *(e.pid.remote() for e in engines.values()),
        ),
        120,
    )
    yield Rig(trainers, engines)
    for handle in [*trainers.values(), *engines.values()]:
        ray.kill(handle, no_restart=True)


def futures(refs: list[Any]) -> list[asyncio.Future[Any]]:
    return [asyncio.wrap_future(ref.future()) for ref in refs]


async def until_done(futs: list[asyncio.Future[Any]], count: int) -> None:
    """Wait (bounded) until at least ``count`` of ``futs`` are done."""
    async with asyncio.timeout(WAIT_S):
        while sum(f.done() for f in futs) < count:
            await asyncio.wait([f for f in futs if not f.done()], return_when="FIRST_COMPLETED")


@pytest.mark.parametrize("pin_timeout_s", [None, 60.0])
@pytest.mark.parametrize("max_concurrency", [3, 6])
async def test_waiting_sessions_never_starve_builds_or_control_calls(
    rig: Rig, max_concurrency: int, pin_timeout_s: float | None
) -> None:
    trainer = rig.trainers[max_concurrency]
    admitted = max_concurrency - RESERVED_SLOTS
    sent = 3 * max_concurrency
    ready = await rig.publish(max_concurrency)
    before = {n: await within(e.receiver_stats.remote()) for n, e in rig.engines.items()}
    plan = SyncPlan(rig.engines, min_step=ready + 1, pin_timeout_s=pin_timeout_s, timeout_s=WAIT_S)

    for round_ in range(2):  # the second round: admission slots were all given back
        sessions = futures([trainer.run_sync_session.remote(plan) for _ in range(sent)])
        # The excess fail while the admitted ones still wait for their step.
        await until_done(sessions, sent - admitted)
        await asyncio.sleep(0.3)
        done = [f for f in sessions if f.done()]
        waiting = [f for f in sessions if not f.done()]
        assert len(done) == sent - admitted, (round_, len(done))
        for future in done:
            error = future.exception()
            assert isinstance(error, AdmissionError), repr(error)
            assert f"at most {admitted} sessions" in str(error)
            assert f"max_concurrency={max_concurrency}" in str(error)
        # Refused sessions never reached an engine.
        for name, engine in rig.engines.items():
            stats = await within(engine.receiver_stats.remote())
            assert stats.open_sessions == () and stats.commits == before[name].commits

        # Control calls and a user method still run while the admitted ones wait.
        assert await within(trainer.cache_ready_step.remote(), CONTROL_S) == ready
        assert (await within(trainer.cache_stats.remote(), CONTROL_S)).ready_step == ready
        assert (await within(trainer.fleet_view.remote(), CONTROL_S)).engines == {}
        await within(trainer.pid.remote(), CONTROL_S)
        assert not any(f.done() for f in waiting)

        # The build they wait for gets a slot; then the admitted sessions deliver it.
        step = await rig.publish(max_concurrency)
        reports = await within(asyncio.gather(*waiting))
        assert [r.step for r in reports] == [step] * admitted
        for report in reports:
            assert sorted(report.committed) == sorted(rig.engines)
        want = await within(trainer.snapshot_digests.remote(step))
        for engine in rig.engines.values():
            assert await within(engine.state_digests.remote()) == (step, want)
        ready = step
        plan = SyncPlan(
            rig.engines, min_step=ready + 1, pin_timeout_s=pin_timeout_s, timeout_s=WAIT_S
        )
        before = {n: await within(e.receiver_stats.remote()) for n, e in rig.engines.items()}
    stats = await within(trainer.cache_stats.remote())
    assert stats.pins == {}
