"""The version chain: stamps that prove an answer's weights, commit hooks, routing by
version under faults, and the trainer's staleness filter.

In-process (no Ray) for the receiver's rules; on real Ray (light engines, see
_fleet_actors) for the router under faults, with both commit policies. Routing's
reaction time is printed (``-s``), never asserted.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray
import torch
from _fleet_actors import engine_class, trainer_class
from _waits import eventually, within

from asyncsync import (
    ConfigError,
    Deadlines,
    FleetRouter,
    RoutingError,
    Rule,
    SessionError,
    StalenessFilter,
    Stamp,
    SyncPlan,
    staleness,
)
from asyncsync.buckets import pack, tensor_digest
from asyncsync.engines import TensorEngine
from asyncsync.protocol import weights_identity

pytestmark = pytest.mark.timeout(240)


# --------------------------------------------------------------------- stamps, in-process


def params(step: int) -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.full((256,), float(step * 10 + i)) for i in range(3)}


async def commit(engine: TensorEngine, step: int, session: str | None = None) -> str:
    """One whole session on ``engine``; returns the identity of what it sent."""
    buckets = pack(list(params(step).items()), bucket_bytes=1024)
    manifest = [b.manifest for b in buckets]
    sid = session or f"s{step}"
    await engine.begin(sid, step, manifest)
    for i, bucket in enumerate(buckets):
        await engine.receive(sid, i, bucket)
    await engine.commit(sid)
    return weights_identity(manifest)


class Recording(TensorEngine):
    """Records the stamp it serves while its commit hook runs; can fail its apply."""

    def __init__(self) -> None:
        super().__init__(params(-1))
        self.hooked: list[tuple[int, Stamp]] = []
        self.fail_apply = False

    async def apply(self, buckets: Any, version: int) -> None:
        if self.fail_apply:
            # Half the weights written, then a failure: a mix of two versions.
            self.params["w0"].copy_(torch.full((256,), -1.0))
            raise RuntimeError("injected: apply failed partway")
        await super().apply(buckets, version)

    async def on_commit(self, version: int) -> None:
        self.hooked.append((version, self.stamp()))


async def test_an_answer_is_stamped_with_the_version_and_identity_of_its_weights() -> None:
    engine = TensorEngine(params(-1))
    stamp, _ = await engine.served_digests()
    assert stamp == Stamp(None, None, intact=True)  # initial weights: no trainer version
    identity = await commit(engine, 3)
    stamp, digests = await engine.served_digests()
    assert stamp == Stamp(3, identity, intact=True)
    assert digests == {n: tensor_digest(t) for n, t in params(3).items()}
    assert identity == weights_identity([b.manifest for b in pack(list(params(3).items()), 1024)])
    assert identity != await commit(engine, 4)  # another snapshot, another identity
    info = await engine.engine_info()
    assert (info.version, info.weights, info.intact) == (4, engine.identity, True)


async def test_commit_hook_runs_before_the_new_version_serves_and_holds_answers_back() -> None:
    engine = Recording()
    await commit(engine, 1)
    assert engine.hooked == [(1, Stamp(None, None))]  # the hook saw the old version serving
    gate = asyncio.Event()
    order: list[str] = []

    async def answer() -> None:
        await gate.wait()
        async with engine.serving() as stamp:
            order.append(f"answer@{stamp.version}")

    async def hooked(version: int) -> None:
        order.append("hook")
        gate.set()
        await asyncio.sleep(0)  # the answer tries to start now: it must wait
        order.append("hook done")

    engine.on_commit = hooked  # type: ignore[method-assign]
    reader = asyncio.ensure_future(answer())
    await commit(engine, 2)
    await reader
    assert order == ["hook", "hook done", "answer@2"]


async def test_a_failed_apply_stamps_no_version_until_a_full_session_repairs_it() -> None:
    engine = Recording()
    await commit(engine, 1)
    engine.fail_apply = True
    with pytest.raises(RuntimeError, match="partway"):
        await commit(engine, 2)
    stamp, _ = await engine.served_digests()
    assert stamp == Stamp(None, None, intact=False)  # not the old version: a mix
    info = await engine.engine_info()
    assert (info.version, info.intact) == (None, False)
    engine.fail_apply = False
    identity = await commit(engine, 2, session="repair")
    assert (await engine.served_digests())[0] == Stamp(2, identity, intact=True)


def test_staleness_and_the_filter() -> None:
    assert staleness(Stamp(7, "x"), 9) == 2
    assert staleness(Stamp(None, None), 9) is None
    assert staleness(Stamp(None, None, intact=False), 9) is None
    keep = StalenessFilter(max_steps=1)
    assert keep.admit(Stamp(8, "a"), 9) and keep.admit(Stamp(9, "b"), 9)
    assert not keep.admit(Stamp(7, "c"), 9)
    assert not keep.admit(Stamp(None, None, intact=False), 9)
    assert (keep.admitted, keep.refused) == (2, 2)
    assert keep.refused_by == {"more than 1 behind": 1, "no trainer version": 1}
    with pytest.raises(ConfigError, match="max_steps"):
        StalenessFilter(max_steps=-1)
    with pytest.raises(ConfigError, match="steps"):
        Rule.within(-1)


# --------------------------------------------------------------------- routing under faults

ENGINES = 4
PROBE_S = 0.3


class Chain:
    """A trainer, its fleet, and the floor every answer must reach (the version the
    last session committed on every engine that counted)."""

    def __init__(self, trainer: Any, engines: dict[str, Any]) -> None:
        self.trainer = trainer
        self.engines = engines
        self.step = -1
        self.floor = -1
        self.extra: list[Any] = []

    async def publish_and_sync(self, policy: str) -> None:
        self.step += 1
        await within(self.trainer.publish.remote(self.step))
        plan = SyncPlan(policy=policy, timeout_s=20.0)
        try:
            report = await within(self.trainer.run_sync_session.remote(plan))
        except SessionError:
            return  # all_or_nothing: a fault failed the session; nobody moved
        if report.committed or report.current:
            # Engines may still serve the step before (per_engine stragglers).
            self.floor = max(self.floor, report.step - 1)


@pytest.fixture
async def chain(ray_local: Any) -> AsyncIterator[Chain]:
    trainer = trainer_class().remote(deadlines=Deadlines(probe_interval_s=PROBE_S, call_s=5.0))
    engines = {f"r{i}": engine_class(max_restarts=4).remote(f"r{i}") for i in range(ENGINES)}
    await within(asyncio.gather(*(e.pid.remote() for e in engines.values())), 180)
    for name, handle in engines.items():
        await within(trainer.fleet_add.remote(name, handle))
    rig = Chain(trainer, engines)
    await rig.publish_and_sync("all_or_nothing")
    yield rig
    await within(trainer.close.remote())
    for handle in [trainer, *engines.values(), *rig.extra]:
        ray.kill(handle, no_restart=True)


@pytest.mark.parametrize("policy", ["all_or_nothing", "per_engine"])
async def test_router_under_faults_never_fails_and_never_answers_below_its_rule(
    chain: Chain, policy: str
) -> None:
    # (floor, answer, the router's view held r3 when the call started)
    answers: list[tuple[int, Any, bool]] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def rollouts(router: FleetRouter) -> None:
        while not stop.is_set():
            floor = chain.floor
            knew_r3 = "r3" in router.view.engines
            try:
                routed = await router.call("answer", rule=Rule.at_least(floor))
            except Exception as exc:  # counted: the test fails on any
                failures.append(exc)
                continue
            answers.append((floor, routed, knew_r3))

    async with FleetRouter(chain.trainer, timeout_s=1.0, wait_s=20.0) as router:
        workers = [asyncio.ensure_future(rollouts(router)) for _ in range(4)]
        try:
            await chain.publish_and_sync(policy)
            ray.kill(chain.engines["r1"], no_restart=False)  # killed; Ray restarts it
            await chain.publish_and_sync(policy)
            await within(chain.engines["r2"].set_faults.remote(hang_answer=True))  # hung
            await chain.publish_and_sync(policy)
            await within(chain.trainer.fleet_remove.remote("r3"))  # removed
            await chain.publish_and_sync(policy)
            added = engine_class().remote("r9")
            chain.extra.append(added)
            await within(added.pid.remote(), 120)  # its process started
            await within(chain.trainer.fleet_add.remote("r9", added))  # added
            await chain.publish_and_sync(policy)
            await within(chain.engines["r2"].set_faults.remote())
            await chain.publish_and_sync(policy)

            async def enough() -> bool:
                # Enough calls in all, and enough that started once the router's
                # view no longer held the removed engine.
                after = sum(1 for _, _, knew_r3 in answers if not knew_r3)
                return len(answers) >= 50 and after >= 10

            await eventually(enough, "the router answered too few calls")
        finally:
            stop.set()
            await asyncio.gather(*workers)
        stats = router.stats
    assert failures == [], failures[:3]
    identities: dict[int, str] = {}
    digests: dict[int, dict[str, int]] = {}
    for floor, routed, _ in answers:
        stamp = routed.stamp
        assert stamp is not None and stamp.intact and stamp.version is not None, routed
        assert stamp.version >= floor, (floor, routed)  # never below the rule
        version = stamp.version
        if version not in identities:
            identities[version] = await within(chain.trainer.snapshot_identity.remote(version))
            digests[version] = await within(chain.trainer.snapshot_digests.remote(version))
        assert stamp.weights == identities[version], routed  # the stamp names the snapshot
        assert routed.value.digests == digests[version], routed  # and the bytes are it
    # Once the router learned of the removal, no call went to the removed engine.
    assert "r3" not in {routed.engine for _, routed, knew_r3 in answers if not knew_r3}
    lag = sorted(stats.lag_s)
    print(
        f"\n[{policy}] {len(answers)} answers, {stats.retries} retries, by version "
        f"{dict(sorted(stats.by_version.items()))}; view pushed to the router "
        f"{len(lag)} times: lag median {statistics.median(lag) * 1e3:.1f} ms, "
        f"max {lag[-1] * 1e3:.1f} ms"
    )


async def test_no_eligible_engine_is_a_typed_error_naming_the_rule(chain: Chain) -> None:
    async with FleetRouter(chain.trainer, wait_s=0.2) as router:
        with pytest.raises(RoutingError, match=r"exactly\(99\)"):
            await router.call("answer", rule=Rule.exactly(99))
        routed = await router.call("answer", rule=Rule.exactly(chain.step))
        assert routed.stamp is not None and routed.stamp.version == chain.step
    with pytest.raises(RoutingError, match="outside"):
        await router.call("answer")
    with pytest.raises(ConfigError, match="train actor"):
        FleetRouter(chain.engines["r0"])


async def test_a_call_that_tried_every_engine_tries_one_again_once_the_view_shows_it_changed(
    chain: Chain,
) -> None:
    # Every engine stays silent: the call tries each once (each then suspect and
    # avoided), and its last attempt waits. A sync moves them all to a new version:
    # that attempt must go to one of them at once, not wait out `wait_s`.
    await asyncio.gather(
        *(within(e.set_faults.remote(hang_answer=True)) for e in chain.engines.values())
    )
    async with FleetRouter(
        chain.trainer, timeout_s=0.5, wait_s=20.0, attempts=ENGINES + 1
    ) as router:
        call = asyncio.ensure_future(router.call("answer"))

        async def all_tried() -> bool:
            return router.stats.retries >= ENGINES

        await eventually(all_tried, "the call did not try every engine")
        assert not call.done()
        await asyncio.gather(*(within(e.set_faults.remote()) for e in chain.engines.values()))
        await chain.publish_and_sync("all_or_nothing")
        routed = await within(call, 10)
    assert routed.attempts == ENGINES + 1
    assert routed.stamp is not None and routed.stamp.version == chain.step


async def test_a_new_step_reaches_the_router_at_once_and_moves_a_within_floor(
    chain: Chain,
) -> None:
    async with FleetRouter(chain.trainer, rule=Rule.within(0), watch_s=60.0, wait_s=0.2) as router:
        assert (await router.call("answer")).stamp == (await router.call("answer")).stamp
        chain.step += 1
        await within(chain.trainer.publish.remote(chain.step))  # built, not yet synced

        async def moved() -> bool:
            return router.ready_step == chain.step

        await eventually(moved, "the router did not learn the new step", seconds=5)
        assert router.eligible() == []  # every engine is a step behind now
        with pytest.raises(RoutingError, match=r"within\(0\)"):
            await router.call("answer")
