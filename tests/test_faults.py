"""Fault injection on a real local Ray: every fault leaves nothing lost and nothing leaked.

Each test injects one fault into a live setup (one train actor, two HF engines, a
third engine to kill) and then checks the same after-state, :func:`assert_recovered`:

* the ready step is unchanged, or advanced only by a build that completed;
* engines that did not commit serve their previous version, bit for bit, and keep
  answering ``generate``; no staging session and no ``receive`` call is left open;
* no pin, no build in flight, the cache's lock is free, resident memory is at most
  the ready snapshot plus one snapshot of pooled buffers;
* no engine still maps a shared snapshot buffer of the train actor, and nothing of
  asyncsync is left in ``/dev/shm``;
* the next build and the next session succeed and deliver bit-identical weights.

Every wait is bounded (:func:`within`, plus the module's pytest timeout).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from typing import Any, TypeVar

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
from _waits import WAIT_S, eventually, within

from asyncsync import SessionError, SessionTimeoutError
from asyncsync.coordinator import SyncCoordinator
from asyncsync.plan import SyncPlan

pytestmark = pytest.mark.timeout(240)

T = TypeVar("T")
PROMPT = [[1, 2, 3, 4]]
SLOW_RECEIVE_S = 0.25
"""Per-bucket delay of a slow engine: 8 buckets, 2 in flight, so a session takes >= 1 s."""


def shm_files() -> list[str]:
    """Anything of asyncsync in /dev/shm (the shared snapshot never creates a file there)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("asyncsync-"))


class Rig:
    """One train actor and three engines shared by this module's tests.

    ``engines`` are the live engines every recovery session targets; ``victim`` is
    killed by one test. Steps only move forward (``step()`` hands out the next).
    ``synced`` is the step every live engine serves between tests.
    """

    def __init__(self, trainer: Any, engines: dict[str, Any], victim: Any, pid: int) -> None:
        self.trainer = trainer
        self.engines = engines
        self.victim = victim
        self.pid = pid
        self.synced: int | None = None
        self.model_nbytes = 0
        self._step = -1

    def step(self) -> int:
        self._step += 1
        return self._step

    async def publish(self) -> int:
        return int(await within(self.trainer.publish.remote(self.step())))

    async def sync(self, transport: str = "object_store") -> int:
        plan = SyncPlan(self.engines, transport=transport, timeout_s=WAIT_S)
        report = await within(self.trainer.run_sync_session.remote(plan))
        self.synced = report.step
        self.model_nbytes = report.nbytes
        return int(report.step)

    async def digests(self) -> dict[str, tuple[int | None, dict[str, int]]]:
        return {n: await within(e.state_digests.remote()) for n, e in self.engines.items()}


@pytest.fixture(scope="module")
async def rig(ray_local: Any) -> AsyncIterator[Rig]:
    trainer = trainer_class().remote()
    engine = engine_class()
    engines = {
        "e0": engine.remote("llama", TINY_LLAMA, seed=1, num_threads=1),
        "e1": engine.remote("llama", TINY_LLAMA, seed=2, num_threads=1),
    }
    victim = engine.remote("llama", TINY_LLAMA, seed=3, num_threads=1)
    pid, *_ = await within(
        asyncio.gather(
            trainer.pid.remote(), victim.ping.remote(), *(e.ping.remote() for e in engines.values())
        ),
        120,
    )
    rig = Rig(trainer, engines, victim, pid)
    await rig.publish()
    await rig.sync()
    yield rig
    await within(trainer.close.remote())
    for handle in [trainer, victim, *engines.values()]:
        ray.kill(handle, no_restart=True)


async def assert_recovered(
    rig: Rig, *, ready: int, before: dict[str, tuple[int | None, dict[str, int]]]
) -> None:
    """The after-state of every fault (see the module docstring), then a build and a session.

    ``ready``: the ready step the trainer must still have. ``before``: each live
    engine's ``(version, digests)`` from before the fault; none of them committed.
    """
    trainer = rig.trainer
    stats = await within(trainer.cache_stats.remote())
    assert stats.ready_step == ready
    assert stats.building_step is None
    assert stats.pins == {}
    # Every snapshot has the same layout here: the ready one plus at most one pooled.
    assert stats.resident_bytes <= 2 * rig.model_nbytes, stats
    assert await within(trainer.cache_lock_free.remote())
    assert shm_files() == []
    await assert_no_stale_mappings(rig.engines)
    for name, engine in rig.engines.items():
        receiver = await within(engine.receiver_stats.remote())
        assert (receiver.version, receiver.open_sessions) == (before[name][0], ()), name
        assert await within(engine.state_digests.remote()) == before[name], (
            f"{name}'s weights changed"
        )
        assert (await within(engine.generate.remote(PROMPT))).version == before[name][0]

        async def no_receive_running(engine: Any = engine) -> bool:
            return int(await engine.running_receives.remote()) == 0

        # The session cancels the engine calls it stops waiting for; the cancel
        # reaches the engine asynchronously, so poll (bounded).
        await eventually(no_receive_running, f"{name} still runs a receive of a dead session")
    step = await rig.publish()
    assert await rig.sync("shm") == step
    await assert_engines_hold(trainer, rig.engines, step)
    stats = await within(trainer.cache_stats.remote())
    assert (stats.pins, stats.building_step) == ({}, None)
    assert shm_files() == []
    await assert_no_stale_mappings(rig.engines)


async def wait_for_open_session(engine: Any) -> None:
    async def is_open() -> bool:
        return bool((await engine.receiver_stats.remote()).open_sessions)

    await eventually(is_open, "the engine never saw the session begin")


async def wait_for_build(trainer: Any, step: int) -> None:
    async def building() -> bool:
        return (await trainer.cache_stats.remote()).building_step == step

    await eventually(building, f"the build of step {step} never started")


# --------------------------------------------------------------------- engine faults


async def test_killed_engine_aborts_session_others_keep_serving(rig: Rig) -> None:
    ready = await rig.publish()
    before = await rig.digests()
    await within(rig.victim.set_faults.remote(receive_delay_s=SLOW_RECEIVE_S))
    targets = {"e0": rig.engines["e0"], "victim": rig.victim}
    session = rig.trainer.run_sync_session.remote(SyncPlan(targets, transport="shm"))
    await wait_for_open_session(rig.victim)
    ray.kill(rig.victim, no_restart=True)
    with pytest.raises(SessionError, match="engine 'victim' failed") as info:
        await within(session)
    assert (info.value.engine, info.value.step) == ("victim", ready)
    await assert_recovered(rig, ready=ready, before=before)


@pytest.mark.parametrize("transport", ["object_store", "shm"])
async def test_engine_raising_in_receive_aborts_everywhere(rig: Rig, transport: str) -> None:
    ready = await rig.publish()
    before = await rig.digests()
    await within(rig.engines["e1"].set_faults.remote(fail_on_bucket=3))
    try:
        with pytest.raises(
            SessionError, match=r"engine 'e1' failed in receive of bucket 3"
        ) as info:
            await within(
                rig.trainer.run_sync_session.remote(SyncPlan(rig.engines, transport=transport))
            )
    finally:
        await within(rig.engines["e1"].set_faults.remote())
    assert (info.value.engine, info.value.step) == ("e1", ready)
    await assert_recovered(rig, ready=ready, before=before)


async def test_hanging_engine_times_out_aborts_and_its_receive_is_cancelled(rig: Rig) -> None:
    ready = await rig.publish()
    before = await rig.digests()
    await within(rig.engines["e0"].set_faults.remote(hang_on_bucket=2))
    try:
        with pytest.raises(SessionTimeoutError, match=r"ran past 1.0s") as info:
            await within(
                rig.trainer.run_sync_session.remote(
                    SyncPlan(rig.engines, transport="shm", timeout_s=1.0)
                )
            )
    finally:
        await within(rig.engines["e0"].set_faults.remote())
    assert info.value.step == ready
    # assert_recovered also waits for the hung receive to be cancelled on e0.
    await assert_recovered(rig, ready=ready, before=before)


# --------------------------------------------------------------------- train-side faults


async def test_weight_source_raising_halfway_discards_the_build(rig: Rig) -> None:
    ready = await rig.publish()
    before = await rig.digests()
    discards = (await within(rig.trainer.cache_stats.remote())).discards
    await within(rig.trainer.set_fail_after.remote(10))  # 21 tensors: fails in bucket 3 or so
    try:
        with pytest.raises(RuntimeError, match=r"weight source failed at tensor 10"):
            await rig.publish()
    finally:
        await within(rig.trainer.set_fail_after.remote(None))
    assert (await within(rig.trainer.cache_stats.remote())).discards == discards + 1
    await assert_recovered(rig, ready=ready, before=before)


async def test_ray_cancel_of_a_build_midway_discards_it(rig: Rig) -> None:
    ready = await rig.publish()
    before = await rig.digests()
    await within(rig.trainer.set_tensor_delay.remote(0.1))  # ~2 s build
    step = rig.step()
    try:
        build = rig.trainer.publish.remote(step)
        await wait_for_build(rig.trainer, step)
        ray.cancel(build)
        with pytest.raises(ray.exceptions.TaskCancelledError):
            await within(build)
    finally:
        await within(rig.trainer.set_tensor_delay.remote(0.0))
    await assert_recovered(rig, ready=ready, before=before)


async def test_ray_cancel_of_a_session_midway_aborts_it(rig: Rig) -> None:
    ready = await rig.publish()
    before = await rig.digests()
    await within(rig.engines["e0"].set_faults.remote(receive_delay_s=SLOW_RECEIVE_S))
    try:
        session = rig.trainer.run_sync_session.remote(SyncPlan(rig.engines, transport="shm"))
        await wait_for_open_session(rig.engines["e0"])
        ray.cancel(session)
        with pytest.raises(ray.exceptions.TaskCancelledError):
            await within(session)
    finally:
        await within(rig.engines["e0"].set_faults.remote())
    await assert_recovered(rig, ready=ready, before=before)


async def test_ray_cancel_of_a_session_waiting_for_its_step(rig: Rig) -> None:
    ready = await rig.publish()
    before = await rig.digests()
    plan = SyncPlan(rig.engines, min_step=ready + 1000, pin_timeout_s=None)
    session = rig.trainer.run_sync_session.remote(plan)
    await asyncio.sleep(0.3)
    ray.cancel(session)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        await within(session)
    await assert_recovered(rig, ready=ready, before=before)


# --------------------------------------------------------------------- driver cancellation


async def test_cancelled_driver_task_cancels_the_remote_session(rig: Rig) -> None:
    ready = await rig.publish()
    before = await rig.digests()
    coordinator = SyncCoordinator(rig.trainer, rig.engines, plan=SyncPlan(transport="shm"))
    await within(rig.engines["e0"].set_faults.remote(receive_delay_s=SLOW_RECEIVE_S))
    try:
        task = asyncio.create_task(coordinator.sync())
        await wait_for_open_session(rig.engines["e0"])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await within(task)
        # The cancellation propagated only after the remote session ended: it is no
        # longer open on any engine *now*, without waiting (a session left running
        # would still be streaming to the slow engine for a second or more).
        for engine in rig.engines.values():
            assert (await within(engine.receiver_stats.remote())).open_sessions == ()
    finally:
        await within(rig.engines["e0"].set_faults.remote())
        await within(coordinator.close())  # the train actor takes one open coordinator
    assert coordinator.reports == []
    await assert_recovered(rig, ready=ready, before=before)


async def test_coordinator_close_returns_once_the_session_aborted(rig: Rig) -> None:
    ready = await rig.publish()
    before = await rig.digests()
    synced = rig.synced
    assert synced is not None
    coordinator = SyncCoordinator(rig.trainer, rig.engines, staleness=100)
    await within(rig.engines["e0"].set_faults.remote(receive_delay_s=SLOW_RECEIVE_S))
    try:
        assert await within(coordinator.after_build(ready)) < 1.0  # within the bound: no wait
        await wait_for_open_session(rig.engines["e0"])
        await within(coordinator.close())
        for engine in rig.engines.values():
            assert (await within(engine.receiver_stats.remote())).open_sessions == ()
    finally:
        await within(rig.engines["e0"].set_faults.remote())
    assert coordinator.reports == []
    await assert_recovered(rig, ready=ready, before=before)


# --------------------------------------------------------------------- security, live


async def test_shared_snapshot_buffers_in_flight_are_private_and_unguessable(rig: Rig) -> None:
    """While a session maps them: the train actor's buffers are memfds of mode 0600 with
    random names, nothing appears in /dev/shm, and engines map exactly those buffers."""
    await within(rig.engines["e0"].set_faults.remote(receive_delay_s=SLOW_RECEIVE_S))
    try:
        await rig.publish()
        session = rig.trainer.run_sync_session.remote(SyncPlan(rig.engines, transport="shm"))
        await wait_for_open_session(rig.engines["e0"])
        owned = open_buffers(rig.pid)
        mapped = await within(engine_mappings(rig.engines))
        report = await within(session)
    finally:
        await within(rig.engines["e0"].set_faults.remote())
    assert {t.transport for t in report.engines.values()} == {"shm"}
    assert owned, "the train actor holds no shared snapshot buffer"
    for name, mode in owned.items():
        assert mode == 0o600, (name, oct(mode))
        # 64 random bits name a buffer (access itself needs the owner's uid).
        assert re.fullmatch(r"[0-9a-f]{16,}", name), name
    # What the engines mapped mid-session are the train actor's own buffers.
    assert mapped and all(set(m) <= set(owned) for m in mapped.values()), (mapped, owned)
    assert shm_files() == []
    await assert_no_stale_mappings(rig.engines)
