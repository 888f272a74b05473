"""Unit tests of the BucketCache contract, on the test's own event loop."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

import pytest
import torch
from _memfd import mapped_buffers, open_buffers

from asyncsync import BucketCache, Snapshot
from asyncsync.buckets import checksum
from asyncsync.errors import (
    BucketError,
    BuildInProgressError,
    CacheError,
    ClosedError,
    InvalidStepError,
    NothingBuiltError,
    ReadTimeoutError,
    ResidentLimitError,
    StaleStepError,
    TornSnapshotError,
    WrongLoopError,
)
from asyncsync.sharedmem import SharedBuffer, map_region

KIB = 1024


def weights(step: int, n: int = 6, numel: int = 1024) -> list[tuple[str, torch.Tensor]]:
    """Tensors whose every element encodes the step (and the tensor's position)."""
    return [(f"layer{i}.w", torch.full((numel,), float(step * 100 + i))) for i in range(n)]


def assert_whole_step(snapshot_tensors: list[tuple[str, torch.Tensor]], step: int) -> None:
    names = [n for n, _ in snapshot_tensors]
    assert names == [f"layer{i}.w" for i in range(len(names))]
    for i, (name, t) in enumerate(snapshot_tensors):
        assert bool((t == float(step * 100 + i)).all()), f"{name} is not from step {step}"


async def publish(cache: BucketCache, step: int, **kw: int) -> None:
    async with cache.build(step) as build:
        await build.add(weights(step, **kw))


async def test_build_publishes_and_read_pins_that_step() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    assert cache.ready_step is None
    await publish(cache, 0)
    assert cache.ready_step == 0
    async with cache.read() as snap:
        assert snap.step == 0
        assert len(snap.buckets) == 3  # 6 tensors of 4 KiB, 8 KiB budget
        assert cache.stats().pins == {0: 1}
        assert_whole_step(list(snap.named_tensors()), 0)
        for bucket in snap.buckets:
            bucket.verify()
    assert cache.stats().pins == {}


async def test_empty_build_publishes_empty_snapshot() -> None:
    cache = BucketCache()
    async with cache.build(-1):
        pass
    async with cache.read() as snap:
        assert (snap.step, snap.buckets, snap.nbytes) == (-1, (), 0)


async def test_steps_are_monotonic() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, -1)
    await publish(cache, 3)
    for stale in (3, 2, -1):
        with pytest.raises(
            StaleStepError, match=rf"step {stale} is not newer than the ready step 3"
        ):
            async with cache.build(stale):
                pass
    for bad in (-2, 1.5, "4", True):
        with pytest.raises(InvalidStepError):
            async with cache.build(bad):  # type: ignore[arg-type]
                pass
    assert cache.ready_step == 3
    await publish(cache, 4)
    assert cache.ready_step == 4


async def test_second_build_is_refused_while_one_is_in_flight() -> None:
    cache = BucketCache()
    async with cache.build(5):
        with pytest.raises(BuildInProgressError, match="build of step 5 holds the build slot"):
            async with cache.build(6):
                pass
        with pytest.raises(StaleStepError, match="build in flight"):
            async with cache.build(4):
                pass
        assert cache.stats().building_step == 5
    assert cache.ready_step == 5


async def test_error_in_build_discards_and_keeps_ready_step() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    with pytest.raises(BucketError, match=r"duplicate tensor name 'layer0\.w'"):
        async with cache.build(1) as build:
            await build.add(weights(1))
            await build.add(weights(1)[:1])
    stats = cache.stats()
    assert (stats.ready_step, stats.building_step, stats.discards) == (0, None, 1)
    await publish(cache, 1)  # the slot is free and step 1 was never published
    async with cache.read() as snap:
        assert_whole_step(list(snap.named_tensors()), 1)


async def test_cancelled_build_is_discarded_and_slot_freed() -> None:
    cache = BucketCache(bucket_bytes=1 << 20)
    await publish(cache, 0)
    started = asyncio.Event()

    def slow_source():  # type: ignore[no-untyped-def]
        started.set()  # iterated in a worker thread; Event.set is only a flag here
        yield from weights(1, n=64, numel=64 * KIB)

    async def build_one() -> None:
        async with cache.build(1) as build:
            await build.add(slow_source())
            await asyncio.sleep(10)

    task = asyncio.create_task(build_one())
    while cache.stats().building_step is None or not started.is_set():
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stats = cache.stats()
    assert (stats.ready_step, stats.building_step, stats.discards) == (0, None, 1)
    await publish(cache, 2)
    assert cache.ready_step == 2


async def test_concurrent_add_on_one_build_is_refused() -> None:
    cache = BucketCache(bucket_bytes=1 << 20)
    async with cache.build(0) as build:
        first = asyncio.create_task(build.add(weights(0, n=32, numel=64 * KIB)))
        await asyncio.sleep(0)
        with pytest.raises(CacheError, match="already running"):
            await build.add(weights(0))
        await first
    assert cache.ready_step == 0


async def test_read_waits_for_min_step_and_gets_newest() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    reader = asyncio.create_task(_read_step(cache, min_step=2, timeout=10))
    await asyncio.sleep(0.01)
    assert not reader.done()
    await publish(cache, 1)
    await asyncio.sleep(0.01)
    assert not reader.done()
    await publish(cache, 3)
    assert await reader == 3  # asked for >= 2, newest ready is 3
    # "latest >= v" with an older v returns the newest, never the older one.
    assert await _read_step(cache, min_step=0, timeout=0) == 3


async def _read_step(cache: BucketCache, min_step: int | None, timeout: float | None) -> int:
    async with cache.read(min_step=min_step, timeout=timeout) as snap:
        assert_whole_step(list(snap.named_tensors()), snap.step)
        return snap.step


async def test_read_timeout_is_typed_and_leaves_no_pin() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    with pytest.raises(ReadTimeoutError, match=r"step >= 7 within 0.05s \(ready step: 0\)"):
        async with cache.read(min_step=7, timeout=0.05):
            pass
    assert isinstance(ReadTimeoutError("x"), TimeoutError)
    assert cache.stats().pins == {}
    with pytest.raises(InvalidStepError):
        async with cache.read(min_step=-5):
            pass


async def test_pinned_snapshot_survives_later_publishes_then_returns_to_pool() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    model = 6 * 4 * KIB
    await publish(cache, 0)
    async with cache.read() as snap0:
        for step in (1, 2, 3):
            await publish(cache, step)
        # Snapshot 0 is pinned: still whole, still step 0, even though 3 is ready.
        assert_whole_step(list(snap0.named_tensors()), 0)
        assert cache.stats().pins == {0: 1}
        assert cache.stats().snapshots_held == 2
    stats = cache.stats()
    assert stats.pins == {}
    assert stats.snapshots_held == 1
    # Ready snapshot plus one snapshot's worth of pooled buffers; the rest was freed.
    assert stats.pooled_bytes == model
    assert stats.resident_bytes == 2 * model


async def test_steady_state_reuses_pool_without_new_memory() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    model = 6 * 4 * KIB
    await publish(cache, 0)
    await publish(cache, 1)
    pooled = {id(s.array) for s in cache._pool}
    assert len(pooled) == 3
    for step in range(2, 8):
        await publish(cache, step)
        assert cache.stats().resident_bytes == 2 * model
        async with cache.read() as snap:
            assert_whole_step(list(snap.named_tensors()), step)
    # Steady-state builds ran on the same few buffers (no fresh allocations).
    live = {id(s.array) for s in cache._pool} | {id(s.array) for s in cache._ready.slots}  # type: ignore[union-attr]
    assert pooled <= live


async def test_resident_limit_smaller_than_model_fails_at_once_with_clear_error() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB, max_resident_bytes=12 * KIB)
    with pytest.raises(
        ResidentLimitError, match=r"step 0 needs 8192 more bytes: max_resident_bytes=12288"
    ):
        await publish(cache, 0)
    assert cache.ready_step is None
    assert cache.stats().resident_bytes == 0  # the discarded build gave everything back


async def test_resident_limit_waits_for_pins_to_drain() -> None:
    model = 6 * 4 * KIB
    cache = BucketCache(bucket_bytes=8 * KIB, max_resident_bytes=2 * model)
    await publish(cache, 0)
    await publish(cache, 1)
    pin_released = asyncio.Event()

    async def hold_pin() -> None:
        async with cache.read() as snap:
            assert snap.step == 1
            await publish(cache, 2)  # uses the pool: 0's buffers; 1 is now held by the pin
            await pin_released.wait()

    holder = asyncio.create_task(hold_pin())
    while cache.ready_step != 2:
        await asyncio.sleep(0.001)
    # Ready 2 + pinned 1 fill the bound: build 3 must wait for the pin to go.
    builder = asyncio.create_task(publish(cache, 3))
    await asyncio.sleep(0.05)
    assert not builder.done()
    assert cache.stats().building_step == 3
    pin_released.set()
    await holder
    await builder
    assert cache.ready_step == 3
    assert cache.stats().resident_bytes <= 2 * model

    # And a pin that never drains turns into a clear error after the timeout.
    async with cache.read():
        await publish(cache, 4)
        with pytest.raises(
            ResidentLimitError, match=r"after waiting 0.1s for pinned snapshots \[3\]"
        ):
            async with cache.build(5, timeout=0.1) as build:
                await build.add(weights(5))
    assert cache.ready_step == 4


async def test_lock_is_never_held_across_a_copy() -> None:
    cache = BucketCache(bucket_bytes=4 << 20)
    seen_locked = 0
    polls = 0
    stop = False

    async def probe() -> None:
        nonlocal seen_locked, polls, stop
        while not stop:
            polls += 1
            seen_locked += cache._lock is not None and cache._lock.locked()
            await asyncio.sleep(0)

    task = asyncio.create_task(probe())
    big = [(f"w{i}", torch.randn(1 << 20)) for i in range(16)]  # 64 MiB
    for step in range(3):
        async with cache.build(step) as build:
            await build.add(big)
        async with cache.read() as snap:
            assert snap.nbytes == 64 << 20
    stop = True
    await task
    assert polls > 10  # the loop kept running other tasks during the builds
    assert seen_locked == 0
    assert 0 < cache.stats().max_lock_hold_s


async def test_close_wakes_waiters_and_refuses_new_work() -> None:
    cache = BucketCache()
    waiter = asyncio.create_task(_read_step(cache, min_step=0, timeout=None))
    await asyncio.sleep(0.01)
    await cache.close()
    with pytest.raises(ClosedError):
        await waiter
    with pytest.raises(ClosedError):
        async with cache.build(0):
            pass


async def test_calls_from_another_loop_or_thread_are_refused() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    errors: list[BaseException] = []

    def other_thread() -> None:
        async def use() -> None:
            async with cache.read():
                pass

        for call in (lambda: asyncio.run(use()), cache.stats, lambda: cache.ready_step):
            try:
                call()
            except BaseException as exc:
                errors.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(errors) == 3
    assert all(isinstance(e, WrongLoopError) and isinstance(e, RuntimeError) for e in errors)
    assert "concurrency group" in str(errors[0])
    # The refused calls changed nothing.
    assert cache.stats().pins == {}
    assert cache.stats().reads == 0


def test_use_without_a_running_loop_is_refused() -> None:
    cache = BucketCache()
    with pytest.raises(WrongLoopError, match=r"no.*running"):
        cache._check_loop()


async def test_repr_summarises_state() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    async with cache.read():
        assert repr(cache) == "<BucketCache ready=0 building=None pinned={0: 1} resident=0.00 GiB>"


# --------------------------------------------------------------------- shared-memory buffers


def tokens(snap: Snapshot) -> set[str]:
    return {b.region.token for b in snap.buckets if b.region is not None}


async def settle(cache: BucketCache) -> None:
    """Wait for the pool's pre-fault task and for buffers being freed in worker threads."""
    while cache._background:
        await asyncio.gather(*cache._background)


async def test_every_bucket_names_its_shared_memory_and_maps_back_equal() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    async with cache.read() as snap:
        assert len(snap.buckets) == 3
        for bucket in snap.buckets:
            region = bucket.region
            assert region is not None
            assert (region.pid, region.offset, region.nbytes) == (os.getpid(), 0, bucket.nbytes)
            mapped = await asyncio.to_thread(map_region, region)
            assert not mapped.flags.writeable
            assert checksum(mapped) == bucket.checksum
        assert len(tokens(snap)) == 3  # one buffer per bucket
    await cache.close()


async def test_buffers_the_pool_cannot_keep_are_unmapped_and_their_fds_closed() -> None:
    model = 6 * 4 * KIB
    cache = BucketCache(bucket_bytes=8 * KIB, prefault_pool=False)
    before = set(open_buffers())
    await publish(cache, 0)
    async with cache.read() as snap0:
        for step in (1, 2, 3):  # 0 is pinned: its buffers cannot be reused
            await publish(cache, step)
        old = tokens(snap0)
        # Ready 3, pool (2's buffers), pinned 0.
        assert len(set(open_buffers()) - before) == 9
        assert cache.stats().resident_bytes == 3 * model
    del snap0
    # Unpinned while the pool already holds a snapshot's worth: 0's buffers are dropped.
    assert cache.stats().resident_bytes == 2 * model
    await settle(cache)
    assert not old & set(open_buffers())
    assert not old & mapped_buffers()
    await cache.close()
    assert not set(open_buffers()) - before
    assert cache.stats().resident_bytes == 0


async def test_close_frees_pool_and_ready_snapshot_but_not_a_pinned_one() -> None:
    model = 6 * 4 * KIB
    cache = BucketCache(bucket_bytes=8 * KIB)
    before = set(open_buffers())
    await publish(cache, 0)
    async with cache.read() as snap0:
        await publish(cache, 1)
        await settle(cache)
        held = tokens(snap0)
        assert len(set(open_buffers()) - before) == 9  # pinned 0, ready 1, pre-faulted pool
        await cache.close()
        # Closed: the pool and the unpinned ready snapshot are freed; pinned 0 stays whole.
        assert set(open_buffers()) - before == held
        assert_whole_step(list(snap0.named_tensors()), 0)
        assert cache.stats().resident_bytes == model
    await settle(cache)
    assert not set(open_buffers()) - before
    assert cache.stats().resident_bytes == 0
    assert cache.ready_step == 1  # still reported after close


async def test_pool_is_prefaulted_after_a_publish_and_the_next_build_uses_it() -> None:
    model = 6 * 4 * KIB
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    await settle(cache)
    stats = cache.stats()
    assert (stats.pooled_bytes, stats.resident_bytes) == (model, 2 * model)
    pooled = {s.buffer.token for s in cache._pool if s.buffer is not None}
    assert len(pooled) == 3
    await publish(cache, 1)
    async with cache.read() as snap:
        assert tokens(snap) == pooled  # built into the pre-faulted buffers
    await cache.close()

    off = BucketCache(bucket_bytes=8 * KIB, prefault_pool=False)
    await publish(off, 0)
    await settle(off)
    assert off.stats().pooled_bytes == 0
    await off.close()


async def test_pool_top_up_stays_under_max_resident_bytes() -> None:
    model = 6 * 4 * KIB
    cache = BucketCache(bucket_bytes=8 * KIB, max_resident_bytes=2 * model)
    await publish(cache, 0)
    await settle(cache)
    assert (cache.stats().pooled_bytes, cache.stats().resident_bytes) == (model, 2 * model)
    await publish(cache, 1)
    async with cache.read():
        await publish(cache, 2)  # 1 is pinned: ready 2 + pinned 1 fill the bound
        await settle(cache)
        stats = cache.stats()
        assert (stats.pooled_bytes, stats.resident_bytes) == (0, 2 * model)
    # Unpinned: 1's buffers become the pool, within the bound.
    assert (cache.stats().pooled_bytes, cache.stats().resident_bytes) == (model, 2 * model)
    await cache.close()


class GatedPrefault:
    """Holds every pre-faulted allocation after the first ``free`` until the gate opens."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, free: int) -> None:
        self.gate = threading.Event()
        self.free = free
        self.started = 0
        real = SharedBuffer.allocate.__func__  # type: ignore[attr-defined]

        def allocate(cls: type[SharedBuffer], nbytes: int, **kw: bool) -> SharedBuffer:
            if kw.get("prefault"):
                self.started += 1
                if self.started > self.free:
                    self.gate.wait(10)
            return real(cls, nbytes, **kw)  # type: ignore[no-any-return]

        monkeypatch.setattr(SharedBuffer, "allocate", classmethod(allocate))


async def test_a_build_waits_only_for_the_prefault_of_the_buffer_it_takes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)  # three buckets
    # Gated before the pool's top-up task first runs: it pre-faults one buffer, then stalls.
    gated = GatedPrefault(monkeypatch, free=1)
    async with asyncio.timeout(10):
        while gated.started < 2:
            await asyncio.sleep(0.001)
    ready = {s.buffer.token for s in cache._pool if s.buffer is not None}
    assert len(ready) == 1
    # A one-bucket build takes the buffer that is ready and never waits for the rest.
    async with asyncio.timeout(10):
        await publish(cache, 1, n=2)
    async with cache.read() as snap:
        assert tokens(snap) == ready
    # A build that needs the buffer being pre-faulted waits for that one, then uses it.
    builder = asyncio.create_task(publish(cache, 2))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not builder.done()
    gated.gate.set()
    async with asyncio.timeout(10):
        await builder
    assert cache.ready_step == 2
    await cache.close()


# --------------------------------------------------------------------- torn snapshots


def one_bucket(value: float) -> torch.Tensor:
    """Exactly one 8 KiB bucket: the build copies it before it pulls the next tensor."""
    return torch.full((2 * KIB,), value)


async def test_in_place_write_to_a_copied_tensor_makes_the_build_torn() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    first, second = one_bucket(1.0), one_bucket(2.0)
    await publish(cache, 0)
    await settle(cache)
    resident = cache.stats().resident_bytes

    def source() -> Iterator[tuple[str, torch.Tensor]]:
        yield "first", first
        first.add_(1)  # the optimizer steps after "first" was copied
        yield "second", second

    with pytest.raises(TornSnapshotError, match=r"step 1 is torn: tensor 'first'.*0 -> 1"):
        async with cache.build(1) as build:
            await build.add(source())
            assert build.num_buckets == 2  # everything was copied; publishing is refused
    stats = cache.stats()
    assert (stats.ready_step, stats.building_step, stats.discards) == (0, None, 1)
    assert stats.resident_bytes == resident  # the torn build's buffers went back to the pool
    await publish(cache, 1)
    await cache.close()


async def test_a_thread_stepping_the_model_mid_build_is_caught_through_state_dict() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 32))
    cache = BucketCache(bucket_bytes=8 * KIB)  # each weight is one bucket
    copied, stepped = threading.Event(), threading.Event()

    def optimizer_step() -> None:
        copied.wait(10)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)  # in place on the parameter: state_dict's tensors share the counter
        stepped.set()

    def source() -> Iterator[tuple[str, torch.Tensor]]:
        items = list(model.state_dict().items())
        yield items[0]
        copied.set()
        stepped.wait(10)
        yield from items[1:]

    trainer = threading.Thread(target=optimizer_step)
    trainer.start()
    try:
        with pytest.raises(TornSnapshotError, match=r"tensor '0\.weight'"):
            async with cache.build(0) as build:
                await build.add(source())
    finally:
        trainer.join()
    assert cache.ready_step is None
    # Quiet weights publish.
    async with cache.build(0) as build:
        await build.add(model.state_dict().items())
    assert cache.ready_step == 0
    await cache.close()


async def test_writes_through_data_are_caught_only_by_the_guard() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    param = torch.nn.Parameter(one_bucket(1.0))
    steps = [0]

    def source() -> Iterator[tuple[str, torch.Tensor]]:
        yield "param", param
        param.data.add_(1)  # an optimizer that writes through .data
        steps[0] += 1
        yield "other", one_bucket(2.0)

    # The version counter cannot see it: without a guard the torn build publishes.
    async with cache.build(0) as build:
        await build.add(source())
    assert cache.ready_step == 0
    with pytest.raises(TornSnapshotError, match=r"step 1 is torn: its guard changed from 1 to 2"):
        async with cache.build(1, guard=lambda: steps[0]) as build:
            await build.add(source())
    assert cache.ready_step == 0
    async with cache.build(1, guard=lambda: steps[0]) as build:
        await build.add([("param", param)])
    assert cache.ready_step == 1
    await cache.close()


async def test_inference_tensors_have_no_counter_and_still_build() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    with torch.inference_mode():
        frozen = one_bucket(3.0)
    async with cache.build(0) as build:
        await build.add([("frozen", frozen)])
    assert cache.ready_step == 0
    await cache.close()


# --------------------------------------------------------------------- closing


async def test_close_wakes_a_build_waiting_for_memory_and_it_never_publishes() -> None:
    model = 6 * 4 * KIB
    cache = BucketCache(bucket_bytes=8 * KIB, max_resident_bytes=2 * model, prefault_pool=False)
    await publish(cache, 0)
    await publish(cache, 1)
    async with cache.read():
        await publish(cache, 2)  # 1 is pinned; ready 2 + pinned 1 fill the bound
        builder = asyncio.create_task(publish(cache, 3))
        async with asyncio.timeout(10):
            while cache.stats().building_step != 3:
                await asyncio.sleep(0.001)
        for _ in range(5):
            await asyncio.sleep(0)
        assert not builder.done()
        await cache.close()
        with pytest.raises(ClosedError, match="closed while the build of step 3"):
            await builder
    stats = cache.stats()
    assert (stats.ready_step, stats.building_step, stats.publishes) == (2, None, 3)


async def test_a_build_in_flight_at_close_cannot_publish() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    with pytest.raises(ClosedError, match="closed while step 1 was being built"):
        async with cache.build(1) as build:
            await build.add(weights(1))
            await cache.close()
    assert cache.ready_step == 0
    assert cache.stats().discards == 1
    # An add() after close is refused too, and so is every later call.
    with pytest.raises(ClosedError):
        async with cache.build(2):
            pass
    with pytest.raises(ClosedError):
        async with cache.read():
            pass
    await cache.close()  # idempotent


async def test_add_after_close_is_refused_and_the_build_discarded() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    with pytest.raises(ClosedError, match="cannot add to the build of step 0"):
        async with cache.build(0) as build:
            await cache.close()
            await build.add(weights(0))
    assert cache.ready_step is None
    assert cache.stats().resident_bytes == 0


async def test_close_wakes_reads_waiting_for_a_step_and_for_the_first_build() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    with pytest.raises(ClosedError, match="closed while step 0 was being built"):
        async with cache.build(0):
            first = asyncio.create_task(_read_step(cache, min_step=None, timeout=None))
            later = asyncio.create_task(_read_step(cache, min_step=5, timeout=None))
            for _ in range(5):
                await asyncio.sleep(0)
            assert not first.done() and not later.done()
            await cache.close()
            for reader in (first, later):
                with pytest.raises(ClosedError):
                    await reader
    assert "closed" in repr(cache)


# --------------------------------------------------------------------- reading before any build


async def test_read_of_newest_before_any_build_fails_at_once() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    with pytest.raises(NothingBuiltError, match=r"build \(and publish\) a step first"):
        async with cache.read():
            pass
    with pytest.raises(NothingBuiltError):
        async with cache.read(timeout=None):
            pass
    assert isinstance(NothingBuiltError("x"), CacheError)
    # read(min_step=...) still waits for that step, as before.
    with pytest.raises(ReadTimeoutError):
        async with cache.read(min_step=0, timeout=0.01):
            pass


async def test_read_of_newest_waits_for_a_first_build_in_flight() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    go = asyncio.Event()

    async def first_build() -> None:
        async with cache.build(0) as build:
            await go.wait()
            await build.add(weights(0))

    builder = asyncio.create_task(first_build())
    await asyncio.sleep(0)
    reader = asyncio.create_task(_read_step(cache, min_step=None, timeout=10))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not reader.done()
    go.set()
    await builder
    assert await reader == 0


async def test_read_of_newest_fails_when_the_first_build_is_discarded() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    go = asyncio.Event()

    async def failing_build() -> None:
        async with cache.build(0):
            await go.wait()
            raise RuntimeError("source failed")

    builder = asyncio.create_task(failing_build())
    await asyncio.sleep(0)
    reader = asyncio.create_task(_read_step(cache, min_step=None, timeout=10))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not reader.done()
    go.set()
    with pytest.raises(RuntimeError):
        await builder
    with pytest.raises(NothingBuiltError):
        await reader


# ----------------------------------------------------------------- tensors the format cannot hold


@pytest.mark.parametrize("dtype", [torch.uint4, torch.int2, torch.quint8], ids=str)
async def test_unpackable_dtype_is_refused_and_the_cache_is_unchanged(dtype: torch.dtype) -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    await settle(cache)
    before = cache.stats()
    bad = torch.zeros(64, dtype=torch.uint8).view(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(BucketError, match=rf"'bad' .*{name}"):
        async with cache.build(1) as build:
            await build.add([("bad", bad), *weights(1)])
    after = cache.stats()
    assert (after.ready_step, after.resident_bytes, after.pooled_bytes) == (
        0,
        before.resident_bytes,
        before.pooled_bytes,
    )
    await cache.close()


async def test_a_bucket_of_empty_tensors_takes_no_pooled_buffer() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    await settle(cache)
    pooled = cache.stats().pooled_bytes
    assert pooled > 0
    async with cache.build(1) as build:
        await build.add([("empty", torch.empty(0, 4)), ("none", torch.empty(0))])
        assert cache.stats().pooled_bytes == pooled
        await build.add(weights(1))
    async with cache.read() as snap:
        empty = snap.buckets[0]
        assert (empty.nbytes, [m.name for m in empty.index]) == (0, ["empty", "none"])
        assert empty.region is not None
        assert (await asyncio.to_thread(map_region, empty.region)).nbytes == 0
        assert [t.shape for _, t in list(snap.named_tensors())[:2]] == [(0, 4), (0,)]
    for step in range(2, 5):  # empty buckets are not pooled either: nothing piles up
        async with cache.build(step) as build:
            await build.add([("empty", torch.empty(0))])
            await build.add(weights(step))
    await settle(cache)
    assert all(s.capacity for s in cache._pool)
    await cache.close()


async def test_cache_buckets_pass_through_the_object_store_zero_copy(ray_local: object) -> None:
    import ray

    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    async with cache.read() as snap:
        refs = [ray.put(b) for b in snap.buckets]
        got = await asyncio.gather(*refs)
        for want, have in zip(snap.buckets, got, strict=True):
            assert not have.buffer.flags.owndata  # mapped from the object store, not copied
            assert have.region == want.region
            have.verify(want.manifest)
    await cache.close()


async def test_a_read_cancelled_as_it_wakes_is_cancelled_not_left_waiting() -> None:
    """A waiting read cancelled just as a publish wakes it must end cancelled. With
    ``asyncio.wait_for`` (Python 3.11) the cancellation was lost when it landed after
    the wake-up and before the reader ran again: the read went on waiting for its
    whole timeout. The cancel lands after each number of loop turns, so one of them
    hits that window."""
    for turns in range(6):
        cache = BucketCache(bucket_bytes=1 << 16)
        waiting = asyncio.Event()

        async def reader(cache: BucketCache, waiting: asyncio.Event) -> None:
            waiting.set()
            async with cache.read(min_step=5, timeout=30):
                pass

        task = asyncio.ensure_future(reader(cache, waiting))
        await waiting.wait()
        await asyncio.sleep(0)  # the read is waiting for step 5
        async with cache.build(0) as build:  # publishing wakes every waiter
            await build.add([("w", torch.zeros(4))])
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task}, timeout=2)
        assert task.cancelled(), f"after {turns} turns the cancelled read is still waiting"
        assert cache.stats().pins == {}, turns
        await cache.close()
