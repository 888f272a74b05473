"""The versioned bucket cache: one build slot, atomic publish, pinned reads, a buffer pool.

The whole cache is guarded by one :class:`asyncio.Lock` and lives on one event loop.
The lock is held only for state transitions (claim the build slot, reserve a
buffer, publish, pin, unpin): purely synchronous steps of microseconds. Copies,
allocations, checksums and freeing memory run in worker threads after the lock
is released.

Payload buffers are shared memory (:class:`~asyncsync.sharedmem.SharedBuffer`):
every published bucket carries the :class:`~asyncsync.sharedmem.SharedRegion`
that a reader on the same node maps instead of receiving a copy. After a publish
the pool is topped up to one snapshot's worth of pre-faulted buffers in a worker
thread, so the next build writes into memory that pays no page faults.

"""

# Guarded state (``_lock``):
#     ``_ready``     the newest published snapshot (or ``None``)
#     ``_held``      superseded snapshots that readers still pin, by step
#     ``_building``  the build that owns the build slot (or ``None``)
#     ``_pool``      spare payload buffers for the next build (some still being pre-faulted)
#     ``_resident``  bytes of every buffer the cache holds or has reserved
#     ``_to_free``   buffers dropped under the lock, freed in a worker thread right after it
#     ``_closed``, counters and ``_changed`` (the event waiters sleep on, replaced on
#     every notify)

from __future__ import annotations

import asyncio
import bisect
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._checks import check_optional_number, is_int, is_number
from ._primitives import Signal, wait_set
from .buckets import Bucket, BucketManifest, TensorMeta, TensorStream, fill_and_hash, layout
from .errors import (
    BuildInProgressError,
    CacheError,
    ClosedError,
    ConfigError,
    InvalidStepError,
    NothingBuiltError,
    ReadTimeoutError,
    ResidentLimitError,
    SharedMemoryError,
    StaleStepError,
    TornSnapshotError,
    WrongLoopError,
)
from .sharedmem import SharedBuffer

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
    """One payload buffer owned by a build, a snapshot or the pool.

    ``buffer`` is ``None`` until allocated: by the worker thread of the build
    that fills the slot (which sets it), or by the pool's pre-fault task.
    ``prefaulting``: that task is allocating it now; a build that takes the slot
    waits for it (less time than faulting a fresh buffer itself). ``writer``: the
    worker filling the slot while it runs; a slot whose writer is still running
    when it is let go (its build was cancelled or left) is dirty: freed once the
    writer returns, never pooled. ``dropped``: the cache no longer counts it.
    """

    capacity: int
    buffer: SharedBuffer | None = None
    prefaulting: bool = False
    writer: asyncio.Future[int] | None = None
    dropped: bool = False

    @property
    def array(self) -> np.ndarray | None:
        return self.buffer.array if self.buffer is not None else None

    @property
    def dirty(self) -> bool:
        return self.writer is not None and not self.writer.done()


@dataclass(eq=False)
class _Entry:
    snapshot: Snapshot
    slots: list[_Slot]
    pins: int = 0


@dataclass(eq=False)
class _BuildState:
    step: int
    guard: Callable[[], object] | None = None
    guard_value: object = None
    slots: list[_Slot] = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)
    names: set[str] = field(default_factory=set)
    # Every tensor copied, with its version counter when the build first saw it.
    versions: list[tuple[str, torch.Tensor, int | None]] = field(default_factory=list)
    adding: bool = False
    # add() calls whose coroutine has not started yet, each described by what it was
    # given: one never awaited (a forgotten ``await``) would leave its tensors out of
    # the snapshot, so the build must not publish while any is left.
    pending_adds: dict[int, str] = field(default_factory=dict)
    adds_made: int = 0
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

    def add(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Coroutine[Any, Any, None]:
        """Copy ``(name, tensor)`` pairs into buckets of this build, off the event loop.

        The iterable is consumed in a worker thread (it may gather across ranks or
        convert layouts), one bucket's worth at a time; each call starts a new
        bucket. Each bucket is copied and hashed in one pass
        (:func:`~asyncsync.buckets.fill_and_hash`); accelerator tensors are copied
        to host memory. Every tensor's version counter is recorded when the build
        first sees it, and the build keeps a reference to the tensor until it ends
        (to check the counter again before publishing: a converting source's
        temporaries therefore live until then).

        Raises :class:`~asyncsync.BucketError` naming a bad item (checked before
        any of its bucket is copied), :class:`~asyncsync.ClosedError` if the
        cache is closed, :class:`~asyncsync.ResidentLimitError` if no memory can
        be had under ``max_resident_bytes``, :class:`~asyncsync.SharedMemoryError`
        if a shared buffer cannot be created or page-locked; the build is then
        discarded when the ``async with`` block exits with that error. A build whose
        ``add()`` raised (or was cancelled) is never published: leaving the block
        normally anyway raises :class:`~asyncsync.CacheError` and discards it.

        Call it as ``await build.add(...)``: the call is recorded when it is made,
        and a build left while an ``add()`` it was given was never awaited (or was
        cancelled before it started) is not published either: leaving the block
        raises :class:`~asyncsync.CacheError` naming that add's tensors and
        discards the build, instead of publishing a snapshot without them.
        """
        state = self._state
        state.adds_made += 1
        if not state.done:
            state.pending_adds[state.adds_made] = _describe(named_tensors)
        return self._add(named_tensors, state.adds_made)

    async def _add(self, named_tensors: Iterable[tuple[str, torch.Tensor]], number: int) -> None:
        state = self._state
        cache = self._cache
        cache._check_loop()
        state.pending_adds.pop(number, None)
        if state.done:
            raise CacheError(f"build of step {state.step} has already ended")
        if state.adding:
            raise CacheError(f"add() is already running on the build of step {state.step}")
        state.adding = True
        try:
            if cache._closed:
                raise ClosedError(f"cache is closed; cannot add to the build of step {state.step}")
            stream = TensorStream(named_tensors, cache.bucket_bytes, seen=state.names)
            while True:
                index, total, seen = await asyncio.to_thread(_next_group, stream)
                if not index:
                    break
                slot = await cache._reserve(state, total, self._timeout)
                digest = await cache._fill(state, slot, total, index, [t for _, t, _ in seen])
                assert slot.buffer is not None
                state.buckets.append(
                    Bucket(slot.buffer.array[:total], index, digest, slot.buffer.region(0, total))
                )
                state.versions += seen
        except BaseException as exc:
            state.failed = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            state.adding = False


def _describe(named_tensors: object) -> str:
    """What an add() was given, for a message: the first names where they can be seen
    without consuming anything (a generator's cannot)."""
    names: list[object] = []
    if isinstance(named_tensors, dict):
        names = list(named_tensors)[:4]
    elif isinstance(named_tensors, list | tuple):
        names = [
            item[0] if isinstance(item, tuple) and item else item for item in named_tensors[:4]
        ]
    else:
        return f"a {type(named_tensors).__name__}"
    size = len(named_tensors)
    more = f", ... ({size} in all)" if size > len(names) else ""
    return f"tensors {', '.join(repr(n) for n in names)}{more}" if names else "no tensors"


def _next_group(
    stream: TensorStream,
) -> tuple[tuple[TensorMeta, ...], int, list[tuple[str, torch.Tensor, int | None]]]:
    # Runs in a worker thread: pulls one bucket's worth from the source and records
    # each tensor's version counter right when the build first sees it.
    group = stream.next_group()
    if not group:
        return (), 0, []
    index, total = layout(group)
    return index, total, [(name, t, _version(t)) for name, t in group]


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place write counter; ``None`` where torch keeps none (inference tensors)."""
    if t.is_inference():
        return None
    try:
        return int(t._version)
    except RuntimeError:
        return None


def _fill_slot(
    slot: _Slot,
    total: int,
    index: tuple[TensorMeta, ...],
    tensors: list[torch.Tensor],
    pin_memory: bool,
) -> int:
    # Runs in a worker thread and touches only the slot it was given; the cache
    # looks at the slot's buffer only after this returned (see _Slot.writer).
    if slot.buffer is None:
        # Faulting the pages in first (in the kernel, for writing) is cheaper than
        # taking a fault per page in the middle of the copy.
        slot.buffer = SharedBuffer.allocate(slot.capacity, pin_memory=pin_memory, prefault=True)
    return fill_and_hash(slot.buffer.array[:total], index, tensors)


def _release_buffers(buffers: list[SharedBuffer]) -> None:
    for buffer in buffers:
        buffer.release()


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
            raises at once. Pool top-ups stay under it too.
        resident_wait_s: default time a build waits for memory under
            ``max_resident_bytes`` (``build(timeout=...)`` overrides it).
        pin_memory: page-lock the shared buffers with CUDA host registration
            (fast, asynchronous device-to-host copies). ``None``: when CUDA is
            available.
        prefault_pool: after each publish, top the pool up to one snapshot's
            worth of pre-faulted buffers in a worker thread, so the next build
            pays no page faults. This holds the memory of two snapshots from the
            first publish on (the steady state anyway) and a third while a reader
            pins a superseded one.

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
        prefault_pool: bool = True,
    ) -> None:
        if not is_int(bucket_bytes) or bucket_bytes <= 0:
            raise ConfigError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
        if max_resident_bytes is not None and (
            not is_int(max_resident_bytes) or max_resident_bytes <= 0
        ):
            raise ConfigError(
                f"max_resident_bytes must be None or a positive int, got {max_resident_bytes!r}"
            )
        if not is_number(resident_wait_s) or resident_wait_s < 0:
            raise ConfigError(
                f"resident_wait_s must be a finite number >= 0, got {resident_wait_s!r}"
            )
        for name, flag in (("pin_memory", pin_memory), ("prefault_pool", prefault_pool)):
            if flag is not None and not isinstance(flag, bool):
                raise ConfigError(f"{name} must be a bool, got {flag!r}")
        self.bucket_bytes = bucket_bytes
        self.max_resident_bytes = max_resident_bytes
        self.resident_wait_s = resident_wait_s
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefault_pool = prefault_pool
        # Bound on first use (see _check_loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._lock: asyncio.Lock | None = None
        self._changed: Signal | None = None
        # Guarded by _lock.
        self._ready: _Entry | None = None
        self._held: dict[int, _Entry] = {}
        self._building: _BuildState | None = None
        self._pool: list[_Slot] = []
        self._resident = 0
        self._to_free: list[SharedBuffer] = []
        self._closed = False
        self._builds = 0
        self._publishes = 0
        self._discards = 0
        self._reads = 0
        self._max_hold = 0.0
        # Loop-only bookkeeping: the pool's pre-fault task, and tasks that free
        # memory in worker threads (close() waits for all of them).
        self._top_up_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

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
            self._changed = Signal()
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
        """Hold the lock for one synchronous transition and record how long.

        Buffers the transition dropped are freed in a worker thread once the lock
        is released: returning pages to the system takes milliseconds per 100 MiB.
        """
        assert self._lock is not None
        try:
            async with self._lock:
                start = time.perf_counter()
                try:
                    yield
                finally:
                    self._max_hold = max(self._max_hold, time.perf_counter() - start)
        finally:
            if self._to_free:
                buffers, self._to_free = self._to_free, []
                self._spawn(asyncio.to_thread(_release_buffers, buffers))

    def _notify(self) -> None:
        assert self._changed is not None
        self._changed.notify()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

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
        closed = " closed" if self._closed else ""
        return (
            f"<BucketCache ready={ready} building={building} pinned={pins} "
            f"resident={self._resident / 2**30:.2f} GiB{closed}>"
        )

    def _entries(self) -> list[_Entry]:
        return ([self._ready] if self._ready else []) + list(self._held.values())

    # ----------------------------------------------------------------- build

    @asynccontextmanager
    async def build(
        self,
        step: int,
        *,
        timeout: float | None = None,
        guard: Callable[[], object] | None = None,
    ) -> AsyncIterator[BuildHandle]:
        """Claim the single build slot for ``step``; publish on normal exit.

        ``step`` must be newer than the ready step and any build in flight (step
        ``-1`` is the base weights). Raises :class:`~asyncsync.StaleStepError`
        otherwise, :class:`~asyncsync.BuildInProgressError` if another build holds
        the slot, :class:`~asyncsync.InvalidStepError` for a non-int or a step
        below -1, :class:`~asyncsync.ClosedError` once the cache is closed.
        Leaving the block normally publishes the snapshot atomically (an empty
        one if nothing was added); an exception or cancellation discards it and
        leaves the ready step unchanged. ``timeout`` bounds waiting for memory
        under ``max_resident_bytes`` (default ``resident_wait_s``).

        A torn snapshot is never published. Before publishing, the build checks
        that no tensor it copied was written in place since it first saw it (the
        tensor's version counter; ``state_dict()`` tensors share their
        parameter's). Writes through ``.data`` do not move that counter: a trainer
        whose optimizer writes that way passes ``guard``, a cheap callable (for
        example the optimizer's step count) read on the loop when the build starts
        and again before it publishes. A moved counter or a changed guard value
        raises :class:`~asyncsync.TornSnapshotError` naming the step and the first
        changed tensor, and the build is discarded. Leaving the block after
        :meth:`close` raises :class:`~asyncsync.ClosedError` and discards.
        """
        self._check_loop()
        _check_step(step, "build")
        check_optional_number(timeout, "build: timeout", ConfigError, low=0)
        if guard is not None and not callable(guard):
            raise ConfigError(f"build: guard must be a callable or None, got {guard!r:.80}")
        guard_value = guard() if guard is not None else None
        async with self._locked():
            if self._closed:
                raise ClosedError(f"cache is closed; cannot build step {step}")
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
            state = _BuildState(step, guard, guard_value)
            self._building = state
            self._builds += 1
        published = False
        try:
            yield BuildHandle(self, state, timeout)
            if not state.adding and state.failed is None and not state.pending_adds:
                self._check_not_torn(state)
            async with self._locked():
                top_up = self._publish(state)
                published = True
            if top_up:
                self._start_top_up()
        finally:
            if not published:
                async with self._locked():
                    self._discard(state)

    def _check_not_torn(self, state: _BuildState) -> None:
        """Raise TornSnapshotError if the weights changed since the build first saw them."""
        for name, tensor, version in state.versions:
            if version is not None and tensor._version != version:
                raise TornSnapshotError(
                    f"build of step {state.step} is torn: tensor {name!r} was written in place "
                    f"while the build copied the weights (version {version} -> "
                    f"{tensor._version}); nothing was published"
                )
        if state.guard is not None:
            now = state.guard()
            if now != state.guard_value:
                raise TornSnapshotError(
                    f"build of step {state.step} is torn: its guard changed from "
                    f"{state.guard_value!r} to {now!r} while the build copied the weights; "
                    "nothing was published"
                )

    def _publish(self, state: _BuildState) -> bool:
        """Make ``state`` the ready snapshot; return whether the pool wants topping up."""
        if state.adding:
            raise CacheError(f"build of step {state.step} exited while add() was still running")
        if state.failed is not None:
            raise CacheError(
                f"build of step {state.step} cannot be published: an add() of it failed "
                f"({state.failed})"
            )
        if state.pending_adds:
            raise CacheError(
                f"build of step {state.step} cannot be published: {len(state.pending_adds)} "
                f"add() call(s) never ran (not awaited, or cancelled before starting), with "
                f"{'; '.join(state.pending_adds.values())}; write `await build.add(...)`. "
                "Nothing was published"
            )
        if self._closed:
            raise ClosedError(
                f"cache was closed while step {state.step} was being built; it is not published"
            )
        state.done = True
        state.versions = []
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
            self._drop(dropped)
        self._notify()
        return self._plan_top_up(entry)

    def _plan_top_up(self, entry: _Entry) -> bool:
        """Reserve pool slots for the buffers the next build will lack; True if any."""
        if not self.prefault_pool:
            return False
        # Match every buffer of the new snapshot with the smallest pooled one that fits.
        spare = sorted(s.capacity for s in self._pool)
        missing = []
        for size in sorted((s.capacity for s in entry.slots), reverse=True):
            i = bisect.bisect_left(spare, size)
            if i < len(spare):
                del spare[i]
            else:
                missing.append(size)
        limit = sum(s.capacity for s in entry.slots)
        pooled = sum(s.capacity for s in self._pool)
        wanted = False
        for size in missing:
            if pooled + size > limit or size == 0:
                continue
            if (
                self.max_resident_bytes is not None
                and self._resident + size > self.max_resident_bytes
            ):
                continue
            self._pool.append(_Slot(size))
            self._resident += size
            pooled += size
            wanted = True
        return wanted

    def _start_top_up(self) -> None:
        if self._top_up_task is None or self._top_up_task.done():
            self._top_up_task = self._spawn(self._top_up())

    async def _top_up(self) -> None:
        """Allocate and pre-fault the pool's reserved slots, one at a time, off the loop."""
        while True:
            async with self._locked():
                slot = next((s for s in self._pool if s.buffer is None and not s.prefaulting), None)
                if slot is None or self._closed:
                    return
                slot.prefaulting = True
            buffer: SharedBuffer | None = None
            try:
                buffer = await asyncio.to_thread(
                    SharedBuffer.allocate,
                    slot.capacity,
                    pin_memory=self.pin_memory,
                    prefault=True,
                )
            except (SharedMemoryError, MemoryError):
                pass  # the build that needs this slot allocates it itself (and reports why not)
            finally:
                async with self._locked():
                    slot.prefaulting = False
                    if buffer is not None and slot.dropped:
                        self._to_free.append(buffer)
                    elif buffer is not None:
                        slot.buffer = buffer
                    elif slot in self._pool:
                        self._pool.remove(slot)
                        self._drop(slot)
                    self._notify()

    def _discard(self, state: _BuildState) -> None:
        state.done = True
        state.versions = []
        if self._building is state:
            self._building = None
        self._discards += 1
        self._release(state.slots)
        self._notify()

    def _release(self, slots: list[_Slot]) -> None:
        """Return buffers to the pool, keeping at most one ready snapshot's worth; drop the rest.

        A slot a worker may still be writing (dirty) is never pooled.
        """
        limit = sum(s.capacity for s in self._ready.slots) if self._ready else 0
        pooled = sum(s.capacity for s in self._pool)
        for slot in slots:
            usable = (slot.buffer is not None or slot.prefaulting) and not slot.dirty
            if usable and slot.capacity and not self._closed and pooled + slot.capacity <= limit:
                self._pool.append(slot)
                pooled += slot.capacity
            else:
                self._drop(slot)

    def _drop(self, slot: _Slot) -> None:
        """Stop counting ``slot``; its memory is freed off the loop (after its writer, if dirty)."""
        if slot.dropped:
            return
        slot.dropped = True
        self._resident -= slot.capacity
        if slot.writer is not None and not slot.writer.done():
            self._spawn(self._free_after_writer(slot, slot.writer))
        elif slot.buffer is not None:
            self._to_free.append(slot.buffer)
        # A slot being pre-faulted is freed by the top-up task when it is done.

    async def _free_after_writer(self, slot: _Slot, writer: asyncio.Future[int]) -> None:
        await asyncio.wait([writer])
        if slot.buffer is not None:
            await asyncio.to_thread(slot.buffer.release)

    async def _fill(
        self,
        state: _BuildState,
        slot: _Slot,
        total: int,
        index: tuple[TensorMeta, ...],
        tensors: list[torch.Tensor],
    ) -> int:
        """Copy and hash one bucket into ``slot`` in a worker thread; return the checksum."""
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(None, _fill_slot, slot, total, index, tensors, self.pin_memory)
        slot.writer = work
        try:
            # Shielded: a cancelled build stops waiting, but the worker runs on and
            # the slot stays marked with it, so the buffer is not reused under it.
            digest = await asyncio.shield(work)
        except asyncio.CancelledError:
            raise
        except BaseException:
            slot.writer = None
            raise
        slot.writer = None
        if slot.dropped:
            # The build ended (its block was left) while this bucket was being filled.
            raise CacheError(f"build of step {state.step} has already ended")
        return digest

    async def _reserve(self, state: _BuildState, nbytes: int, timeout: float | None) -> _Slot:
        """Give ``state`` a buffer slot of at least ``nbytes``: pooled, or reserved to allocate.

        A pooled slot still being pre-faulted is waited for (a bounded wait, less
        than faulting a fresh buffer); waiting for memory under
        ``max_resident_bytes`` is bounded by ``timeout``.
        """
        wait = self.resident_wait_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        slot: _Slot | None = None
        while True:
            async with self._locked():
                if self._closed:
                    raise ClosedError(
                        f"cache was closed while the build of step {state.step} was running"
                    )
                if state.done:
                    raise CacheError(f"build of step {state.step} has already ended")
                if slot is None:
                    slot = self._take_or_reserve(state, nbytes)
                    if slot is not None:
                        state.slots.append(slot)
                if slot is not None and not slot.prefaulting:
                    return slot
                assert self._changed is not None
                changed = self._changed.waiter()
            if slot is not None:
                await changed.wait()  # the pre-fault of this slot ends soon
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResidentLimitError(self._limit_message(state, nbytes, waited=wait))
            if not await wait_set(changed, remaining):
                raise ResidentLimitError(self._limit_message(state, nbytes, waited=wait))

    def _take_or_reserve(self, state: _BuildState, nbytes: int) -> _Slot | None:
        if nbytes == 0:
            # A bucket of empty tensors: a memory file without pages, never a pooled buffer.
            return _Slot(0)
        # Smallest pooled buffer that fits; of equal ones, one that is ready over one
        # being pre-faulted over one only reserved.
        fits = [s for s in self._pool if s.capacity >= nbytes]
        if fits:
            best = min(
                fits,
                key=lambda s: (
                    s.capacity,
                    0 if s.buffer is not None else 1 if s.prefaulting else 2,
                ),
            )
            self._pool.remove(best)
            return best
        limit = self.max_resident_bytes
        if limit is not None:
            # Pooled buffers of the wrong size are the first to go.
            while self._pool and self._resident + nbytes > limit:
                self._drop(self._pool.pop())
            if self._resident + nbytes > limit:
                if not self._held:
                    # Only the ready snapshot and this build remain; waiting cannot help.
                    raise ResidentLimitError(self._limit_message(state, nbytes, waited=None))
                return None
        self._resident += nbytes
        return _Slot(nbytes)

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

        ``min_step=None`` takes the newest ready snapshot. If none was ever
        published it waits for a first build in flight, and raises
        :class:`~asyncsync.NothingBuiltError` at once when no build is in flight
        (or when the one it waited for was discarded and no other started): build
        first, or pass ``min_step`` to wait for a step. Choosing the snapshot and
        pinning it is one atomic step, so the snapshot yielded is exactly the one
        read. Waits up to ``timeout`` seconds (``None``: no bound) and then raises
        :class:`~asyncsync.ReadTimeoutError`; raises
        :class:`~asyncsync.ClosedError` if the cache is or gets closed.
        The pin is released when the block exits, also on error or cancellation;
        the snapshot's buffers must not be used after that.
        """
        self._check_loop()
        if min_step is not None:
            _check_step(min_step, "read")
        check_optional_number(timeout, "read: timeout", ConfigError, low=0)
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
                    raise ClosedError(f"cache is closed; cannot read step >= {min_step}")
                entry = self._ready
                if entry is not None and (min_step is None or entry.snapshot.step >= min_step):
                    entry.pins += 1
                    self._reads += 1
                    return entry
                if min_step is None and self._building is None:
                    raise NothingBuiltError(
                        "nothing to read: no snapshot was ever published and no build is in "
                        "flight; build (and publish) a step first, or read(min_step=...) to "
                        "wait for one"
                    )
                assert self._changed is not None
                changed = self._changed.waiter()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                ready = self._ready.snapshot.step if self._ready else None
                raise ReadTimeoutError(
                    f"no snapshot with step >= {min_step} within {timeout}s (ready step: {ready})"
                )
            # Timed out or not, look once more under the lock: a publish may have
            # raced the deadline.
            await wait_set(changed, remaining)

    def _unpin(self, entry: _Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0 and (entry is not self._ready or self._closed):
            self._held.pop(entry.snapshot.step, None)
            slots, entry.slots = entry.slots, []
            self._release(slots)
            self._notify()

    # ----------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Close the cache: wake every waiter with ClosedError and free what is unused.

        Builds waiting for memory and reads waiting for a step raise
        :class:`~asyncsync.ClosedError`; a build in flight can no longer
        publish (leaving its block raises the same and discards it); later
        ``build()``, ``add()`` and ``read()`` calls raise it too. Pooled buffers
        and an unpinned ready snapshot are freed before this returns; snapshots
        still pinned stay valid until their readers release them, and are freed
        then. ``ready_step``, ``stats()`` and ``repr()`` keep working. Idempotent.
        """
        self._check_loop()
        async with self._locked():
            if not self._closed:
                self._closed = True
                pool, self._pool = self._pool, []
                for slot in pool:
                    self._drop(slot)
                ready = self._ready
                if ready is not None and not ready.pins:
                    slots, ready.slots = ready.slots, []
                    for slot in slots:
                        self._drop(slot)
                self._notify()
        # Wait for memory being freed or pre-faulted now, also what those tasks spawn.
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _check_step(step: object, what: str) -> None:
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidStepError(f"{what}: step must be an int, got {step!r}")
    if step < -1:
        raise InvalidStepError(f"{what}: step {step} is invalid; steps are >= 0, or -1 for base")
