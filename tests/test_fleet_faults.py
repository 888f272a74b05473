"""Fleet faults on a real local Ray: eight engines, one train actor owning the fleet.

Each test injects one fault into the live fleet (an engine killed, hung, slowed
10x, restarted by Ray, joining or leaving mid-session; the train actor killed
mid-session) under the commit policies where the fault means something different
to each, then checks the same after-state with :func:`assert_consistent`:

* every engine serves the version the fleet reports for it (what the engine
  itself answers, after a fresh probe);
* its weights are bit-identical to the trainer's snapshot of that version;
* no staging is left on any engine, no pin on the trainer, no bucket file in
  ``/dev/shm``.

Under ``per_engine`` the tests also show the train loop never waited on the
engine that failed or lagged: the session returned while that engine still had
not committed (its outcome is ``catching_up``, or its apply ended after the
session returned).

The fleet keeper runs throughout (a 0.3 s probe interval): it notices restarts
and deaths and catches up engines that are not serving. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray
from _actors import assert_no_stale_mappings
from _fleet_actors import engine_class, max_overlap, trainer_class
from _waits import WAIT_S, eventually, within

from asyncsync import (
    Deadlines,
    FleetView,
    Health,
    SessionError,
    SessionTimeoutError,
    SyncPlan,
    SyncReport,
)

pytestmark = pytest.mark.timeout(300)

ENGINES = 8
PROBE_S = 0.3
"""The keeper's probe interval: short, so catch-ups start soon after a fault."""
NORMAL = {"receive_delay_s": 0.02, "apply_delay_s": 0.1}
SLOW = {"receive_delay_s": 0.2, "apply_delay_s": 1.0}
"""An engine slowed 10x: each bucket and the apply take ten times as long."""


def shm_files() -> list[str]:
    """Anything of asyncsync in /dev/shm (the shared snapshot never creates a file there)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("asyncsync-"))


class Rig:
    """One train actor whose fleet holds ``engines``; steps only move forward."""

    def __init__(self, trainer: Any, engines: dict[str, Any], pid: int) -> None:
        self.trainer = trainer
        self.engines = engines
        self.pid = pid
        self.step = -1
        self.spawned = 0
        self.killed: list[Any] = []

    async def publish(self) -> int:
        self.step += 1
        return int(await within(self.trainer.publish.remote(self.step)))

    async def session(self, **plan: Any) -> SyncReport:
        plan.setdefault("timeout_s", WAIT_S)
        report: SyncReport = await within(self.trainer.run_sync_session.remote(SyncPlan(**plan)))
        return report

    async def view(self) -> FleetView:
        view: FleetView = await within(self.trainer.fleet_view.remote())
        return view

    async def versions(self, *, without: str | None = None) -> dict[str, int | None]:
        return {
            n: (await within(e.receiver_stats.remote())).version
            for n, e in self.engines.items()
            if n != without
        }

    async def dropped(self, reason: str) -> dict[str, int]:
        return {
            n: (await within(e.receiver_stats.remote())).dropped.get(reason, 0)
            for n, e in self.engines.items()
        }

    async def faults(self, names: list[str] | None = None, **faults: Any) -> None:
        """Set these faults on ``names`` (default: every engine); none given clears them."""
        names = list(self.engines) if names is None else names
        await within(asyncio.gather(*(self.engines[n].set_faults.remote(**faults) for n in names)))

    async def spawn(self) -> tuple[str, Any]:
        """A new engine actor (not yet in the fleet), answering."""
        self.spawned += 1
        name = f"new{self.spawned}"
        handle = engine_class(max_restarts=4).remote(name)
        await within(handle.pid.remote(), 120)
        return name, handle

    async def add(self, name: str, handle: Any) -> None:
        await within(self.trainer.fleet_add.remote(name, handle))
        self.engines[name] = handle

    async def replace(self, name: str) -> None:
        """Remove a dead engine from the fleet and add a fresh one in its place."""
        await within(self.trainer.fleet_remove.remote(name))
        self.killed.append(self.engines.pop(name))
        await self.add(*await self.spawn())

    async def sync_all(self) -> None:
        """Bring every member to the ready step (sessions plus the keeper's catch-ups)."""

        async def all_serve_ready() -> bool:
            view = await self.view()
            if all(
                s.health is Health.SERVING and s.version == self.step for s in view.engines.values()
            ):
                return True
            await self.session(policy="per_engine", min_engines=1)
            return False

        await eventually(all_serve_ready, f"the fleet never served step {self.step} everywhere")


@contextlib.asynccontextmanager
async def running_rig(prefix: str, engines: int, deadlines: Deadlines) -> AsyncIterator[Rig]:
    """A train actor and ``engines`` light engines (restartable) in its fleet, all
    serving a first step; everything is killed at the end."""
    trainer = trainer_class().remote(deadlines=deadlines)
    handles = {
        f"{prefix}{i}": engine_class(max_restarts=4).remote(f"{prefix}{i}") for i in range(engines)
    }
    pid, *_ = await within(
        asyncio.gather(trainer.pid.remote(), *(e.pid.remote() for e in handles.values())), 180
    )
    rig = Rig(trainer, {}, pid)
    try:
        for name, handle in handles.items():
            await rig.add(name, handle)
        await rig.publish()
        report = await rig.session(policy="all_or_nothing")
        assert sorted(report.committed) == sorted(handles)
        yield rig
        await within(trainer.close.remote())
    finally:
        for handle in [trainer, *handles.values(), *rig.engines.values(), *rig.killed]:
            ray.kill(handle, no_restart=True)


@pytest.fixture(scope="module")
async def rig(ray_local: Any) -> AsyncIterator[Rig]:
    async with running_rig("e", ENGINES, Deadlines(probe_interval_s=PROBE_S, call_s=5.0)) as rig:
        yield rig


async def assert_consistent(rig: Rig) -> FleetView:
    """The after-state of every fault (see the module docstring); returns the fresh view."""

    async def quiet() -> bool:
        stats = await rig.trainer.cache_stats.remote()
        if stats.pins:
            return False  # a background straggler or commit still holds its snapshot
        for engine in rig.engines.values():
            receiver = await engine.receiver_stats.remote()
            if receiver.open_sessions or await engine.running_receives.remote():
                return False
        return True

    await eventually(quiet, "staging, a receive or a pin was left behind")
    view: FleetView = await within(rig.trainer.fleet_refresh.remote())
    assert set(view.engines) == set(rig.engines)
    for name, engine in rig.engines.items():
        state = view.engines[name]
        version, digests = await within(engine.state_digests.remote())
        assert version == state.version, f"{name} serves {version}, the fleet says {state.version}"
        if version is not None:
            want = await within(rig.trainer.snapshot_digests.remote(version))
            assert digests == want, f"{name}'s weights differ from the snapshot of step {version}"
    assert shm_files() == []
    await assert_no_stale_mappings(rig.engines)
    return view


async def wait_open(engine: Any, what: str = "the session never began on the engine") -> None:
    async def is_open() -> bool:
        return bool((await engine.receiver_stats.remote()).open_sessions)

    await eventually(is_open, what)


# --------------------------------------------------------------------- all or nothing: two phases


async def test_fleet_phase_one_failure_aborts_everywhere_and_quarantines_the_culprit(
    rig: Rig,
) -> None:
    before = await rig.versions()
    aborted = await rig.dropped("aborted")
    step = await rig.publish()
    await rig.faults(["e1"], fail_on_bucket=2)
    try:
        with pytest.raises(
            SessionError, match=r"engine 'e1' failed in receive of bucket 2"
        ) as info:
            await rig.session(policy="all_or_nothing")
    finally:
        await rig.faults(["e1"])
    assert (info.value.engine, info.value.step) == ("e1", step)
    # Aborted everywhere before the error was raised: every engine keeps its version
    # and dropped the staging it had begun. (The keeper may already be catching e1
    # up, so e1 alone may be on the new step, or have aborted a failed catch-up.)
    versions = await rig.versions()
    assert versions["e1"] in (before["e1"], step)
    assert {n: v for n, v in versions.items() if n != "e1"} == {
        n: v for n, v in before.items() if n != "e1"
    }
    after = await rig.dropped("aborted")
    assert after["e1"] >= aborted["e1"] + 1
    assert all(after[n] == aborted[n] + 1 for n in rig.engines if n != "e1"), (aborted, after)
    state = (await rig.view()).engines["e1"]
    # The culprit is out of routing (or already being caught up by the keeper).
    assert state.health in (Health.QUARANTINED, Health.CATCHING_UP), state
    assert "e1" not in (await rig.view()).serving() or state.version == step

    # The keeper catches the culprit up to the newest ready step on its own; the
    # others keep serving the previous step until the next session.
    async def e1_caught_up() -> bool:
        state = (await rig.view()).engines["e1"]
        return state.health is Health.SERVING and state.version == step

    await eventually(e1_caught_up, "the keeper never caught e1 up")
    view = await assert_consistent(rig)
    others = tuple(n for n in rig.engines if n != "e1")
    assert view.by_version() == {step: ("e1",), before["e0"]: others}
    await rig.sync_all()
    await assert_consistent(rig)


async def test_fleet_phase_two_failure_quarantines_only_that_engine(rig: Rig) -> None:
    before = await rig.versions()
    step = await rig.publish()
    await rig.faults(["e2"], fail_apply=True)
    try:
        report = await rig.session(policy="all_or_nothing")
    finally:
        await rig.faults(["e2"])
    assert report.step == step
    assert report.engines["e2"].outcome == "quarantined"
    assert "injected fault in apply" in (report.engines["e2"].error or "")
    assert sorted(report.committed) == sorted(n for n in rig.engines if n != "e2")
    # The report says who serves what, and it is what the engines serve. e2's apply
    # raised: it may hold a mix of two versions, so it serves none (None, not
    # intact) until the keeper's full session repairs it.
    actual = await rig.versions()
    assert before["e2"] is not None
    assert report.engines["e2"].version is None
    assert actual["e2"] in (None, step)
    reported = {n: t.version for n, t in report.engines.items() if n != "e2"}
    assert reported == {n: v for n, v in actual.items() if n != "e2"}
    assert report.view.engines["e2"].health is Health.QUARANTINED
    assert "e2" not in report.view.serving()
    assert report.view.by_version() == {step: tuple(n for n in rig.engines if n != "e2")}
    await rig.sync_all()
    await assert_consistent(rig)


# --------------------------------------------------------------------- a slow engine


async def test_slow_engine_per_engine_does_not_hold_the_loop_fleet_does(rig: Rig) -> None:
    """One engine slowed 10x: ``per_engine`` returns without it; ``fleet`` stalls for it."""
    await rig.faults(**NORMAL)
    try:
        # Baseline: every engine at normal speed, all or nothing.
        await rig.publish()
        start = time.monotonic()
        await rig.session(policy="all_or_nothing")
        baseline_s = time.monotonic() - start

        await rig.faults(["e3"], **SLOW)
        step = await rig.publish()
        start = time.time()
        report = await rig.session(policy="per_engine", min_engines=0.75, straggler_grace_s=0)
        returned = time.time()
        version_at_return = (await within(rig.engines["e3"].receiver_stats.remote())).version
        assert report.step == step
        assert report.engines["e3"].outcome == "catching_up", report.engines["e3"]
        assert version_at_return != step
        assert len(report.committed) >= 6
        # The straggler finishes in the background, then serves the step.
        await rig.sync_all()
        spans = [
            s for s in await within(rig.engines["e3"].apply_spans.remote()) if s.version == step
        ]
        assert len(spans) == 1
        # The session returned before the slow engine's apply could have finished.
        assert returned < spans[0].end
        per_engine_s = returned - start
        slow_total_s = spans[0].end - start

        # The same slow engine under all or nothing: the session waits for it.
        step = await rig.publish()
        start = time.time()
        report = await rig.session(policy="all_or_nothing")
        fleet_s = time.time() - start
        assert sorted(report.committed) == sorted(rig.engines)
        spans = [
            s for s in await within(rig.engines["e3"].apply_spans.remote()) if s.version == step
        ]
        assert spans and spans[0].end <= time.time()
        assert fleet_s > spans[0].end - spans[0].start  # it included the slow apply
    finally:
        await rig.faults()
    print(
        f"\n[slow engine 10x] per_engine session returned in {per_engine_s:.2f} s while the "
        f"slow engine took {slow_total_s:.2f} s to serve the step (its apply alone "
        f"{SLOW['apply_delay_s']:.1f} s); fleet session {fleet_s:.2f} s vs {baseline_s:.2f} s "
        f"with no slow engine (stall {fleet_s - baseline_s:.2f} s)"
    )
    await assert_consistent(rig)


# --------------------------------------------------------------------- a hung engine


async def test_hung_engine_per_engine_session_returns_and_quarantines_it(rig: Rig) -> None:
    step = await rig.publish()
    await rig.faults(["e4"], hang_on_bucket=1)
    try:
        report = await rig.session(
            policy="per_engine", min_engines=0.75, straggler_grace_s=0, timeout_s=3.0
        )
        # Returned while e4 hangs: the loop did not wait on it.
        assert report.engines["e4"].outcome == "catching_up"
        # With no grace, engines not done when the quorum (6 of 8) was reached are
        # left to finish in the background too.
        assert len(report.committed) >= 6
        assert {t.outcome for t in report.engines.values()} <= {"committed", "catching_up"}

        # After the session's timeout the straggler is aborted and quarantined, and
        # its hung receive is cancelled on the engine.
        async def e4_quarantined() -> bool:
            state = (await rig.view()).engines["e4"]
            return state.health is Health.QUARANTINED and "ran past" in (state.reason or "")

        await eventually(e4_quarantined, "the hung straggler was never quarantined")
        assert (await within(rig.engines["e4"].receiver_stats.remote())).version != step
    finally:
        await rig.faults(["e4"])
    await rig.sync_all()
    await assert_consistent(rig)


async def test_hung_engine_fleet_session_times_out_and_quarantines_it(rig: Rig) -> None:
    before = await rig.versions()
    await rig.publish()
    await rig.faults(["e4"], hang_on_bucket=1)
    try:
        with pytest.raises(SessionTimeoutError, match=r"ran past 2.0s") as info:
            await rig.session(policy="all_or_nothing", timeout_s=2.0)
        assert await rig.versions() == before
        # The hung engine is named and taken out of routing, so the next session
        # (the coordinator retries at once) does not hang on it again.
        assert info.value.engine == "e4", info.value
        state = (await rig.view()).engines["e4"]
        assert state.health in (Health.QUARANTINED, Health.CATCHING_UP), state
    finally:
        await rig.faults(["e4"])
    await rig.sync_all()
    await assert_consistent(rig)


async def test_hung_commit_holds_only_its_own_engine(rig: Rig) -> None:
    """``fleet``, one engine hangs in apply after the others committed (phase two).

    A commit that started is never interrupted, so that engine (and the snapshot
    it may be reading) stays held until its commit ends; the session times out
    naming it, and every other engine is free at once for the next session.
    """
    step = await rig.publish()
    await rig.faults(["e5"], hang_apply=True)
    with pytest.raises(SessionTimeoutError, match=r"ran past 2.0s") as info:
        await rig.session(policy="all_or_nothing", timeout_s=2.0)
    assert info.value.engine == "e5", info.value
    others = await rig.versions(without="e5")
    assert set(others.values()) == {step}
    view = await rig.view()
    assert view.engines["e5"].health is Health.QUARANTINED
    assert set(view.serving()) == set(others)
    # The next session is not held up by the hung commit.
    nxt = await rig.publish()
    report = await rig.session(policy="per_engine", min_engines=1.0, timeout_s=10.0)
    assert sorted(report.committed) == sorted(others)
    assert "e5" not in report.engines  # quarantined: out of normal sessions
    assert step in (await within(rig.trainer.cache_stats.remote())).pins
    # Ray restarts the engine: its commit ends (the call fails), the pin goes, and
    # the keeper catches the new incarnation up.
    ray.kill(rig.engines["e5"], no_restart=False)

    async def released() -> bool:
        return step not in (await rig.trainer.cache_stats.remote()).pins

    await eventually(released, "the hung commit's pin was never released")
    await rig.sync_all()
    view = await assert_consistent(rig)
    assert view.by_version() == {nxt: tuple(view.engines)}


# --------------------------------------------------------------------- killed, restarted


@pytest.mark.parametrize("policy", ["all_or_nothing", "per_engine"])
async def test_engine_killed_mid_session(rig: Rig, policy: str) -> None:
    victim = "e5" if policy == "all_or_nothing" else "e6"
    before = await rig.versions()
    step = await rig.publish()
    await rig.faults([victim], receive_delay_s=0.5)
    session = asyncio.ensure_future(rig.session(policy=policy, min_engines=0.75))
    await wait_open(rig.engines[victim])
    ray.kill(rig.engines[victim], no_restart=True)
    if policy == "all_or_nothing":
        with pytest.raises(SessionError, match=rf"engine '{victim}' failed") as info:
            await session
        assert info.value.engine == victim
        # Nobody committed: phase one failed.
        live = await rig.versions(without=victim)
        assert live == {n: v for n, v in before.items() if n != victim}
    else:
        report = await session
        assert report.engines[victim].outcome == "quarantined"
        assert sorted(report.committed) == sorted(n for n in rig.engines if n != victim)

    async def gone() -> bool:
        return (await rig.view()).engines[victim].health is Health.GONE

    await eventually(gone, f"{victim} was never seen dead for good")
    await rig.replace(victim)
    await rig.sync_all()
    view = await assert_consistent(rig)
    assert {v: set(names) for v, names in view.by_version().items()} == {step: set(rig.engines)}


async def test_engine_restarted_by_ray_is_caught_up_before_it_serves(rig: Rig) -> None:
    """Killed and restarted by Ray (``max_restarts``): a new incarnation serving its
    initial weights. The keeper notices the incarnation change and catches it up to
    the newest ready step; from then on it serves, never before."""
    step = await rig.publish()
    await rig.sync_all()
    old = (await rig.view()).engines["e7"].incarnation
    start = time.monotonic()
    ray.kill(rig.engines["e7"], no_restart=False)
    seen: list[tuple[str, int | None]] = []
    while True:
        state = (await rig.view()).engines["e7"]
        if state.incarnation != old:
            seen.append((state.health.value, state.version))
            # A new incarnation counts as serving only with the current step.
            if state.health is Health.SERVING:
                assert state.version == step, seen
                break
        assert time.monotonic() - start < WAIT_S, f"e7 never served again: {seen}"
        await asyncio.sleep(0.02)
    restart_to_serving_s = time.monotonic() - start
    print(
        f"\n[restart] e7 killed and restarted by Ray -> serving step {step} again after "
        f"{restart_to_serving_s:.2f} s (probe interval {PROBE_S} s); states seen: {seen}"
    )
    await assert_consistent(rig)


async def test_engine_dying_mid_session_and_restarted_is_caught_up(rig: Rig) -> None:
    step = await rig.publish()
    old = (await rig.view()).engines["e0"].incarnation
    await rig.faults(["e0"], die_on_bucket=2)
    report = await rig.session(policy="per_engine", min_engines=0.75)
    # Quarantined, or still "catching_up" if Ray reported the death only after the
    # others had committed (then it is quarantined in the background).
    assert report.engines["e0"].outcome in ("quarantined", "catching_up")
    assert sorted(report.committed) == sorted(n for n in rig.engines if n != "e0")

    async def e0_back() -> bool:
        state = (await rig.view()).engines["e0"]
        return state.incarnation != old and state.health is Health.SERVING and state.version == step

    await eventually(e0_back, "the restarted e0 was never caught up")
    await assert_consistent(rig)


# --------------------------------------------------------------------- membership


async def test_engine_joining_mid_session_is_caught_up_by_the_keeper(rig: Rig) -> None:
    name, handle = await rig.spawn()
    step = await rig.publish()
    await rig.faults(["e1"], receive_delay_s=0.3)
    try:
        session = asyncio.ensure_future(rig.session(policy="all_or_nothing"))
        await wait_open(rig.engines["e1"])
        await rig.add(name, handle)
        report = await session
    finally:
        await rig.faults(["e1"])
    assert name not in report.engines  # the session's engines were chosen at its start
    assert sorted(report.committed) == sorted(n for n in rig.engines if n != name)

    async def joined() -> bool:
        state = (await rig.view()).engines[name]
        return state.health is Health.SERVING and state.version == step

    await eventually(joined, f"{name} was never caught up")
    view = await assert_consistent(rig)
    assert {v: set(names) for v, names in view.by_version().items()} == {step: set(rig.engines)}


@pytest.mark.parametrize("policy", ["all_or_nothing", "per_engine"])
async def test_engine_leaving_mid_session_is_aborted_and_the_rest_commit(
    rig: Rig, policy: str
) -> None:
    leaver = "e2"
    before = await within(rig.engines[leaver].receiver_stats.remote())
    step = await rig.publish()
    await rig.faults([leaver], receive_delay_s=0.5)
    try:
        # per_engine: a long straggler grace, so the session is still waiting for the
        # slow engine when it is removed (with the default grace, as long as the
        # quorum took, a loaded machine could return first and report it a straggler).
        session = asyncio.ensure_future(rig.session(policy=policy, straggler_grace_s=WAIT_S))
        await wait_open(rig.engines[leaver])
        await within(rig.trainer.fleet_remove.remote(leaver))
        report = await session
        assert report.engines[leaver].outcome == "removed"
        assert sorted(report.committed) == sorted(n for n in rig.engines if n != leaver)
        after = await within(rig.engines[leaver].receiver_stats.remote())
        # It kept its version, and the session aborted it (no staging left).
        assert after.version == before.version
        assert after.open_sessions == ()
        assert after.dropped.get("aborted", 0) == before.dropped.get("aborted", 0) + 1
        assert leaver not in (await rig.view()).engines
    finally:
        await rig.faults([leaver])
        # Back in, whatever happened above (the rig is the module's): caught up like
        # any new engine.
        if leaver not in (await rig.view()).engines:
            await within(rig.trainer.fleet_add.remote(leaver, rig.engines[leaver]))
    await rig.sync_all()
    view = await assert_consistent(rig)
    assert {v: set(names) for v, names in view.by_version().items()} == {step: set(rig.engines)}


# --------------------------------------------------------------------- rolling updates


@pytest.mark.parametrize("policy", ["all_or_nothing", "per_engine"])
async def test_rolling_update_applies_at_most_max_updating_at_once(rig: Rig, policy: str) -> None:
    """``max_updating=2``: at most two engines apply at any instant (the rest keep
    serving), also for ``per_engine`` stragglers that finish in the background."""
    spans: list[Any] = []

    async def every_engine_applied() -> bool:
        spans[:] = [
            s
            for e in rig.engines.values()
            for s in await e.apply_spans.remote()
            if s.version == step
        ]
        return len(spans) == len(rig.engines)

    await rig.faults(apply_delay_s=0.2)
    try:
        step = await rig.publish()
        report = await rig.session(policy=policy, max_updating=2)
        if policy == "all_or_nothing":
            assert sorted(report.committed) == sorted(rig.engines)
        else:
            # The quorum (one engine) committed; the rest roll on in the background.
            assert report.committed
        await eventually(every_engine_applied, f"not every engine applied step {step}")
    finally:
        await rig.faults()
    most = max_overlap(spans)
    assert most <= 2, spans
    if policy == "all_or_nothing":
        # Every engine was prepared before the first commit: two at a time, always.
        assert most == 2, spans
    await rig.sync_all()
    await assert_consistent(rig)


# --------------------------------------------------------------------- the trainer dies


async def test_train_actor_killed_mid_session_engines_drop_staging_within_ttl(rig: Rig) -> None:
    """A train actor dies mid-session: no abort reaches the engines, so each drops the
    session's staging itself once the time to live announced at ``begin`` passed."""
    doomed = trainer_class().remote(deadlines=Deadlines(abort_s=1.0))
    await within(doomed.pid.remote(), 120)
    before = await rig.versions()
    expired = await rig.dropped("expired")
    await within(doomed.publish.remote(10_000))  # newer than anything the rig will publish
    plan = SyncPlan(dict(rig.engines), timeout_s=2.0)
    ttl = plan.timeout_s + 1.0  # the trainer's abort bound
    await rig.faults(receive_delay_s=1.0)  # nothing commits before the kill
    try:
        session = doomed.run_sync_session.remote(plan)
        for engine in rig.engines.values():
            await wait_open(engine)
        killed_at = time.monotonic()
        ray.kill(doomed, no_restart=True)

        async def all_dropped() -> bool:
            stats = [await e.receiver_stats.remote() for e in rig.engines.values()]
            return all(not s.open_sessions for s in stats)

        await eventually(all_dropped, "staging of the dead trainer's session was left", ttl + 15)
        dropped_after_s = time.monotonic() - killed_at
        with pytest.raises(ray.exceptions.RayActorError):
            await within(session)
    finally:
        await rig.faults()
    # Dropped by the engines' own reaper once the announced time to live passed
    # (counted from begin, before the kill): never held much past it.
    assert dropped_after_s < ttl + 10
    after = await rig.dropped("expired")
    assert all(after[n] == expired[n] + 1 for n in rig.engines), (expired, after)
    assert await rig.versions() == before
    print(
        f"\n[trainer killed] every engine dropped the staging {dropped_after_s:.2f} s after "
        f"the kill (ttl {ttl:.1f} s from begin)"
    )
    await assert_consistent(rig)
