"""Every option of a session's plan, and every bound of the train actor's Deadlines,
does what its docstring says on the default path: a session to the train actor's
fleet (``SyncPlan()`` with ``engines=None``) under the default policy.

``cross_node`` only shows with engines on another node: tests/multinode covers it.
``Deadlines.abort_s`` is part of the staging time to live each session announces:
tests/test_fleet_faults.py (the trainer killed mid-session) covers it;
``catch_up_plan`` is covered in tests/test_fleet_production.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _fleet_actors import max_overlap
from _waits import within
from test_fleet_faults import Rig, assert_consistent, running_rig

from asyncsync import Deadlines, ReadTimeoutError, SessionError, SessionTimeoutError

pytestmark = pytest.mark.timeout(180)

ENGINES = 3
CALL_S = 1.0


@pytest.fixture(scope="module")
async def rig(ray_local: Any) -> AsyncIterator[Rig]:
    async with running_rig("o", ENGINES, Deadlines(probe_interval_s=0.3, call_s=CALL_S)) as rig:
        yield rig


async def test_transport(rig: Rig) -> None:
    await rig.publish()
    report = await rig.session()
    assert {t.transport for t in report.engines.values()} == {"shm"}  # auto, one node
    await rig.publish()
    report = await rig.session(transport="object_store")
    assert {t.transport for t in report.engines.values()} == {"object_store"}
    assert sorted(report.committed) == sorted(rig.engines)


@pytest.mark.parametrize("inflight", [1, 3])
async def test_max_inflight_buckets(rig: Rig, inflight: int) -> None:
    await rig.publish()
    await rig.faults(receive_delay_s=0.05)
    try:
        await asyncio.gather(*(e.take_most_receives.remote() for e in rig.engines.values()))
        await rig.session(max_inflight_buckets=inflight)
        most = [await within(e.take_most_receives.remote()) for e in rig.engines.values()]
    finally:
        await rig.faults()
    assert max(most) <= inflight, most
    if inflight == 1:
        assert most == [1] * ENGINES


async def test_max_updating(rig: Rig) -> None:
    step = await rig.publish()
    await rig.faults(apply_delay_s=0.2)
    try:
        await rig.session(max_updating=1)
    finally:
        await rig.faults()
    spans = [
        s
        for e in rig.engines.values()
        for s in await within(e.apply_spans.remote())
        if s.version == step
    ]
    assert len(spans) == ENGINES and max_overlap(spans) == 1, spans


async def test_min_step_and_pin_timeout(rig: Rig) -> None:
    with pytest.raises(ReadTimeoutError, match=str(rig.step + 1)):
        await rig.session(min_step=rig.step + 1, pin_timeout_s=0.3)
    report = await rig.session(min_step=rig.step)
    assert report.step == rig.step


async def test_timeout(rig: Rig) -> None:
    await rig.publish()
    await rig.faults(["o0"], hang_on_bucket=0)
    try:
        with pytest.raises(SessionTimeoutError, match=r"ran past 1.0s") as info:
            await rig.session(timeout_s=1.0)
    finally:
        await rig.faults()
    assert info.value.engine == "o0"
    await rig.sync_all()
    await assert_consistent(rig)


async def test_policy_min_engines_and_straggler_grace(rig: Rig) -> None:
    await rig.publish()
    await rig.faults(["o1"], receive_delay_s=0.5)
    try:
        report = await rig.session(
            policy="per_engine", min_engines=ENGINES - 1, straggler_grace_s=0.0
        )
    finally:
        await rig.faults()
    assert report.engines["o1"].outcome == "catching_up", report.engines
    assert sorted(report.committed) == ["o0", "o2"]
    await rig.sync_all()
    await assert_consistent(rig)


async def test_deadlines_call_bounds_begin(rig: Rig) -> None:
    await rig.publish()
    await rig.faults(["o2"], begin_delay_s=5 * CALL_S)
    try:
        with pytest.raises(
            SessionError, match=rf"'o2' failed in begin: no answer within {CALL_S:g}s"
        ):
            await rig.session()
    finally:
        await rig.faults()
    await rig.sync_all()
    await assert_consistent(rig)
