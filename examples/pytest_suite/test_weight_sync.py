"""A user's tests of their train actor and engine, on the asyncsync pytest plugin.

``ray_local`` starts one local Ray for the session, ``actor_factory`` kills the
actors a test made, and the loop-lag guard fails a test whose actor blocked its
event loop (the build and the sync must run off the loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import ray
import torch

from asyncsync import SyncPlan, WeightSyncActor, aio, train_actor
from asyncsync.buckets import Bucket
from asyncsync.receiver import StagingReceiver
from asyncsync.testing import LoopLagMixin

NAMES = [f"layers.{i}.weight" for i in range(8)]


class Trainer(WeightSyncActor, LoopLagMixin):
    def __init__(self) -> None:
        super().__init__(bucket_bytes=1 << 20)
        self.weights = {name: torch.zeros(256, 256) for name in NAMES}

    def named_weights(self, step: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.weights.items()

    async def train_step(self, step: int) -> None:
        def update() -> None:
            for w in self.weights.values():
                w.fill_(float(step))

        await asyncio.to_thread(update)


class Engine(StagingReceiver, LoopLagMixin):
    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[str, torch.Tensor] = {}

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        def load() -> dict[str, torch.Tensor]:
            return {name: t.clone() for b in buckets for name, t in b.named_tensors()}

        self.weights = await asyncio.to_thread(load)

    async def served_values(self) -> set[float]:
        return {float(v) for t in self.weights.values() for v in t.unique()}


def make_pair(actor_factory: Any) -> tuple[Any, Any]:
    trainer = actor_factory(train_actor(Trainer, num_cpus=0))
    engine = actor_factory(ray.remote(Engine).options(num_cpus=0, max_concurrency=8))
    return trainer, engine


@pytest.mark.max_loop_lag(250)
async def test_engine_serves_the_step_it_was_synced(actor_factory: Any) -> None:
    trainer, engine = make_pair(actor_factory)
    for step in range(3):
        await trainer.train_step.remote(step)
        assert await trainer.build_cpu_bucket_cache.remote(step) == step
        report = await trainer.run_sync_session.remote(SyncPlan(engines={"e": engine}))
        assert report.step == step
        assert await engine.served_values.remote() == {float(step)}


async def test_a_build_may_run_while_a_session_streams(
    actor_factory: Any, loop_lag_guard: Any
) -> None:
    # The guard is requested directly: the ini threshold (asyncsync_max_loop_lag_ms) applies.
    trainer, engine = make_pair(actor_factory)
    await trainer.train_step.remote(0)
    await trainer.build_cpu_bucket_cache.remote(0)
    session = trainer.run_sync_session.remote(SyncPlan(engines={"e": engine}, min_step=0))
    await trainer.train_step.remote(1)
    build = trainer.build_cpu_bucket_cache.remote(1)
    report, built = await asyncio.gather(session, build)
    assert report.step in (0, 1)  # the step it reports is the step it sent
    assert built == 1
    assert await trainer.cache_ready_step.remote() == 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_trio_or_asyncio_driver(
    actor_factory: Any, loop_lag_guard: Any, anyio_backend: str
) -> None:
    trainer, engine = make_pair(actor_factory)
    await aio.get(trainer.train_step.remote(5))
    await aio.get(trainer.build_cpu_bucket_cache.remote(5))
    report, ready = await aio.gather(
        trainer.run_sync_session.remote(SyncPlan(engines={"e": engine})),
        trainer.cache_ready_step.remote(),
    )
    assert (report.step, ready) == (5, 5)
    assert await aio.get(engine.served_values.remote()) == {5.0}
