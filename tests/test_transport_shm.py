"""The shared-snapshot transport: same-node engines map the pinned snapshot, nothing moves.

In-process: the payload is only the region and the index; loading maps the cache's
own bytes; what cannot be mapped is a typed error. On a real local Ray: the pin
holds until every engine that maps the snapshot has committed, even when the
session is cancelled mid-commit and the next build races it; a train actor
killed mid-session leaves its engines nothing mapped once their staging expires.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import time
from typing import Any

import numpy as np
import pytest
import ray
import torch
from _actors import (
    TINY_LLAMA,
    FaultyEngine,
    assert_engines_hold,
    assert_no_stale_mappings,
    engine_class,
    engine_mappings,
    trainer_class,
)

from asyncsync import BucketCache, SessionError, SharedMemoryError, pack
from asyncsync.client import Deadlines
from asyncsync.plan import SyncPlan
from asyncsync.transport import SessionContext, backend, load_payload
from asyncsync.transport.shm import SharedPayload, SharedSnapshotTransport
from asyncsync.transport.shm import engine_mappings as kept_mappings

pytestmark = pytest.mark.timeout(180)


async def _built(cache: BucketCache, step: int) -> None:
    tensors = [(f"w{i}", torch.full((64, 64), step + i / 100)) for i in range(6)]
    async with cache.build(step) as build:
        await build.add(tensors)


async def test_payload_is_the_region_and_loading_maps_the_same_bytes() -> None:
    cache = BucketCache(bucket_bytes=32 << 10)
    await _built(cache, 3)
    transport = backend("shm").make()
    assert isinstance(transport, SharedSnapshotTransport)
    async with cache.read() as snap:
        ctx = SessionContext("s", snap.step, {}, snap.manifest)
        for index, bucket in enumerate(snap.buckets):
            payload = await transport.put(ctx, index, bucket)
            assert isinstance(payload, SharedPayload)
            # What travels is tiny: no payload byte, whatever the bucket's size.
            assert len(pickle.dumps(payload)) < 1024 < bucket.nbytes
            loaded = await asyncio.to_thread(load_payload, payload, {})
            assert not loaded.buffer.flags.writeable
            assert np.array_equal(loaded.buffer, bucket.buffer)
            loaded.verify(bucket.manifest)
    await cache.close()


async def test_engines_keep_the_owners_buffers_mapped_across_sessions() -> None:
    """Session after session the cache reuses its pooled buffers and an engine its maps."""
    cache = BucketCache(bucket_bytes=32 << 10)
    transport = SharedSnapshotTransport()
    state: dict[str, Any] = {}
    buffers = set()
    for step in range(6):
        await _built(cache, step)
        async with cache.read() as snap:
            ctx = SessionContext(f"s{step}", snap.step, {}, snap.manifest)
            for index, bucket in enumerate(snap.buckets):
                payload = await transport.put(ctx, index, bucket)
                loaded = await asyncio.to_thread(load_payload, payload, state)
                loaded.verify(bucket.manifest)  # this step's bytes, through a kept map
                assert np.array_equal(loaded.buffer, bucket.buffer)
                buffers.add(payload.region.token)
    kept = kept_mappings(state)
    # One map per buffer the cache ever used, however many sessions read them.
    assert len(kept) == len(buffers) < 6 * len(snap.buckets)
    await cache.close()  # the cache releases every buffer: nothing is worth keeping
    assert await asyncio.to_thread(kept.prune) == 0
    state["shm"] = "not mappings"
    with pytest.raises(SharedMemoryError, match=r"transport_state\['shm'\] holds a str"):
        await asyncio.to_thread(load_payload, payload, state)


async def test_a_bucket_outside_shared_memory_is_refused_naming_it() -> None:
    (bucket,) = pack([("a", torch.ones(4))])  # pack() allocates private memory
    ctx = SessionContext("s", 7, {}, (bucket.manifest,))
    with pytest.raises(SharedMemoryError, match="bucket 0 of step 7 is not in shared memory"):
        await SharedSnapshotTransport().put(ctx, 0, bucket)


async def test_a_region_whose_buffer_was_released_cannot_be_mapped() -> None:
    cache = BucketCache(bucket_bytes=32 << 10, prefault_pool=False)
    await _built(cache, 0)
    async with cache.read() as snap:
        payload = await SharedSnapshotTransport().put(
            SessionContext("s", 0, {}, snap.manifest), 0, snap.buckets[0]
        )
    await cache.close()  # the unpinned snapshot's buffers are freed
    with pytest.raises(SharedMemoryError, match=payload.region.name):
        await asyncio.to_thread(load_payload, payload, {})


# --------------------------------------------------------------------- on Ray


class SlowApplyEngine(FaultyEngine):
    """An engine whose commit takes ``apply_delay_s`` while it reads the mapped snapshot."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.apply_delay_s = 0.0

    async def set_apply_delay(self, seconds: float) -> None:
        self.apply_delay_s = seconds

    def _copy_in(self, buckets: Any) -> None:
        # Copy half, wait, copy the rest: a buffer reused under us shows up as torn weights.
        half = len(buckets) // 2
        super()._copy_in(buckets[:half])
        time.sleep(self.apply_delay_s)
        super()._copy_in(buckets[half:])


@pytest.fixture
async def rig(actor_factory: Any) -> Any:
    trainer = actor_factory(trainer_class())
    engines = {
        "e0": actor_factory(
            ray.remote(SlowApplyEngine).options(max_concurrency=16, num_cpus=0),
            "llama",
            TINY_LLAMA,
            seed=1,
            num_threads=1,
        ),
        "e1": actor_factory(engine_class(), "llama", TINY_LLAMA, seed=2, num_threads=1),
    }
    await asyncio.gather(trainer.pid.remote(), *(e.ping.remote() for e in engines.values()))
    yield trainer, engines
    await trainer.close.remote()


async def test_the_pin_outlives_a_cancelled_session_until_its_commits_end(rig: Any) -> None:
    trainer, engines = rig
    await trainer.publish.remote(0)
    _, want = await trainer.ready_snapshot_digests.remote()
    await engines["e0"].set_apply_delay.remote(1.5)
    session = trainer.run_sync_session.remote(SyncPlan(engines, transport="shm"))
    # Wait until e1 committed: e0 is then applying, reading the mapped snapshot.
    for _ in range(2000):
        if (await engines["e1"].receiver_stats.remote()).version == 0:
            break
        await asyncio.sleep(0.005)
    ray.cancel(session)
    with pytest.raises((ray.exceptions.TaskCancelledError, SessionError)):
        await session
    # The cancelled session left the commit running, and with it the pin ...
    assert (await trainer.cache_stats.remote()).pins == {0: 1}
    # ... so the next builds cannot reuse the buffers e0 still reads.
    await trainer.publish.remote(1)
    await trainer.publish.remote(2)
    for _ in range(2000):
        if (await trainer.cache_stats.remote()).pins == {}:
            break
        await asyncio.sleep(0.005)
    assert (await trainer.cache_stats.remote()).pins == {}
    version, have = await engines["e0"].state_digests.remote()
    assert version == 0
    assert have == want, "e0 applied bytes that changed under it"
    await engines["e0"].set_apply_delay.remote(0.0)
    await assert_no_stale_mappings(engines)
    report = await trainer.run_sync_session.remote(SyncPlan(engines, transport="shm"))
    assert report.step == 2
    await assert_engines_hold(trainer, engines, 2)


async def test_a_killed_train_actor_leaves_engines_nothing_mapped(actor_factory: Any) -> None:
    trainer = actor_factory(trainer_class(), deadlines=Deadlines(abort_s=1.0))
    engine = actor_factory(engine_class(), "llama", TINY_LLAMA, seed=1, num_threads=1)
    pid = await trainer.pid.remote()
    await trainer.publish.remote(0)
    # Slow enough that the session is still streaming when the trainer dies, under any
    # load: 8 buckets, 2 in flight, 1 s each.
    await engine.set_faults.remote(receive_delay_s=1.0)
    # The engine drops the staging of a session that cannot commit after its time to
    # live (timeout_s + the trainer's abort bound), the only way it learns of the death.
    plan = SyncPlan({"e": engine}, transport="shm", timeout_s=8.0)
    ttl_s = plan.timeout_s + 1.0
    session = trainer.run_sync_session.remote(plan)
    for _ in range(600):
        if await engine_mappings({"e": engine}):
            break
        await asyncio.sleep(0.05)
    assert await engine_mappings({"e": engine}), "the engine never mapped the snapshot"
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        await session
    deadline = time.monotonic() + ttl_s + 10
    while await engine_mappings({"e": engine}) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await engine_mappings({"e": engine}) == {}
    stats = await engine.receiver_stats.remote()
    assert stats.open_sessions == () and stats.staged_bytes == 0 and stats.kept_bytes == 0
    assert stats.dropped.get("expired") == 1, stats
    assert [n for n in os.listdir("/dev/shm") if n.startswith("asyncsync-")] == []
    await engine.set_faults.remote()
