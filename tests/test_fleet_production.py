"""Faults a fleet meets in production, on real Ray (light engines, see _fleet_actors).

- A ``per_engine`` session does not wait for every engine's ``begin``: an engine
  killed in ``begin``, or slow to answer it, holds up no one else.
- An engine removed while it waits for its rolling-update commit slot is reported
  ``removed``; the session commits the others, under both policies.
- The first call to an engine that does not answer takes it out of routing,
  whoever made the call; an engine Ray is restarting is ``catching_up``, not
  quarantined with a back-off.
- Catch-ups respect the catch-up plan's ``max_updating``.

Timings are printed (``-s``) for the record, never asserted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray
from _fleet_actors import engine_class, max_overlap, trainer_class
from _waits import WAIT_S, eventually, within
from test_fleet_faults import Rig, assert_consistent, running_rig

from asyncsync import Deadlines, FleetError, FleetView, Health, SyncPlan
from asyncsync.client import SessionTag
from asyncsync.fleet import EngineFleet

pytestmark = pytest.mark.timeout(240)

ENGINES = 4
PROBE_S = 0.3


@pytest.fixture(scope="module")
async def rig(ray_local: Any) -> AsyncIterator[Rig]:
    async with running_rig("p", ENGINES, Deadlines(probe_interval_s=PROBE_S, call_s=5.0)) as rig:
        yield rig


async def timed_session(rig: Rig, **plan: Any) -> tuple[float, Any]:
    start = time.monotonic()
    report = await rig.session(**plan)
    return time.monotonic() - start, report


# --------------------------------------------------------------------- begin is per engine


@pytest.mark.parametrize("fault", ["die_in_begin", "slow_begin"])
async def test_per_engine_session_does_not_wait_for_one_engines_begin(rig: Rig, fault: str) -> None:
    grace = 0.5
    plan = {"policy": "per_engine", "min_engines": ENGINES - 1, "straggler_grace_s": grace}
    await rig.publish()
    clean_s, clean = await timed_session(rig, **plan)
    assert sorted(clean.committed) == sorted(rig.engines)
    await rig.publish()
    victim = "p0"
    faults = {"die_in_begin": True} if fault == "die_in_begin" else {"begin_delay_s": 3 * WAIT_S}
    await rig.faults([victim], **faults)
    try:
        took_s, report = await timed_session(rig, **plan)
    finally:
        if fault == "slow_begin":
            await rig.faults([victim])
    others = sorted(n for n in rig.engines if n != victim)
    assert sorted(report.committed) == others, report
    # The victim never answered its begin before the session returned: it is left
    # to catch up (slow) or out of routing (its process died).
    assert report.engines[victim].outcome in ("catching_up", "quarantined"), report.engines
    assert report.engines[victim].begin_s == 0.0  # its own begin never ended in the session
    assert all(report.engines[n].begin_s > 0 for n in others)
    view = await rig.view()
    assert view.engines[victim].health is not Health.SERVING
    print(
        f"\n[{fault}] train-loop wait: {took_s:.2f} s with the fault, {clean_s:.2f} s clean "
        f"(+ straggler_grace_s {grace} s = {clean_s + grace:.2f} s)"
    )
    await rig.sync_all()
    await assert_consistent(rig)


# --------------------------------------------------------------------- removed mid-commit


@pytest.mark.parametrize("policy", ["all_or_nothing", "per_engine"])
async def test_engine_removed_while_waiting_for_its_commit_slot_is_reported_removed(
    rig: Rig, policy: str
) -> None:
    await rig.publish()
    await rig.faults(apply_delay_s=0.6)
    # per_engine: the quorum is every engine left, so none is left catching up.
    quorum = {"min_engines": ENGINES - 1} if policy == "per_engine" else {}
    session = asyncio.ensure_future(rig.session(policy=policy, max_updating=1, **quorum))
    try:
        # One engine applies; the others wait for the single commit slot.
        async def one_applies() -> bool:
            started = [await e.started_applies.remote() for e in rig.engines.values()]
            return any(rig.step in s for s in started)

        await eventually(one_applies, "no engine began applying")
        waiting = [
            n
            for n, e in rig.engines.items()
            if rig.step not in await within(e.started_applies.remote())
        ]
        leaver = waiting[-1]
        await within(rig.trainer.fleet_remove.remote(leaver))
        report = await within(session)
    finally:
        await rig.faults()
    assert report.engines[leaver].outcome == "removed", report.engines[leaver]
    assert sorted(report.committed) == sorted(n for n in rig.engines if n != leaver)
    assert (await within(rig.engines[leaver].receiver_stats.remote())).version != rig.step
    await rig.add(leaver, rig.engines.pop(leaver))  # back in for the next test
    await rig.sync_all()
    await assert_consistent(rig)


# --------------------------------------------------------------------- routing


async def test_first_failed_call_takes_an_unreachable_engine_out_of_routing(
    ray_local: Any,
) -> None:
    handle = engine_class().remote("lost")
    await within(handle.pid.remote(), 120)
    fleet = EngineFleet({"lost": handle}, initial=Health.SERVING, deadlines=Deadlines(call_s=5.0))
    await within(fleet.refresh())
    assert fleet.view().serving() == {"lost": None}
    ray.kill(handle, no_restart=True)  # lands a moment later: call until a call fails
    failed: list[FleetError] = []

    async def a_call_failed() -> bool:
        try:
            await fleet.client.engine_info("lost")
        except FleetError as exc:
            failed.append(exc)
            return True
        assert fleet.view().serving() == {"lost": None}  # answered: still in routing
        return False

    await eventually(a_call_failed, "the killed engine kept answering")
    assert "'lost'" in str(failed[0])
    # No probe round, no session: the failed call itself took it out.
    assert "lost" not in fleet.view().serving()
    assert fleet.view().engines["lost"].health is Health.QUARANTINED


async def test_an_engine_raising_is_an_answer_not_an_absence(ray_local: Any) -> None:
    handle = engine_class().remote("answers")
    await within(handle.pid.remote(), 120)
    fleet = EngineFleet({"answers": handle}, initial=Health.SERVING)
    with pytest.raises(FleetError, match="'answers'"):
        # A malformed call the engine refuses: it is alive and answered.
        call = fleet.client.transport_setup(
            "answers", "no-such-transport", None, bound_s=5.0, what="set-up", session=SessionTag()
        )
        await within(call)
    assert fleet.view().serving() == {"answers": None}
    ray.kill(handle, no_restart=True)


def test_a_restart_in_progress_is_catching_up_not_a_quarantine() -> None:
    fleet = EngineFleet({"r": object()}, initial=Health.SERVING)
    restarting = FleetError("engine 'r' failed in begin: ActorUnavailableError")
    restarting.__cause__ = ray.exceptions.ActorUnavailableError("restarting", None)
    fleet.failed("r", restarting)
    state = fleet.view().engines["r"]
    assert state.health is Health.CATCHING_UP and "restarting" in (state.reason or "")
    assert fleet.due_for_catch_up() == []  # retried at the next probe round, not at once
    broken = FleetError("engine 'r' failed in begin: RuntimeError: bad")
    fleet.failed("r", broken)
    assert fleet.view().engines["r"].health is Health.QUARANTINED


# --------------------------------------------------------------------- catch-ups


async def test_catch_ups_respect_the_catch_up_plans_max_updating(ray_local: Any) -> None:
    trainer = trainer_class().remote(
        deadlines=Deadlines(probe_interval_s=PROBE_S, call_s=5.0),
        catch_up_plan=SyncPlan(policy="per_engine", max_updating=1),
    )
    # Every incarnation applies slowly, so catch-ups that ran at once would overlap.
    engines = {
        f"c{i}": engine_class(max_restarts=2).remote(f"c{i}", apply_delay_s=0.4) for i in range(3)
    }
    try:
        await within(asyncio.gather(*(e.pid.remote() for e in engines.values())), 120)
        await within(trainer.publish.remote(0))
        for name, handle in engines.items():
            await within(trainer.fleet_add.remote(name, handle))

        async def all_serving() -> bool:
            view: FleetView = await trainer.fleet_view.remote()
            return view.serving() == dict.fromkeys(engines, 0)

        # Nothing but the keeper brings them to step 0.
        await eventually(all_serving, "the keeper never caught the engines up")
        spans = [s for e in engines.values() for s in await within(e.apply_spans.remote())]
        assert len(spans) == len(engines)
        assert max_overlap(spans) == 1, spans
    finally:
        await within(trainer.close.remote())
        for handle in [trainer, *engines.values()]:
            ray.kill(handle, no_restart=True)
