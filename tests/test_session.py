"""Sync sessions end to end on a real local Ray: train actor -> transports -> HF engines.

Faults (killed, failing and hanging engines, cancellation) are in ``test_faults.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray
from _actors import (
    TINY_LLAMA,
    assert_engines_hold,
    assert_no_stale_mappings,
    engine_class,
    engine_mappings,
    trainer_class,
)
from _memfd import open_buffers

from asyncsync.coordinator import SyncCoordinator
from asyncsync.plan import SyncPlan

PROMPT = [[1, 2, 3, 4]]


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
    engines = {
        "e0": engine_class().remote("llama", TINY_LLAMA, seed=1, num_threads=1),
        "e1": engine_class().remote("llama", TINY_LLAMA, seed=2, num_threads=1),
    }
    await asyncio.gather(
        trainer.cache_ready_step.remote(), *(e.ping.remote() for e in engines.values())
    )
    yield Rig(trainer, engines)
    await trainer.close.remote()
    for handle in [trainer, *engines.values()]:
        ray.kill(handle, no_restart=True)


async def wait_for_open_session(engine: Any) -> None:
    for _ in range(1000):
        if (await engine.receiver_stats.remote()).open_sessions:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the engine never saw the session begin")


@pytest.mark.parametrize("transport", ["object_store", "shm", "auto"])
async def test_transport_delivers_bit_identical_weights_to_two_engines(
    rig: Rig, transport: str
) -> None:
    step = await rig.publish()
    report = await rig.trainer.run_sync_session.remote(SyncPlan(rig.engines, transport=transport))
    assert report.step == step
    # One node here: "auto" maps the shared snapshot, as "shm" does.
    used = "shm" if transport == "auto" else transport
    assert {t.transport for t in report.engines.values()} == {used}
    assert report.num_buckets > 4  # 64 KiB buckets: the model spans many
    assert set(report.engines) == {"e0", "e1"}
    assert all(t.version == step for t in report.engines.values())
    await assert_engines_hold(rig.trainer, rig.engines, step)
    await assert_no_stale_mappings(rig.engines)
    if used == "shm":
        # Engines keep the train actor's buffers mapped for the next session: only
        # buffers it still holds, and what receiver_stats reports.
        pid = await rig.trainer.pid.remote()
        owned = set(open_buffers(pid))
        for name, engine in rig.engines.items():
            mapped = set((await engine_mappings({name: engine})).get(name, []))
            assert mapped and mapped <= owned, (name, mapped, owned)
            assert (await engine.receiver_stats.remote()).kept_bytes > 0
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
    try:
        report = await coordinator.sync(min_step=asked)
    finally:
        await coordinator.close()  # the train actor takes one open coordinator at a time
    assert report.min_step == asked
    assert report.step == newest
    assert coordinator.engine_version == newest
    await assert_engines_hold(rig.trainer, rig.engines, newest)


async def test_coordinator_waits_only_when_staleness_bound_would_break(rig: Rig) -> None:
    trainer, engines = rig.trainer, rig.engines
    await engines["e0"].set_faults.remote(receive_delay_s=0.02)
    first = await rig.publish()
    coordinator = SyncCoordinator(trainer, engines, staleness=1)
    try:
        await coordinator.after_build(first)
        for _ in range(3):
            step = await rig.publish()
            await coordinator.after_build(step)
            # The bound always holds when after_build returns.
            assert step - coordinator.engine_version <= 1
        await coordinator.drain()
    finally:
        await coordinator.close()
    await engines["e0"].set_faults.remote()
    assert coordinator.engine_version == step
    sent = [r.step for r in coordinator.reports]
    assert sent == sorted(sent) and sent[-1] == step
    await assert_engines_hold(trainer, engines, step)
