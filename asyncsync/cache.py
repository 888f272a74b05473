"""The versioned bucket cache: one build slot, atomic publish, pinned reads, a buffer pool.

The whole cache is guarded by one :class:`asyncio.Lock` and lives on one event loop.
The lock is held only for state transitions (claim the build slot, reserve a
buffer, publish, pin, unpin): purely synchronous steps of microseconds. Copies,
allocations and checksums run in worker threads after the lock is released.
"""

# Guarded state (``_lock``):
#     ``_ready``     the newest published snapshot (or ``None``)
#     ``_held``      superseded snapshots that readers still pin, by step
#     ``_building``  the build that owns the build slot (or ``None``)
#     ``_pool``      spare payload buffers by capacity, for the next build
#     ``_resident``  bytes of every buffer the cache holds or has reserved
#     counters and ``_changed`` (the event waiters sleep on, replaced on every notify)

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .buckets import (
    Bucket,
    BucketManifest,
    TensorMeta,
    TensorStream,
    checksum,
    fill_buffer,
    layout,
)
from .errors import (
    BuildInProgressError,
    CacheClosedError,
    CacheError,
    ConfigError,
    InvalidStepError,
    ReadTimeoutError,
    ResidentLimitError,
    StaleStepError,
    WrongLoopError,
)

__all__ = ["BucketCache", "BuildHandle", "CacheStats", "Snapshot"]

DEFAULT_BUCKET_BYTES = 512 << 20

_GROUP_HINT = (
    "In a Ray actor, keep every method that touches the cache in the default "
    "concurrency group: each group runs its own loop and thread."
)


@dataclass(frozen=True, eq=False)
class Snapshot:
    """All buckets of one step; immutable once published.

    Valid while the reader's pin is held (inside ``async with cache.read()``).
    """

    step: int
    buckets: tuple[Bucket, ...]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    @property
    def manifest(self) -> tuple[BucketManifest, ...]:
        return tuple(b.manifest for b in self.buckets)

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Zero-copy views of every tensor of every bucket, in packing order."""
        for bucket in self.buckets:
            yield from bucket.named_tensors()


@dataclass(frozen=True)
class CacheStats:
    """A consistent picture of the cache at one instant (taken on the cache's loop)."""

    ready_step: int | None
    building_step: int | None
    pins: dict[int, int]
    resident_bytes: int
    pooled_bytes: int
    snapshots_held: int
    builds: int
    publishes: int
    discards: int
    reads: int
    max_lock_hold_s: float


@dataclass(eq=False)
class _Slot:
    """One payload buffer owned by a build or a snapshot.

    ``array`` is ``None`` while a new buffer is being allocated in a worker thread.
    ``dirty`` marks a buffer a cancelled worker thread may still be writing: it is
    dropped, never pooled.
    """

    capacity: int
    array: np.ndarray | None
    dirty: bool = False


@dataclass(eq=False)
class _Entry:
    snapshot: Snapshot
    slots: list[_Slot]
    pins: int = 0


@dataclass(eq=False)
class _BuildState:
    step: int
    slots: list[_Slot] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    adding: bool = False
    done: bool = False
    # Why an add() of this build failed: such a build can only be discarded, never
    # published (its snapshot would lack that add's tensors).
    failed: str | None = None


class BuildHandle:
    """Handed out by ``async with cache.build(step) as build``; adds tensors to the build."""

    def __init__(self, cache: BucketCache, state: _BuildState, timeout: float | None) -> None:
        self._cache = cache
        self._state = state
        self._timeout = timeout

    @property
    def step(self) -> int:
        return self._state.step

    @property
    def nbytes(self) -> int:
        """Payload bytes added so far."""
        return sum(b.nbytes for b in self._state.buckets)

    @property
    def num_buckets(self) -> int:
        return len(self._state.buckets)

    async def add(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``(name, tensor)`` pairs into buckets of this build, off the event loop.

        The iterable is consumed in a worker thread (it may gather across ranks or
        convert layouts), one bucket's worth at a time; each call starts a new
        bucket. Accelerator tensors are copied to host memory. Raises
        :class:`~asyncsync.BucketError` naming a bad item; the build is then
        discarded when the ``async with`` block exits with that error. A build
        whose ``add()`` raised (or was cancelled) is never published: leaving the
        block normally anyway raises :class:`~asyncsync.CacheError` and discards it.
        """
        state = self._state
        self._cache._check_loop()
        if state.done:
            raise CacheError(f"build of step {state.step} has already ended")
        if state.adding:
            raise CacheError(f"add() is already running on the build of step {state.step}")
        state.adding = True
        try:
            stream = TensorStream(named_tensors, self._cache.bucket_bytes, seen=state.names)
            while group := await asyncio.to_thread(stream.next_group):
                index, total = layout(group)
                tensors = [t for _, t in group]
                slot = await self._cache._reserve(state, total, self._timeout)
                try:
                    array, digest = await asyncio.to_thread(
                        _fill_slot, slot, total, index, tensors, self._cache.pin_memory
                    )
                except BaseException:
                    # A cancelled worker may still be writing into this buffer.
                    slot.dirty = True
                    raise
                slot.array = array
                state.buckets.append(Bucket(array[:total], index, digest))
        except BaseException as exc:
            state.failed = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            state.adding = False


def _allocate(nbytes: int, pin_memory: bool) -> np.ndarray:
    if pin_memory:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    return np.empty(nbytes, dtype=np.uint8)


def _fill_slot(
    slot: _Slot,
    total: int,
    index: tuple[TensorMeta, ...],
    tensors: list[torch.Tensor],
    pin_memory: bool,
) -> tuple[np.ndarray, int]:
    # Runs in a worker thread: reads only the slot it was given. The checksum runs
    # right after the copy in the same thread: both are memory-bound, so hashing
    # in a second thread measured no faster on 2 cores and took the core the
    # event loop needs.
    array = slot.array if slot.array is not None else _allocate(slot.capacity, pin_memory)
    payload = array[:total]
    fill_buffer(payload, index, tensors)
    return array, checksum(payload)


class BucketCache:
    """A versioned cache of CPU bucket snapshots guarded by one ``asyncio.Lock``.

    Args:
        bucket_bytes: payload budget per bucket. A tensor larger than this gets a
            bucket of its own.
        max_resident_bytes: bound on every byte the cache holds (snapshots, the
            build in flight, pooled buffers). ``None``: unbounded. A build that
            would exceed it first drops pooled buffers, then waits for pinned
            superseded snapshots to be released, then raises
            :class:`~asyncsync.ResidentLimitError`. If nothing could ever be freed
            (the bound is smaller than the ready snapshot plus this build) it
            raises at once.
        resident_wait_s: default time a build waits for memory under
            ``max_resident_bytes`` (``build(timeout=...)`` overrides it).
        pin_memory: allocate page-locked host buffers (fast, asynchronous
            device-to-host copies). ``None``: when CUDA is available.

    The cache binds to the event loop that first uses it; every later call from
    another loop or thread raises :class:`~asyncsync.WrongLoopError`.
    """

    def __init__(
        self,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        max_resident_bytes: int | None = None,
        *,
        resident_wait_s: float = 30.0,
        pin_memory: bool | None = None,
    ) -> None:
        if not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
            raise ConfigError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
        if max_resident_bytes is not None and max_resident_bytes <= 0:
            raise ConfigError(f"max_resident_bytes must be positive, got {max_resident_bytes!r}")
        self.bucket_bytes = bucket_bytes
        self.max_resident_bytes = max_resident_bytes
        self.resident_wait_s = resident_wait_s
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # Bound on first use (see _check_loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._lock: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None
        # Guarded by _lock.
        self._ready: _Entry | None = None
        self._held: dict[int, _Entry] = {}
        self._building: _BuildState | None = None
        self._pool: list[_Slot] = []
        self._resident = 0
        self._closed = False
        self._builds = 0
        self._publishes = 0
        self._discards = 0
        self._reads = 0
        self._max_hold = 0.0

    # ----------------------------------------------------------------- loop binding

    def _check_loop(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise WrongLoopError(
                "BucketCache methods must be awaited on an event loop; none is running "
                "in this thread"
            ) from None
        if self._loop is None:
            self._loop = loop
            self._thread = threading.get_ident()
            self._lock = asyncio.Lock()
            self._changed = asyncio.Event()
        elif loop is not self._loop:
            raise WrongLoopError(
                "BucketCache is bound to another event loop (thread "
                f"{self._thread}); called from thread {threading.get_ident()}. {_GROUP_HINT}"
            )

    def _check_thread(self) -> None:
        if self._thread is not None and threading.get_ident() != self._thread:
            raise WrongLoopError(
                f"BucketCache is bound to the event loop of thread {self._thread}; "
                f"read from thread {threading.get_ident()}. {_GROUP_HINT}"
            )

    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """Hold the lock for one synchronous transition and record how long."""
        assert self._lock is not None
        async with self._lock:
            start = time.perf_counter()
            try:
                yield
            finally:
                self._max_hold = max(self._max_hold, time.perf_counter() - start)

    def _notify(self) -> None:
        assert self._changed is not None
        self._changed.set()
        self._changed = asyncio.Event()

    # ----------------------------------------------------------------- public state

    @property
    def ready_step(self) -> int | None:
        """Step of the newest published snapshot; ``None`` before the first publish."""
        self._check_thread()
        return self._ready.snapshot.step if self._ready else None

    def stats(self) -> CacheStats:
        """A frozen :class:`CacheStats`; callable only from the cache's own thread."""
        self._check_thread()
        pins = {e.snapshot.step: e.pins for e in self._entries() if e.pins}
        return CacheStats(
            ready_step=self._ready.snapshot.step if self._ready else None,
            building_step=self._building.step if self._building else None,
            pins=pins,
            resident_bytes=self._resident,
            pooled_bytes=sum(s.capacity for s in self._pool),
            snapshots_held=len(self._held) + (1 if self._ready else 0),
            builds=self._builds,
            publishes=self._publishes,
            discards=self._discards,
            reads=self._reads,
            max_lock_hold_s=self._max_hold,
        )

    def __repr__(self) -> str:
        ready = self._ready.snapshot.step if self._ready else None
        building = self._building.step if self._building else None
        pins = {e.snapshot.step: e.pins for e in self._entries() if e.pins}
        return (
            f"<BucketCache ready={ready} building={building} pinned={pins} "
            f"resident={self._resident / 2**30:.2f} GiB>"
        )

    def _entries(self) -> list[_Entry]:
        return ([self._ready] if self._ready else []) + list(self._held.values())

    # ----------------------------------------------------------------- build

    @asynccontextmanager
    async def build(self, step: int, *, timeout: float | None = None) -> AsyncIterator[BuildHandle]:
        """Claim the single build slot for ``step``; publish on normal exit.

        ``step`` must be newer than the ready step and any build in flight (step
        ``-1`` is the base weights). Raises :class:`~asyncsync.StaleStepError`
        otherwise, :class:`~asyncsync.BuildInProgressError` if another build holds
        the slot, :class:`~asyncsync.InvalidStepError` for a non-int or a step
        below -1. Leaving the block normally publishes the snapshot atomically
        (an empty one if nothing was added); an exception or cancellation discards
        it and leaves the ready step unchanged. ``timeout`` bounds waiting for
        memory under ``max_resident_bytes`` (default ``resident_wait_s``).
        """
        self._check_loop()
        _check_step(step, "build")
        async with self._locked():
            if self._closed:
                raise CacheClosedError(f"cache is closed; cannot build step {step}")
            ready = self._ready.snapshot.step if self._ready else None
            if self._building is not None:
                if step <= self._building.step:
                    raise StaleStepError(
                        f"step {step} is not newer than the build in flight "
                        f"(step {self._building.step})"
                    )
                raise BuildInProgressError(
                    f"cannot build step {step}: the build of step {self._building.step} "
                    "holds the build slot"
                )
            if ready is not None and step <= ready:
                raise StaleStepError(f"step {step} is not newer than the ready step {ready}")
            state = _BuildState(step)
            self._building = state
            self._builds += 1
        published = False
        try:
            yield BuildHandle(self, state, timeout)
            async with self._locked():
                self._publish(state)
                published = True
        finally:
            if not published:
                async with self._locked():
                    self._discard(state)

    def _publish(self, state: _BuildState) -> None:
        if state.adding:
            raise CacheError(f"build of step {state.step} exited while add() was still running")
        if state.failed is not None:
            raise CacheError(
                f"build of step {state.step} cannot be published: an add() of it failed "
                f"({state.failed})"
            )
        state.done = True
        self._building = None
        entry = _Entry(Snapshot(state.step, tuple(state.buckets)), state.slots)
        old, self._ready = self._ready, entry
        self._publishes += 1
        if old is not None:
            if old.pins:
                self._held[old.snapshot.step] = old
            else:
                self._release(old.slots)
        # A smaller snapshot than before: keep the pool within one snapshot's worth.
        limit = sum(s.capacity for s in entry.slots)
        pooled = sum(s.capacity for s in self._pool)
        while self._pool and pooled > limit:
            dropped = self._pool.pop()
            pooled -= dropped.capacity
            self._resident -= dropped.capacity
        self._notify()

    def _discard(self, state: _BuildState) -> None:
        state.done = True
        if self._building is state:
            self._building = None
        self._discards += 1
        if state.adding:
            # The block was left while an add() still runs: a worker thread may be
            # writing into any of these buffers, so drop them rather than pool them.
            for slot in state.slots:
                slot.dirty = True
        self._release(state.slots)
        self._notify()

    def _release(self, slots: list[_Slot]) -> None:
        """Return buffers to the pool, keeping at most one ready snapshot's worth."""
        limit = sum(s.capacity for s in self._ready.slots) if self._ready else 0
        pooled = sum(s.capacity for s in self._pool)
        for slot in slots:
            if slot.array is not None and not slot.dirty and pooled + slot.capacity <= limit:
                self._pool.append(slot)
                pooled += slot.capacity
            else:
                self._resident -= slot.capacity

    async def _reserve(self, state: _BuildState, nbytes: int, timeout: float | None) -> _Slot:
        """Give ``state`` a buffer slot of at least ``nbytes``: pooled, or reserved to allocate."""
        wait = self.resident_wait_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            async with self._locked():
                if state.done:
                    raise CacheError(f"build of step {state.step} has already ended")
                slot = self._take_or_reserve(state, nbytes)
                if slot is not None:
                    state.slots.append(slot)
                    return slot
                assert self._changed is not None
                changed = self._changed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResidentLimitError(self._limit_message(state, nbytes, waited=wait))
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                raise ResidentLimitError(self._limit_message(state, nbytes, waited=wait)) from None

    def _take_or_reserve(self, state: _BuildState, nbytes: int) -> _Slot | None:
        # Smallest pooled buffer that fits.
        fits = [s for s in self._pool if s.capacity >= nbytes]
        if fits:
            best = min(fits, key=lambda s: s.capacity)
            self._pool.remove(best)
            return best
        limit = self.max_resident_bytes
        if limit is not None:
            # Pooled buffers of the wrong size are the first to go.
            while self._pool and self._resident + nbytes > limit:
                dropped = self._pool.pop()
                self._resident -= dropped.capacity
            if self._resident + nbytes > limit:
                if not self._held:
                    # Only the ready snapshot and this build remain; waiting cannot help.
                    raise ResidentLimitError(self._limit_message(state, nbytes, waited=None))
                return None
        self._resident += nbytes
        return _Slot(nbytes, None)

    def _limit_message(self, state: _BuildState, nbytes: int, waited: float | None) -> str:
        ready = self._ready.snapshot.nbytes if self._ready else 0
        so_far = sum(s.capacity for s in state.slots)
        why = (
            f"after waiting {waited:.1f}s for pinned snapshots {sorted(self._held)} to be released"
            if waited is not None
            else "and nothing else can be freed"
        )
        return (
            f"build of step {state.step} needs {nbytes} more bytes: max_resident_bytes="
            f"{self.max_resident_bytes} is exceeded (ready snapshot {ready} B, this build so "
            f"far {so_far} B, resident {self._resident} B) {why}"
        )

    # ----------------------------------------------------------------- read

    @asynccontextmanager
    async def read(
        self, min_step: int | None = None, timeout: float | None = None
    ) -> AsyncIterator[Snapshot]:
        """Pin the newest ready snapshot whose step is >= ``min_step``.

        ``min_step=None`` takes the newest ready snapshot (waiting for the first
        publish if there is none). Choosing the snapshot and pinning it is one
        atomic step, so the snapshot yielded is exactly the one read. Waits up to
        ``timeout`` seconds (``None``: no bound) and then raises
        :class:`~asyncsync.ReadTimeoutError`; raises
        :class:`~asyncsync.CacheClosedError` if the cache is closed while waiting.
        The pin is released when the block exits, also on error or cancellation;
        the snapshot's buffers must not be used after that.
        """
        self._check_loop()
        if min_step is not None:
            _check_step(min_step, "read")
        entry = await self._pin(min_step, timeout)
        try:
            yield entry.snapshot
        finally:
            async with self._locked():
                self._unpin(entry)

    async def _pin(self, min_step: int | None, timeout: float | None) -> _Entry:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            async with self._locked():
                if self._closed:
                    raise CacheClosedError(f"cache is closed; cannot read step >= {min_step}")
                entry = self._ready
                if entry is not None and (min_step is None or entry.snapshot.step >= min_step):
                    entry.pins += 1
                    self._reads += 1
                    return entry
                assert self._changed is not None
                changed = self._changed
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                ready = self._ready.snapshot.step if self._ready else None
                raise ReadTimeoutError(
                    f"no snapshot with step >= {min_step} within {timeout}s (ready step: {ready})"
                )
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                # Look once more under the lock: a publish may have raced the deadline.
                pass

    def _unpin(self, entry: _Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0 and entry is not self._ready:
            self._held.pop(entry.snapshot.step, None)
            self._release(entry.slots)
            self._notify()

    # ----------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Refuse new builds and reads and wake every waiter with CacheClosedError.

        Snapshots already pinned stay valid until their readers release them.
        """
        self._check_loop()
        async with self._locked():
            self._closed = True
            self._notify()


def _check_step(step: object, what: str) -> None:
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidStepError(f"{what}: step must be an int, got {step!r}")
    if step < -1:
        raise InvalidStepError(f"{what}: step {step} is invalid; steps are >= 0, or -1 for base")
