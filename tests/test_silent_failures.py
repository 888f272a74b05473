"""Failures that used to pass silently: a forgotten ``await``, an empty update, a pending reaper.

* A build whose ``add()`` was called but never ran must not publish (it would publish a
  snapshot without that add's tensors, and only Python's "never awaited" warning told).
* An engine refuses an update without any tensor unless it opted in; ranks that own
  no data still publish empty snapshots to their own cache.
* An engine's reaper leaves nothing pending when its loop goes away (no "Task was
  destroyed but it is pending!" in the driver's output).

All in-process, no Ray.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from asyncsync import (
    Bucket,
    BucketCache,
    BucketManifest,
    CacheError,
    ProtocolError,
    StagingReceiver,
    pack,
)
from asyncsync.engines import TensorEngine

pytestmark = pytest.mark.timeout(60)


def weights(step: int) -> list[tuple[str, torch.Tensor]]:
    return [(f"w{i}", torch.full((256,), float(step * 10 + i))) for i in range(3)]


def state(cache: BucketCache) -> tuple[Any, ...]:
    stats = cache.stats()
    return stats.ready_step, stats.building_step, stats.pins, stats.publishes


# --------------------------------------------------------------------- forgotten await


async def test_a_build_whose_add_was_never_awaited_is_not_published() -> None:
    cache = BucketCache(1 << 16, prefault_pool=False)
    async with cache.build(0) as build:
        await build.add(weights(0))
    before = state(cache)
    forgotten = None
    with pytest.raises(CacheError) as info:
        async with cache.build(1) as build:
            forgotten = build.add(weights(1))  # no await: the coroutine never runs
    assert forgotten is not None
    forgotten.close()  # what Python would otherwise report as "never awaited"
    message = str(info.value)
    assert "step 1" in message and "never ran" in message and "'w0'" in message, message
    assert state(cache) == before
    assert cache.stats().discards == 1
    # The next build, awaited, publishes.
    async with cache.build(1) as build:
        await build.add(weights(1))
    async with cache.read() as snap:
        assert snap.step == 1 and [n for n, _ in snap.named_tensors()] == ["w0", "w1", "w2"]
    await cache.close()


async def test_an_add_awaited_late_in_a_task_still_counts() -> None:
    # Called first, awaited later (in a task): the build publishes once it ran.
    cache = BucketCache(1 << 16, prefault_pool=False)
    async with cache.build(0) as build:
        first = build.add(weights(0)[:1])
        await asyncio.create_task(first)
        await build.add(weights(0)[1:])
    async with cache.read() as snap:
        assert snap.step == 0 and len(list(snap.named_tensors())) == 3
    await cache.close()


async def test_a_generator_given_to_a_forgotten_add_is_described() -> None:
    cache = BucketCache(1 << 16, prefault_pool=False)
    with pytest.raises(CacheError, match="a generator") as info:
        async with cache.build(0) as build:
            coroutine = build.add(pair for pair in weights(0))
    coroutine.close()
    assert cache.ready_step is None, info.value
    await cache.close()


async def test_ranks_without_data_still_publish_empty_snapshots() -> None:
    # What a non-owner rank does: its source yields nothing, and the add is awaited.
    cache = BucketCache(1 << 16, prefault_pool=False)
    async with cache.build(0) as build:
        await build.add(iter(()))
    async with cache.build(1):
        pass  # no add at all: an empty snapshot too
    async with cache.read() as snap:
        assert snap.step == 1 and snap.buckets == ()
    await cache.close()


# --------------------------------------------------------------------- empty updates


class Recorder(StagingReceiver):
    """The default check_manifest (accepts every tensor); records what it applies."""

    def __init__(self) -> None:
        super().__init__()
        self.applied: list[int] = []

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        self.applied.append(version)


class VersionOnly(Recorder):
    accepts_empty_updates = True


async def empty_manifest() -> list[BucketManifest]:
    """The manifest of a real empty snapshot, as a train actor would send it."""
    cache = BucketCache(1 << 16, prefault_pool=False)
    async with cache.build(0) as build:
        await build.add([])
    async with cache.read() as snap:
        manifest = list(snap.manifest)
    await cache.close()
    return manifest


@pytest.mark.parametrize("shape", ["no-buckets", "snapshot-of-empty-add"])
async def test_an_engine_refuses_an_empty_update_by_default(shape: str) -> None:
    manifest = [] if shape == "no-buckets" else await empty_manifest()
    engine = Recorder()
    with pytest.raises(ProtocolError, match=r"'s1'.*step 3 carries no tensor"):
        await engine.begin("s1", 3, manifest)
    stats = await engine.receiver_stats()
    assert (stats.version, stats.open_sessions, engine.applied) == (None, (), [])
    # Nothing was opened and the id was not used: a real update under it commits.
    buckets = pack(weights(3), 1 << 16)
    await engine.begin("s1", 3, [b.manifest for b in buckets])
    for i, bucket in enumerate(buckets):
        await engine.receive("s1", i, bucket)
    assert await engine.commit("s1") == 3 and engine.applied == [3]


async def test_an_engine_that_opted_in_commits_an_empty_update() -> None:
    engine = VersionOnly()
    await engine.begin("s1", 4, await empty_manifest())
    assert await engine.commit("s1") == 4
    assert engine.applied == [4] and engine.version == 4


async def test_a_manifest_of_empty_tensors_is_not_an_empty_update() -> None:
    # Zero-size tensors still name parameters: not the "nothing was sent" case.
    engine = TensorEngine({"none": torch.empty(0)})
    buckets = pack([("none", torch.empty(0))], 1 << 16)
    await engine.begin("s1", 0, [b.manifest for b in buckets])
    await engine.receive("s1", 0, buckets[0])
    assert await engine.commit("s1") == 0


# --------------------------------------------------------------------- the reaper


def test_the_reaper_leaves_nothing_pending_when_the_loop_goes_away() -> None:
    """An engine whose loop ends with a session open (an actor shut down mid-session).

    The reaper used to be a task sleeping between rounds: destroyed pending with the
    loop, it logged "Task was destroyed but it is pending! ... _reap()".
    """
    reported: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    buckets = pack(weights(0), 1 << 16)
    engine: Recorder | None = Recorder()

    async def open_session() -> None:
        assert engine is not None
        await engine.begin("s1", 0, [b.manifest for b in buckets], 60.0)

    loop.run_until_complete(open_session())
    loop.close()
    engine = None
    gc.collect()
    assert reported == [], [c.get("message") for c in reported]
