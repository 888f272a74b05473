"""Sync sessions end to end on a real local Ray: train actor -> transports -> HF engines."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray
from _actors import TINY_LLAMA, assert_engines_hold, engine_class, make_engine, trainer_class

from asyncsync import SessionError, SessionTimeoutError
from asyncsync.coordinator import SyncCoordinator
from asyncsync.session import SyncPlan
from asyncsync.transport.shm import PREFIX

PROMPT = [[1, 2, 3, 4]]


def shm_leftovers() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(PREFIX)]


class Rig:
    """One train actor and two engines shared by the tests of this module.

    Steps only move forward across tests (``step()`` hands out the next one);
    tests that inject faults clear them before they finish.
    """

    def __init__(self, trainer: Any, engines: dict[str, Any]) -> None:
        self.trainer = trainer
        self.engines = engines
        self._step = -1

    def step(self) -> int:
        self._step += 1
        return self._step

    async def publish(self) -> int:
        return int(await self.trainer.publish.remote(self.step()))


@pytest.fixture(scope="module")
async def rig(ray_local: Any) -> AsyncIterator[Rig]:
    trainer = trainer_class().remote()
    engines = {"e0": engine_class().remote("llama", TINY_LLAMA, seed=1, num_threads=1),
               "e1": engine_class().remote("llama", TINY_LLAMA, seed=2, num_threads=1)}
    await asyncio.gather(trainer.cache_ready_step.remote(), *(e.ping.remote() for e in engines.values()))
    yield Rig(trainer, engines)
    for handle in [trainer, *engines.values()]:
        ray.kill(handle, no_restart=True)


async def wait_for_open_session(engine: Any) -> None:
    for _ in range(1000):
        if (await engine.receiver_stats.remote()).open_sessions:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the engine never saw the session begin")


@pytest.mark.parametrize("transport", ["object_store", "shm"])
async def test_transport_delivers_bit_identical_weights_to_two_engines(
    rig: Rig, transport: str
) -> None:
    step = await rig.publish()
    report = await rig.trainer.run_sync_session.remote(SyncPlan(rig.engines, transport=transport))
    assert report.step == step
    assert report.num_buckets > 4  # 64 KiB buckets: the model spans many
    assert set(report.targets) == {"e0", "e1"}
    assert all(t.version == step for t in report.targets.values())
    await assert_engines_hold(rig.trainer, rig.engines, step)
    assert shm_leftovers() == []
    gen = await rig.engines["e0"].generate.remote(PROMPT)
    assert gen.version == step


async def test_session_overlaps_next_build_and_sends_what_it_pinned(rig: Rig) -> None:
    trainer, engines = rig.trainer, rig.engines
    first = await rig.publish()
    _, digests = await trainer.ready_snapshot_digests.remote()
    await engines["e0"].set_faults.remote(receive_delay_s=0.05)  # a slow engine: ~1 s session
    session = trainer.run_sync_session.remote(SyncPlan(engines))
    await wait_for_open_session(engines["e0"])
    # The next build publishes while the session for `first` is streaming.
    second = await rig.publish()
    assert await trainer.cache_ready_step.remote() == second
    report = await session
    await engines["e0"].set_faults.remote()
    assert report.step == first  # the pinned step, intact, not the newer one
    for engine in engines.values():
        version, have = await engine.state_digests.remote()
        assert version == first
        assert have == digests
    spans = await trainer.sync_spans.remote()
    build = next(s for s in spans if s.kind == "build" and s.step == second)
    streamed = next(s for s in spans if s.kind == "session" and s.step == first)
    assert build.overlaps(streamed), (build, streamed)
    # The next session delivers the newer step.
    report = await trainer.run_sync_session.remote(SyncPlan(engines))
    assert report.step == second
    await assert_engines_hold(trainer, engines, second)
    assert (await trainer.cache_stats.remote()).pins == {}


async def test_asked_for_v_gets_newest_and_coordinator_publishes_it(rig: Rig) -> None:
    asked = await rig.publish()
    newest = await rig.publish()
    coordinator = SyncCoordinator(rig.trainer, rig.engines)
    report = await coordinator.sync(version=asked)
    assert report.requested_version == asked
    assert report.step == newest
    assert coordinator.engine_version == newest
    await assert_engines_hold(rig.trainer, rig.engines, newest)


async def test_failing_receive_aborts_everywhere_and_next_session_succeeds(rig: Rig) -> None:
    trainer, engines = rig.trainer, rig.engines
    held = await rig.publish()
    await trainer.run_sync_session.remote(SyncPlan(engines))
    new = await rig.publish()
    await engines["e1"].set_faults.remote(fail_on_bucket=3)
    with pytest.raises(SessionError, match=r"target 'e1' failed in receive of bucket 3") as info:
        await trainer.run_sync_session.remote(SyncPlan(engines))
    await engines["e1"].set_faults.remote()
    assert info.value.target == "e1"
    assert info.value.step == new
    # Nobody committed: both keep the held version and keep generating on it.
    for engine in engines.values():
        assert (await engine.generate.remote(PROMPT)).version == held
        stats = await engine.receiver_stats.remote()
        assert (stats.version, stats.open_sessions) == (held, ())
    assert (await trainer.cache_stats.remote()).pins == {}
    report = await trainer.run_sync_session.remote(SyncPlan(engines, transport="shm"))
    assert report.step == new
    await assert_engines_hold(trainer, engines, new)
    assert shm_leftovers() == []


async def test_hanging_engine_times_out_and_aborts(rig: Rig) -> None:
    trainer, engines = rig.trainer, rig.engines
    before = {n: (await e.receiver_stats.remote()).version for n, e in engines.items()}
    await rig.publish()
    await engines["e0"].set_faults.remote(hang_on_bucket=2)
    with pytest.raises(SessionTimeoutError, match=r"ran past 1.0s"):
        await trainer.run_sync_session.remote(SyncPlan(engines, timeout_s=1.0))
    await engines["e0"].set_faults.remote()
    for name, engine in engines.items():
        stats = await engine.receiver_stats.remote()
        assert (stats.version, stats.open_sessions) == (before[name], ())
    assert (await trainer.cache_stats.remote()).pins == {}


async def test_coordinator_waits_only_when_staleness_bound_would_break(rig: Rig) -> None:
    trainer, engines = rig.trainer, rig.engines
    await engines["e0"].set_faults.remote(receive_delay_s=0.02)
    first = await rig.publish()
    coordinator = SyncCoordinator(trainer, engines, staleness=1, engine_version=first - 1)
    await coordinator.after_build(first)
    for _ in range(3):
        step = await rig.publish()
        await coordinator.after_build(step)
        # The bound always holds when after_build returns.
        assert step - coordinator.engine_version <= 1
    await coordinator.drain()
    await engines["e0"].set_faults.remote()
    assert coordinator.engine_version == step
    sent = [r.step for r in coordinator.reports]
    assert sent == sorted(sent) and sent[-1] == step
    await assert_engines_hold(trainer, engines, step)


async def test_killed_engine_aborts_session_others_keep_serving(actor_factory: Any) -> None:
    trainer = actor_factory(trainer_class())
    engines = {"e0": make_engine(actor_factory, 1), "e1": make_engine(actor_factory, 2)}
    await trainer.publish.remote(0)
    await trainer.run_sync_session.remote(SyncPlan(engines))
    await trainer.publish.remote(1)
    await engines["e1"].set_faults.remote(receive_delay_s=0.05)
    session = trainer.run_sync_session.remote(SyncPlan(engines, transport="shm"))
    await wait_for_open_session(engines["e1"])
    ray.kill(engines["e1"], no_restart=True)
    with pytest.raises(SessionError, match="target 'e1' failed") as info:
        await session
    assert info.value.target == "e1"
    version, _ = await engines["e0"].state_digests.remote()
    assert version == 0
    assert (await engines["e0"].generate.remote(PROMPT)).version == 0
    assert (await engines["e0"].receiver_stats.remote()).open_sessions == ()
    assert shm_leftovers() == []
    assert (await trainer.cache_stats.remote()).pins == {}
    # Replace the dead engine; the next session brings everyone to 1.
    engines = {"e0": engines["e0"], "e2": make_engine(actor_factory, 3)}
    report = await trainer.run_sync_session.remote(SyncPlan(engines))
    assert report.step == 1
    await assert_engines_hold(trainer, engines, 1)
