"""A hypothesis state machine over the BucketCache: its invariants hold after every step.

Rules build (claim, add, add in the background, publish, abort, cancel, publish
while an add still runs, a torn build), read (pin now, pin waiting for a newer step), release
and cancel readers, and let the loop run, interleaving builds and readers as
asyncio tasks on one event loop. The machine owns that loop
(``asyncio.new_event_loop()``, ``run_until_complete`` per rule); the cache binds
to it. After every step it checks:

* the ready step never decreases and is the last published build's step; every
  refused build raised the error the model predicts (stale, in progress, invalid);
* every read is whole and of one step: the names, sizes and values of exactly
  one published build, and a new reader gets the newest ready step;
* no pinned buffer is reused or overwritten: its bytes hash as when it was
  pinned, and no pooled or building buffer shares its memory;
* resident bytes are exactly the buffers the cache holds, and stay within the
  bound: ready + building + pinned + at most one ready snapshot of pool (and
  under ``max_resident_bytes`` when set);
* the lock is free whenever the loop is idle; pins and the build slot match the model.

The default profile runs 300 examples; ``ASYNCSYNC_HYPOTHESIS_PROFILE=long`` runs more.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from asyncsync import BucketCache, BuildHandle, Snapshot
from asyncsync.buckets import aligned, checksum
from asyncsync.errors import (
    BuildInProgressError,
    CacheError,
    InvalidStepError,
    ReadTimeoutError,
    ResidentLimitError,
    StaleStepError,
    TornSnapshotError,
)

pytestmark = pytest.mark.timeout(240)

BUCKET_BYTES = 2048
MAX_NUMEL = 768  # 3 KiB of float32: larger than a bucket, so some tensors get their own
MAX_SLOT = max(BUCKET_BYTES, aligned(MAX_NUMEL * 4))
BUILD_WAIT_S = 0.02  # how long an add waits for memory under max_resident_bytes
# How long a reader waits for a step that is not ready yet: some time out while
# the loop runs, others live until a publish satisfies them.
READ_WAITS_S = (0.002, 5.0)
RULE_BOUND_S = 10.0  # no rule may take longer: a hang fails the example, never blocks

settings.register_profile(
    "cache-machine",
    max_examples=300,
    stateful_step_count=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "cache-machine-long", parent=settings.get_profile("cache-machine"), max_examples=3000
)
PROFILE = (
    "cache-machine-long"
    if os.environ.get("ASYNCSYNC_HYPOTHESIS_PROFILE") == "long"
    else "cache-machine"
)


def value(step: int, position: int) -> float:
    """Every element of tensor ``position`` of ``step`` (exact in float32 here)."""
    return float(step * 1000 + position)


class Abort(Exception):
    """Raised inside a build's ``async with`` to abandon it."""


@dataclass(eq=False)
class Build:
    step: int
    cm: AbstractAsyncContextManager[BuildHandle]
    handle: BuildHandle
    # (name, numel) in packing order, as the model expects the published snapshot.
    tensors: list[tuple[str, int]] = field(default_factory=list)
    background: asyncio.Task[None] | None = None
    pending: list[tuple[str, int]] = field(default_factory=list)


@dataclass(eq=False)
class Reader:
    min_step: int | None
    timeout: float
    release: asyncio.Event
    task: asyncio.Task[None] | None = None
    snapshot: Snapshot | None = None
    digests: list[int] = field(default_factory=list)
    outcome: str = "waiting"


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.cache = BucketCache(bucket_bytes=BUCKET_BYTES)
        self.build: Build | None = None
        self.published: dict[int, list[tuple[str, int]]] = {}
        self.ready: int | None = None
        self.readers: list[Reader] = []
        self.failures: list[str] = []

    # ------------------------------------------------------------------ helpers

    def run(self, coro: Any) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(RULE_BOUND_S):
                return await coro

        return self.loop.run_until_complete(bounded())

    def idle_build(self) -> Build | None:
        """The build in flight, if no add of it runs in the background."""
        return self.build if self.build is not None and self.build.background is None else None

    @staticmethod
    def task_of(reader: Reader) -> asyncio.Task[None]:
        assert reader.task is not None
        return reader.task

    def spin(self, rounds: int = 3) -> None:
        async def go() -> None:
            for _ in range(rounds):
                await asyncio.sleep(0)

        self.run(go())

    def tensors(self, step: int, start: int, sizes: list[int]) -> list[tuple[str, torch.Tensor]]:
        return [
            (f"t{start + i}", torch.full((n,), value(step, start + i), dtype=torch.float32))
            for i, n in enumerate(sizes)
        ]

    def check_snapshot(self, snap: Snapshot) -> None:
        """Whole and of one step: exactly the tensors the model published as that step."""
        assert snap.step in self.published, f"snapshot of step {snap.step} was never published"
        got = [(name, t) for name, t in snap.named_tensors()]
        want = self.published[snap.step]
        assert [(n, int(t.numel())) for n, t in got] == want, (snap.step, got, want)
        for position, (name, t) in enumerate(got):
            assert bool((t == value(snap.step, position)).all()), (
                f"{name} is not of step {snap.step}"
            )
        for bucket in snap.buckets:
            bucket.verify()

    # ------------------------------------------------------------------ setup

    @initialize(limit=st.sampled_from([None, 4 * MAX_SLOT, 10 * MAX_SLOT]))
    def make_cache(self, limit: int | None) -> None:
        self.cache = BucketCache(
            bucket_bytes=BUCKET_BYTES,
            max_resident_bytes=limit,
            resident_wait_s=BUILD_WAIT_S,
            pin_memory=False,
        )

    def teardown(self) -> None:
        async def stop() -> None:
            for reader in self.readers:
                reader.release.set()
                self.task_of(reader).cancel()
            if self.build is not None:
                if self.build.background is not None:
                    self.build.background.cancel()
                    await asyncio.gather(self.build.background, return_exceptions=True)
                try:
                    await self.build.cm.__aexit__(Abort, Abort(), None)
                except (Abort, CacheError):
                    pass
            await asyncio.gather(*(self.task_of(r) for r in self.readers), return_exceptions=True)
            await self.cache.close()

        try:
            self.run(stop())
            # Every pin was released on the way out, even those of cancelled readers.
            pins = self.cache.stats().pins
        finally:
            # Whatever happened above, leave no task and no thread behind.
            left = asyncio.all_tasks(self.loop)
            for task in left:
                task.cancel()
            if left:
                self.loop.run_until_complete(asyncio.wait(left))
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
            self.loop.close()
        assert pins == {}
        assert not self.failures, self.failures

    # ------------------------------------------------------------------ builds

    def top_step(self) -> int:
        steps = [s for s in (self.ready, self.build.step if self.build else None) if s is not None]
        return max(steps, default=-1)

    @rule(delta=st.one_of(st.integers(1, 2), st.integers(-3, 0)))
    def start_build(self, delta: int) -> None:
        """Claim the build slot; steps not newer than the ready or building one are refused."""
        step = self.top_step() + delta
        expected: type[Exception] | None = None
        if step < -1:
            expected = InvalidStepError
        elif self.build is not None:
            expected = StaleStepError if step <= self.build.step else BuildInProgressError
        elif self.ready is not None and step <= self.ready:
            expected = StaleStepError
        cm = self.cache.build(step, timeout=BUILD_WAIT_S)
        try:
            handle = self.run(cm.__aenter__())
        except CacheError as exc:
            assert expected is not None and isinstance(exc, expected), (step, exc, expected)
            return
        assert expected is None, f"build({step}) was accepted; expected {expected}"
        self.build = Build(step, cm, handle)

    @rule(sizes=st.lists(st.integers(0, MAX_NUMEL), min_size=0, max_size=5), skip=st.integers(1, 2))
    def build_and_publish(self, sizes: list[int], skip: int) -> None:
        """A whole build in one go (the common case), so that snapshots succeed each other."""
        if self.build is not None:
            return
        self.start_build(skip)
        self.add(sizes)
        self.publish()

    @rule(sizes=st.lists(st.integers(0, MAX_NUMEL), min_size=0, max_size=5))
    def add(self, sizes: list[int]) -> None:
        build = self.idle_build()
        if build is None:
            return
        items = self.tensors(build.step, len(build.tensors), sizes)
        try:
            self.run(build.handle.add(items))
        except ResidentLimitError:
            assert self.cache.max_resident_bytes is not None
            self.end_build(ResidentLimitError("from add"))
            return
        build.tensors += [(n, int(t.numel())) for n, t in items]

    @rule(sizes=st.lists(st.integers(0, MAX_NUMEL), min_size=1, max_size=6))
    def add_in_background(self, sizes: list[int]) -> None:
        build = self.idle_build()
        if build is None:
            return
        items = self.tensors(build.step, len(build.tensors), sizes)
        build.pending = [(n, int(t.numel())) for n, t in items]
        build.background = self.loop.create_task(build.handle.add(items))
        self.spin(1)

    @rule()
    def finish_background_add(self) -> None:
        build = self.build
        if build is None or build.background is None:
            return
        task, build.background = build.background, None
        try:
            self.run(task)
        except ResidentLimitError:
            assert self.cache.max_resident_bytes is not None
            self.end_build(ResidentLimitError("from add"))
            return
        build.tensors += build.pending

    @rule(rounds=st.integers(0, 5))
    def cancel_background_add(self, rounds: int) -> None:
        build = self.build
        if build is None or build.background is None:
            return
        self.spin(rounds)
        task, build.background = build.background, None
        task.cancel()
        try:
            self.run(task)
        except (asyncio.CancelledError, ResidentLimitError):
            pass
        # The task that ran the build is cancelled (whether or not the add had already
        # returned): it leaves its `async with` by cancellation, so the build is discarded.
        self.end_build(asyncio.CancelledError())

    @rule()
    def publish(self) -> None:
        build = self.idle_build()
        if build is None:
            return
        self.build = None
        # Recorded first: readers woken by the publish check against it at once.
        self.published[build.step] = build.tensors
        self.run(build.cm.__aexit__(None, None, None))
        assert build.step > (self.ready if self.ready is not None else -2)
        self.ready = build.step

    @rule()
    def publish_while_adding(self) -> None:
        """Leaving the block while add() runs is refused, and the build is discarded."""
        build = self.build
        if build is None or build.background is None:
            return
        self.build = None
        # Recorded first, in case the add wins the race (see below) and readers wake.
        self.published[build.step] = build.tensors + build.pending
        try:
            self.run(build.cm.__aexit__(None, None, None))
        except CacheError as exc:
            # Refused: the add still runs, or it had already failed.
            assert "still running" in str(exc) or "an add() of it failed" in str(exc), exc
            del self.published[build.step]
        else:
            # The add's worker thread finished first and the add returned before the
            # publish looked: then publishing it is right, with everything it added.
            assert build.background.done() and build.background.exception() is None
            self.ready = build.step
            return
        try:
            self.run(build.background)
        except CacheError as exc:  # the add noticed the build had ended
            assert "already ended" in str(exc), exc
        except ResidentLimitError:
            pass

    @rule(
        sizes=st.lists(st.integers(1, MAX_NUMEL), min_size=1, max_size=4), victim=st.integers(0, 3)
    )
    def torn_build(self, sizes: list[int], victim: int) -> None:
        """A tensor written in place after the build copied it: the build is refused whole."""
        if self.build is not None:
            return
        self.start_build(1)
        build = self.idle_build()
        assert build is not None
        items = self.tensors(build.step, 0, sizes)
        try:
            self.run(build.handle.add(items))
        except ResidentLimitError:
            assert self.cache.max_resident_bytes is not None
            self.end_build(ResidentLimitError("from add"))
            return
        items[victim % len(items)][1].add_(1)
        self.build = None
        with pytest.raises(TornSnapshotError, match=rf"step {build.step} is torn"):
            self.run(build.cm.__aexit__(None, None, None))

    @rule()
    def abort(self) -> None:
        if self.idle_build() is not None:
            self.end_build(Abort())

    def end_build(self, error: BaseException) -> None:
        """Leave the build's block with ``error``: the build is discarded."""
        build = self.build
        assert build is not None
        self.build = None
        try:
            suppressed = self.run(build.cm.__aexit__(type(error), error, None))
        except BaseException as exc:
            assert exc is error or type(exc) is type(error), exc
        else:
            assert not suppressed

    # ------------------------------------------------------------------ readers

    @rule(ahead=st.one_of(st.none(), st.integers(-2, 2)), timeout=st.sampled_from(READ_WAITS_S))
    def pin(self, ahead: int | None, timeout: float) -> None:
        if ahead is None:
            min_step = None if self.ready is not None else 0
        else:
            min_step = max(-1, (self.ready if self.ready is not None else -1) + ahead)
        reader = Reader(min_step, timeout, asyncio.Event())
        reader.task = self.loop.create_task(self.read(reader))
        self.readers.append(reader)
        self.spin(2)
        if min_step is None or (self.ready is not None and self.ready >= min_step):
            # A snapshot >= min_step is ready: the pin is immediate and gets the newest.
            assert reader.snapshot is not None, "a satisfiable read did not pin at once"
            assert reader.snapshot.step == self.ready

    async def read(self, reader: Reader) -> None:
        try:
            async with self.cache.read(reader.min_step, timeout=reader.timeout) as snap:
                # Choosing and pinning were one step: nothing newer slipped in between.
                if self.cache.ready_step != snap.step:
                    self.failures.append(
                        f"pinned {snap.step} while {self.cache.ready_step} is ready"
                    )
                if reader.min_step is not None and snap.step < reader.min_step:
                    self.failures.append(f"pinned {snap.step} for min_step {reader.min_step}")
                reader.snapshot = snap
                reader.digests = [checksum(b.buffer) for b in snap.buckets]
                reader.outcome = "pinned"
                try:
                    self.check_snapshot(snap)
                except AssertionError as exc:
                    self.failures.append(f"torn read: {exc}")
                await reader.release.wait()
                reader.outcome = "released"
        except ReadTimeoutError:
            ready = self.cache.ready_step
            if reader.min_step is None or (ready is not None and ready >= reader.min_step):
                self.failures.append(f"read timed out for {reader.min_step} with {ready} ready")
            reader.outcome = "timed out"

    @rule(pick=st.integers(0, 63))
    def release(self, pick: int) -> None:
        """Release a reader's pin (a reader still waiting, or timed out, is dropped)."""
        if not self.readers:
            return
        reader = self.readers.pop(pick % len(self.readers))
        if reader.outcome == "pinned":
            assert reader.snapshot is not None
            self.check_snapshot(reader.snapshot)  # still whole, still its step, before unpinning
            reader.release.set()
            self.run(self.task_of(reader))
            assert reader.outcome == "released"
        else:
            self.cancel(reader)

    @rule(pick=st.integers(0, 63))
    def cancel_reader(self, pick: int) -> None:
        """Cancel a reader's task wherever it is: waiting for a step, or holding its pin."""
        if self.readers:
            self.cancel(self.readers.pop(pick % len(self.readers)))

    def cancel(self, reader: Reader) -> None:
        task = self.task_of(reader)
        task.cancel()
        try:
            self.run(task)
        except asyncio.CancelledError:
            pass

    @rule(seconds=st.sampled_from([0.0, 0.003]))
    def let_the_loop_run(self, seconds: float) -> None:
        self.run(asyncio.sleep(seconds))

    # ------------------------------------------------------------------ invariants

    @invariant()
    def ready_step_is_the_last_published(self) -> None:
        assert self.cache.ready_step == self.ready
        assert not self.failures, self.failures

    @invariant()
    def ready_snapshot_reads_whole(self) -> None:
        if self.ready is None:
            return

        async def read() -> None:
            async with self.cache.read(timeout=0) as snap:
                assert snap.step == self.ready
                self.check_snapshot(snap)

        self.run(read())

    @invariant()
    def pins_and_build_slot_match_the_model(self) -> None:
        stats = self.cache.stats()
        want: dict[int, int] = {}
        for r in self.readers:
            if r.outcome == "pinned" and r.snapshot is not None:
                want[r.snapshot.step] = want.get(r.snapshot.step, 0) + 1
        assert stats.pins == want
        assert stats.building_step == (self.build.step if self.build else None)
        lock = self.cache._lock
        assert lock is None or not lock.locked(), "the lock is held while the loop is idle"

    @invariant()
    def pinned_buffers_are_never_reused_or_overwritten(self) -> None:
        cache = self.cache
        others = [s.array for s in cache._pool if s.array is not None]
        if cache._building is not None:
            others += [s.array for s in cache._building.slots if s.array is not None]
        for r in self.readers:
            if r.outcome != "pinned" or r.snapshot is None:
                continue
            assert [checksum(b.buffer) for b in r.snapshot.buckets] == r.digests, (
                f"a pinned buffer of step {r.snapshot.step} was overwritten"
            )
            for b in r.snapshot.buckets:
                for other in others:
                    assert not np.may_share_memory(b.buffer, other), (
                        f"a pinned buffer of step {r.snapshot.step} is pooled or being built into"
                    )

    @invariant()
    def resident_bytes_are_accounted_and_bounded(self) -> None:
        cache = self.cache
        stats = cache.stats()
        ready_slots = cache._ready.slots if cache._ready else []
        held_slots = [s for e in cache._held.values() for s in e.slots]
        building_slots = cache._building.slots if cache._building else []
        # Exact accounting: the counter is the sum of every buffer the cache holds.
        held = ready_slots + held_slots + building_slots + cache._pool
        assert stats.resident_bytes == sum(s.capacity for s in held)
        # At most one ready snapshot's worth of pool.
        assert stats.pooled_bytes <= sum(s.capacity for s in ready_slots)
        # The bound, from what readers and the model can see: buckets of the ready
        # snapshot (twice: itself and the pool), of the build, and of pinned snapshots.
        ready_buckets = 0
        if self.ready is not None:
            ready_buckets = len(cache._ready.snapshot.buckets) if cache._ready else 0
        pinned = {id(r.snapshot): r.snapshot for r in self.readers if r.snapshot is not None}
        pinned_buckets = sum(len(s.buckets) for s in pinned.values() if s.step != self.ready)
        building = 0
        if self.build is not None:
            # Buckets of finished adds, plus at most one buffer per tensor of an add
            # that is still running (its buckets are only counted when it returns).
            running = self.build.pending if self.build.background is not None else []
            building = self.build.handle.num_buckets + len(running) + 1
        assert stats.resident_bytes <= MAX_SLOT * (2 * ready_buckets + building + pinned_buckets)
        if cache.max_resident_bytes is not None:
            assert stats.resident_bytes <= cache.max_resident_bytes
        # Only pinned superseded snapshots are kept.
        assert set(cache._held) <= {s.step for s in pinned.values()}


CacheMachine.TestCase.settings = settings.get_profile(PROFILE)
TestCacheMachine = CacheMachine.TestCase


# ----------------------------------------------------------------- a race the machine cannot time


async def test_buffer_still_being_written_by_an_abandoned_add_is_never_pooled(
    monkeypatch: Any,
) -> None:
    """A build left while its add() runs is discarded; the buffer a worker thread is still
    filling must not go back to the pool, where the next build would write into it too."""
    import threading

    import asyncsync.cache as cache_module

    gate = threading.Event()
    filling: list[np.ndarray] = []
    real_fill = cache_module._fill_slot

    def gated_fill(slot: Any, *args: Any) -> Any:
        if slot.array is not None and not gate.is_set():
            filling.append(slot.array)
            gate.wait(10)  # the worker thread stalls mid-build, holding this buffer
        return real_fill(slot, *args)

    monkeypatch.setattr(cache_module, "_fill_slot", gated_fill)
    cache = BucketCache(bucket_bytes=BUCKET_BYTES, pin_memory=False)
    item = [("t0", torch.full((256,), 1.0))]
    for step in (0, 1):  # two publishes: step 0's buffer is now pooled
        async with cache.build(step) as build:
            gate.set()
            await build.add(item)
            gate.clear()
    build_cm = cache.build(2)
    handle = await build_cm.__aenter__()
    adding = asyncio.create_task(handle.add([("t0", torch.full((256,), 2.0))]))
    async with asyncio.timeout(10):
        while not filling:
            await asyncio.sleep(0.001)
    with pytest.raises(CacheError, match="still running"):
        await build_cm.__aexit__(None, None, None)
    try:
        assert not any(
            np.may_share_memory(s.array, filling[0]) for s in cache._pool if s.array is not None
        ), "the buffer a worker thread is still filling went back to the pool"
    finally:
        gate.set()
        await asyncio.gather(adding, return_exceptions=True)
    async with cache.build(3) as build:
        await build.add([("t0", torch.full((256,), 3.0))])
    async with cache.read(timeout=5) as snap:
        ((_, t),) = list(snap.named_tensors())
        assert snap.step == 3 and bool((t == 3.0).all())
