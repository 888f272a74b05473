"""Sessions in one process (engines behind a handle shim): timing corners of the contracts.

No Ray here: the engines are real :class:`~asyncsync.StagingReceiver` objects called
through the ``handle.method.remote(...)`` shape a session uses, so each corner can be
driven step by step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from _inprocess import Handle

from asyncsync import (
    Bucket,
    BucketCache,
    ClosedError,
    EngineFleet,
    Health,
    StagingReceiver,
    SyncPlan,
    WeightSyncActor,
)
from asyncsync.session import run_session
from asyncsync.transport import backend

pytestmark = pytest.mark.timeout(60)

ONES = float(1 << 16)  # the sum of each tensor below


class SlowApply(StagingReceiver):
    """Reads its staged buckets only after a pause, as an engine waiting for a generation."""

    def __init__(self, pause_s: float) -> None:
        super().__init__()
        self.pause_s = pause_s
        self.applying = asyncio.Event()
        self.sums: list[float] = []

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        self.applying.set()
        await asyncio.sleep(self.pause_s)
        self.sums = [float(t.sum()) for b in buckets for _, t in b.named_tensors()]


class SlowReceive(StagingReceiver):
    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def receive(self, session_id: str, index: int, payload: Any) -> int:
        await asyncio.sleep(self.delay_s)
        return await super().receive(session_id, index, payload)

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        pass


class Ones(WeightSyncActor):
    def named_weights(self, step: int) -> Any:
        return [(f"w{i}", torch.ones(1 << 16)) for i in range(4)]


async def test_closing_the_train_actor_lets_a_shared_snapshot_commit_finish() -> None:
    """close() during a commit that copies from the pinned shared snapshot: the copy
    reads the snapshot's bytes to the end (the pin outlives the close), never freed memory."""
    actor = Ones(bucket_bytes=1 << 20)
    await actor.build_cpu_bucket_cache(0)
    engine = SlowApply(pause_s=0.5)
    session = asyncio.create_task(
        actor.run_sync_session(SyncPlan(engines={"e": Handle(engine)}, transport="shm"))
    )
    await asyncio.wait_for(engine.applying.wait(), 10)
    await actor.close()
    with pytest.raises(ClosedError, match="a commit already applying was let finish"):
        await session
    assert engine.version == 0
    assert engine.sums == [ONES] * 4


async def test_per_engine_quorum_reached_then_the_timeout_returns_the_report() -> None:
    """The quorum committed; the stragglers' grace would end after timeout_s: the session
    returns its report at timeout_s, with the stragglers quarantined, not an error."""
    cache = BucketCache(bucket_bytes=4096)
    async with cache.build(0) as build:
        await build.add([(f"w{i}", torch.zeros(1024)) for i in range(4)])
    fast, slow = SlowReceive(0.0), SlowReceive(1.0)
    fleet = EngineFleet({"fast": Handle(fast), "slow": Handle(slow)}, initial=Health.SERVING)
    made: dict[str, Any] = {}
    plan = SyncPlan(
        engines={"fast": 1, "slow": 2},
        policy="per_engine",
        min_engines=1,
        straggler_grace_s=5.0,
        timeout_s=1.5,
    )
    background: set[asyncio.Task[None]] = set()
    report = await run_session(
        cache,
        plan,
        fleet,
        lambda name: made.setdefault(name, backend(name).make()),
        background=background,
    )
    assert report.committed == ("fast",)
    assert report.engines["slow"].outcome == "quarantined"
    assert "ran past 1.5s" in (report.engines["slow"].error or "")
    assert (fast.version, slow.version) == (0, None)
    assert fleet.view().engines["slow"].health is Health.QUARANTINED
    assert (await slow.receiver_stats()).open_sessions == ()
    await cache.close()
