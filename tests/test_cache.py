"""Unit tests of the BucketCache contract, on the test's own event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from asyncsync import BucketCache
from asyncsync.errors import (
    BucketError,
    BuildInProgressError,
    CacheClosedError,
    CacheError,
    InvalidStepError,
    ReadTimeoutError,
    ResidentLimitError,
    StaleStepError,
    WrongLoopError,
)

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
    with pytest.raises(CacheClosedError):
        await waiter
    with pytest.raises(CacheClosedError):
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
