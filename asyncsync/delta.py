"""Delta sync: a snapshot described against a base the engine already serves.

In RL post-training most served weights do not change a single bit from one step
to the next (bf16 weights derived from fp32 master weights move by less than
their rounding step). A *delta* carries, per bucket, only the 2-byte words that
changed: their word indices and new values (``sparse``), or the whole bucket
when that is smaller (``dense``). Every delta bucket is an ordinary
:class:`~asyncsync.Bucket` (an index, a payload, a checksum), so every transport
carries it unchanged and every byte is checked in transit.

**The base rule.** A delta names its base: the step, the weights identity and
the checksum of every bucket of the snapshot it was computed against. An engine
applies it only if it serves exactly that base: it keeps a private copy of the
buckets it committed (taken from bytes it verified), and ``begin_delta`` refuses
(:class:`~asyncsync.DeltaBaseError`) unless its served version, identity and
every kept bucket's checksum match. The session then sends that engine the full
snapshot in the same session. The patched buckets are hashed and must equal the
target snapshot's checksums *before anything touches the model*: the result is
the target, bit for bit, by check, not by assumption.

**Trainer side** (:class:`DeltaStore`): after each publish, a background task
pins the newest snapshot and, in worker threads, compares it with the store's
private copy of the previous one (the base) in cache-sized chunks: each chunk's
changed words are gathered and the base updated to the new bytes in the same
pass; the delta goes into shared memory. The build never waits for it; a
session that wants the delta of the step it pinned waits for that one
computation (never for a build). A delta larger than :data:`MAX_RATIO` of its
snapshot is dropped as soon as it is (its step goes in full).

**Engine side**: the patch and its check run over worker threads, bucket by
bucket; :meth:`~asyncsync.StagingReceiver.apply_changes` then gets the patched
buckets and, per bucket, which words changed (a
:class:`~asyncsync.engines.TensorEngine` writes only those where that beats a
copy).

Memory: the store keeps one private copy of the newest processed snapshot (1x the
model) and the two newest deltas (each at most :data:`MAX_RATIO` of the model plus
one bucket, typically a few percent), plus any older delta a session still
streams. An engine keeps one private copy of the buckets it serves (1x the
model); set :attr:`~asyncsync.StagingReceiver.keeps_delta_base` to ``False`` to
save it (the engine then refuses deltas and always gets full snapshots).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ._primitives import Signal, uninterrupted
from .buckets import Bucket, BucketManifest, TensorMeta, aligned, checksum
from .errors import ChecksumMismatchError, ClosedError, ConfigError, ProtocolError
from .protocol import DeltaHeader, weights_identity

if TYPE_CHECKING:
    from .cache import BucketCache, Snapshot
    from .sharedmem import SharedBuffer

__all__ = [
    "DeltaSnapshot",
    "DeltaStats",
    "DeltaStore",
    "PrivateBuffer",
    "apply_delta_bucket",
    "changed_mask",
    "changed_words",
    "check_header",
    "delta_threads",
    "run_split",
    "encode_bucket",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SPARSE, BITMAP, DENSE = "sparse", "bitmap", "dense"
KEEP_DELTAS = 2
"""Deltas a store keeps (the newest ones): a session that pinned step N finds N's
delta while N+1's is computed."""
MAX_RATIO = 0.5
"""A delta larger than this share of its snapshot's bytes is dropped as soon as it is
(sessions send that step in full): it would save little and hold much."""
WORD = 2
"""Bytes per compared word: the element size of bf16 and fp16, half of fp32's."""

_INDEX, _BITS, _VALUES, _DENSE = "delta.index", "delta.bits", "delta.values", "delta.dense"


def check_header(header: DeltaHeader, target: Sequence[BucketManifest]) -> None:
    """Raise :class:`~asyncsync.ProtocolError` unless ``header`` fits ``target``."""
    n = len(target)
    lengths = (len(header.base_checksums), len(header.payload), len(header.kinds))
    if lengths != (n, n, n):
        raise ProtocolError(
            f"delta header: {lengths[0]} base checksums, {lengths[1]} payload buckets and "
            f"{lengths[2]} kinds for a target of {n} buckets"
        )
    for i, (kind, payload, want) in enumerate(
        zip(header.kinds, header.payload, target, strict=True)
    ):
        if kind == DENSE:
            if payload.nbytes != want.nbytes:
                raise ProtocolError(
                    f"delta header: dense bucket {i} carries {payload.nbytes} bytes for a "
                    f"target of {want.nbytes}"
                )
        elif kind == SPARSE:
            if payload.names != (_INDEX, _VALUES) or want.nbytes % WORD:
                raise ProtocolError(f"delta header: sparse bucket {i} holds {payload.names}")
        elif kind == BITMAP:
            bits = (want.nbytes // WORD + 7) // 8
            if (
                payload.names != (_BITS, _VALUES)
                or want.nbytes % WORD
                or payload.index[0].nbytes != bits
            ):
                raise ProtocolError(
                    f"delta header: bitmap bucket {i} holds {payload.names} "
                    f"({payload.index[0].nbytes} bitmap bytes, {bits} expected)"
                )
        else:
            raise ProtocolError(f"delta header: bucket {i} has unknown kind {kind!r}")


# ------------------------------------------------------------------ encoding


def changed_mask(base: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Per 2-byte word of ``new``, whether it differs from ``base`` (flat uint8 arrays
    of one even length). Blocking."""
    return np.not_equal(base.view(np.uint16), new.view(np.uint16))


def changed_words(base: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Indices (int64, ascending) of the 2-byte words of ``new`` that differ from ``base``."""
    return np.flatnonzero(changed_mask(base, new))


CHUNK_WORDS = 1 << 18
"""Words compared at a time (512 KiB of each side): the chunk's base, new bytes and mask
stay in the core's cache while its changed words are gathered and the base updated."""
MAX_THREADS = 4
"""Most threads one bucket's encoding or one delta's patching is split over."""

_pool: ThreadPoolExecutor | None = None
_pool_guard = threading.Lock()


def delta_threads() -> int:
    """Threads of the encoding and the patching: this process's cores, at most 4 (both
    are bound by memory bandwidth, which a few cores saturate)."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def run_split(jobs: Sequence[Callable[[], _T]], threads: int) -> list[_T]:
    """Run ``jobs`` over up to ``threads`` threads (this one included); results in order.

    Every job has ended when this returns or raises (none outlives the call: they
    read and write the caller's buffers)."""
    global _pool
    if threads <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    with _pool_guard:
        if _pool is None:
            _pool = ThreadPoolExecutor(MAX_THREADS - 1, thread_name_prefix="asyncsync-delta")
        pool = _pool
    lanes = min(threads, len(jobs))

    # Lane k runs jobs k, k + lanes, ...: lane 0 here, the others in the pool.
    def lane(k: int) -> list[tuple[int, _T]]:
        return [(i, jobs[i]()) for i in range(k, len(jobs), lanes)]

    futures = [pool.submit(lane, k) for k in range(1, lanes)]
    try:
        done = lane(0)
    finally:
        # Wait for every lane, even when this one failed: they touch the caller's arrays.
        wait(futures)
    for future in futures:
        done += future.result()
    return [result for _, result in sorted(done, key=lambda pair: pair[0])]


@dataclass
class _Scan:
    """The changed words of a range of a bucket: absolute word indices, their new values,
    and the range's bitmap (one bit per word, little bit order)."""

    index: np.ndarray
    values: np.ndarray
    bits: np.ndarray


def _scan(
    base: np.ndarray, new: np.ndarray, lo: int, hi: int, index_dtype: Any, update: bool
) -> _Scan:
    """Compare words ``lo:hi`` of ``base`` and ``new`` (uint16 views) chunk by chunk; with
    ``update``, ``base`` becomes ``new`` there (the chunk still in cache)."""
    mask = np.empty(min(CHUNK_WORDS, max(hi - lo, 0)), dtype=bool)
    indices, values, bits = [], [], []
    for at in range(lo, hi, CHUNK_WORDS):
        end = min(at + CHUNK_WORDS, hi)
        m = mask[: end - at]
        old, now = base[at:end], new[at:end]
        np.not_equal(old, now, out=m)
        where = np.flatnonzero(m)
        vals = now[where]
        bits.append(np.packbits(m, bitorder="little"))
        if where.size:
            if update:
                # A plain copy beats the scatter once more than about 1 word in 8 changed.
                if where.size * 8 > end - at:
                    np.copyto(old, now)
                else:
                    old[where] = vals
            index = where.astype(index_dtype)
            index += at
            indices.append(index)
            values.append(vals)
    empty = np.empty(0, dtype=np.uint8)
    return _Scan(
        np.concatenate(indices) if indices else np.empty(0, dtype=index_dtype),
        np.concatenate(values) if values else np.empty(0, dtype=np.uint16),
        np.concatenate(bits) if bits else empty,
    )


def _sparse_layout(words: int, changed: int) -> tuple[tuple[TensorMeta, ...], int]:
    index_dtype = _index_dtype(words)
    index_bytes = changed * index_dtype.itemsize
    values_at = aligned(index_bytes)
    index = (
        TensorMeta(_INDEX, index_dtype.name, (changed,), 0, index_bytes),
        TensorMeta(_VALUES, "int16", (changed,), values_at, changed * WORD),
    )
    return index, values_at + changed * WORD


def _index_dtype(words: int) -> np.dtype[Any]:
    return np.dtype(np.int32 if words < 2**31 else np.int64)


def _bitmap_layout(words: int, changed: int) -> tuple[tuple[TensorMeta, ...], int]:
    bits = (words + 7) // 8
    values_at = aligned(bits)
    index = (
        TensorMeta(_BITS, "uint8", (bits,), 0, bits),
        TensorMeta(_VALUES, "int16", (changed,), values_at, changed * WORD),
    )
    return index, values_at + changed * WORD


def encode_bucket(
    base: np.ndarray,
    new: Bucket,
    allocate: Any,
    *,
    update_base: bool = False,
    threads: int = 1,
) -> tuple[str, Bucket, int, SharedBuffer | None]:
    """The delta of bucket ``new`` against ``base`` (same layout): kind, delta bucket,
    changed words, and the buffer holding it (``None`` for an empty one).

    ``allocate(nbytes)`` returns a :class:`~asyncsync.sharedmem.SharedBuffer`. The
    smallest of three encodings (chosen by measurement, see the Delta sync guide):
    ``sparse`` (4-byte word indices and 2-byte values: 6 bytes per changed word,
    smallest below about 3% changed), ``bitmap`` (one bit per word and the
    values: 1/16 of the bucket plus 2 bytes per changed word) or ``dense`` (the
    bucket). One pass over both sides, in cache-sized chunks split over
    ``threads`` threads; with ``update_base``, ``base`` (writable) becomes ``new``'s
    bytes in that same pass. Blocking.
    """
    payload = new.buffer
    n = payload.nbytes
    if n % WORD:
        if update_base:
            np.copyto(base, payload)
        return _dense(payload, new.checksum, n // WORD, allocate)
    words = n // WORD
    old16, new16 = base.view(np.uint16), payload.view(np.uint16)
    index_dtype = _index_dtype(words)
    # Ranges of whole chunks, one or a few per thread.
    chunks = max(1, -(-words // CHUNK_WORDS))
    parts = max(1, min(threads, chunks))
    cuts = [words * k // parts // CHUNK_WORDS * CHUNK_WORDS for k in range(parts)] + [words]
    scans = run_split(
        [
            functools.partial(_scan, old16, new16, lo, hi, index_dtype, update_base)
            for lo, hi in itertools.pairwise(cuts)
        ],
        threads,
    )
    changed = sum(s.index.size for s in scans)
    sparse, sparse_size = _sparse_layout(words, changed)
    bitmap, bitmap_size = _bitmap_layout(words, changed)
    if min(sparse_size, bitmap_size) >= n:
        return _dense(payload, new.checksum, changed, allocate)
    kind, index, size = (
        (SPARSE, sparse, sparse_size)
        if sparse_size <= bitmap_size
        else (BITMAP, bitmap, bitmap_size)
    )
    buffer = allocate(size) if size else None
    out = buffer.array if buffer is not None else np.empty(0, dtype=np.uint8)
    if changed:
        head, values = index
        out[head.nbytes : values.offset] = 0  # the padding: no stale memory in a payload
        vals = out[values.offset : values.offset + values.nbytes].view(np.uint16)
        heads = out[: head.nbytes].view(index_dtype) if kind == SPARSE else out[: head.nbytes]
        at = bit_at = 0
        for scan in scans:
            k = scan.index.size
            vals[at : at + k] = scan.values
            if kind == SPARSE:
                heads[at : at + k] = scan.index
            else:
                heads[bit_at : bit_at + scan.bits.size] = scan.bits
                bit_at += scan.bits.size
            at += k
    region = buffer.region() if buffer is not None else None
    return kind, Bucket(out, index, checksum(out), region=region), changed, buffer


def _dense(
    payload: np.ndarray, digest: int, changed: int, allocate: Any
) -> tuple[str, Bucket, int, SharedBuffer | None]:
    n = payload.nbytes
    buffer = allocate(n)
    np.copyto(buffer.array, payload)
    meta = (TensorMeta(_DENSE, "uint8", (n,), 0, n),)
    return DENSE, Bucket(buffer.array, meta, digest, region=buffer.region()), changed, buffer


def apply_delta_bucket(base: np.ndarray, kind: str, payload: Bucket) -> np.ndarray | None:
    """Patch ``base`` (a writable flat uint8 array) in place with a delta bucket; return the
    ascending indices of the 2-byte words it wrote (``None`` for a dense one: all of
    them). Blocking.

    Raises :class:`~asyncsync.ProtocolError` for a payload that does not fit ``base``
    (``base`` may then be partly patched: the caller drops it).
    """
    if kind == DENSE:
        np.copyto(base, payload.buffer)
        return None
    tensors = dict(payload.named_tensors())
    values = tensors[_VALUES].numpy().view(np.uint16)
    words = base.view(np.uint16)
    if kind == BITMAP:
        bits = tensors[_BITS].numpy()
        if bits.size != (words.size + 7) // 8:
            raise ProtocolError(
                f"bitmap delta: {bits.size} bitmap bytes for a bucket of {words.size} words"
            )
        # Chunk by chunk: the chunk's mask and words stay in cache.
        at = 0
        step = CHUNK_WORDS // 8
        found = []
        for byte in range(0, bits.size, step):
            lo = byte * 8
            hi = min(lo + CHUNK_WORDS, words.size)
            mask = np.unpackbits(bits[byte : byte + step], count=hi - lo, bitorder="little")
            where = np.flatnonzero(mask.view(bool))
            if at + where.size > values.size:
                break
            words[lo:hi][where] = values[at : at + where.size]
            at += where.size
            found.append(where + lo)
        else:
            if at == values.size:
                return np.concatenate(found) if found else np.empty(0, dtype=np.int64)
        marked = int(np.count_nonzero(np.unpackbits(bits, count=words.size)))
        raise ProtocolError(f"bitmap delta: {marked} words marked, {values.size} values")
    index = tensors[_INDEX].numpy()
    if index.size:
        if int(index.min()) < 0 or int(index.max()) >= words.size:
            raise ProtocolError(
                f"sparse delta: word index outside the bucket of {words.size} words"
            )
        if index.size > 1 and not bool(np.all(index[1:] > index[:-1])):
            raise ProtocolError("sparse delta: word indices are not strictly ascending")
        words[index] = values
    return index


def _patch_one(
    i: int, kept: np.ndarray, kind: str, payload: Bucket, want: BucketManifest, base_step: int
) -> np.ndarray | None:
    changed = apply_delta_bucket(kept, kind, payload)
    got = checksum(kept)
    if got != want.checksum:
        raise ChecksumMismatchError(
            f"delta bucket {i} applied on base step {base_step}: result hashes "
            f"to {got:#018x}, the target's checksum is {want.checksum:#018x}"
        )
    return changed


def patch_and_verify(
    base: list[np.ndarray],
    header: DeltaHeader,
    target: Sequence[BucketManifest],
    payloads: Sequence[Bucket],
    *,
    threads: int = 1,
) -> list[np.ndarray | None]:
    """Patch every kept base bucket with its delta and check each against ``target``
    (buckets split over ``threads`` threads); per bucket, the ascending indices of the
    2-byte words that changed (``None``: dense, all of them).

    Raises :class:`~asyncsync.ChecksumMismatchError` naming a bucket whose result
    does not hash to the target's checksum (the kept base is then garbage: the
    caller drops it). Blocking.
    """
    jobs = [
        (
            lambda i=i, kept=kept, kind=kind, payload=payload, want=want: _patch_one(
                i, kept, kind, payload, want, header.base_step
            )
        )
        for i, (kept, kind, payload, want) in enumerate(
            zip(base, header.kinds, payloads, target, strict=True)
        )
    ]
    return run_split(jobs, threads)


# ------------------------------------------------------------------ trainer side


@dataclass(frozen=True)
class DeltaStats:
    """A :class:`DeltaStore` at one instant (what ``delta_stats()`` of a train actor returns).

    ``step``/``base_step``: the newest delta's target and base (``None``: none
    yet); ``nbytes``/``full_bytes``: its payload against the full snapshot's;
    ``changed_fraction``: the share of 2-byte words that changed;
    ``resident_bytes``: what the store holds (its base copy and the deltas it
    keeps, ``deltas_kept`` of them); ``dropped``: deltas dropped for being larger
    than :data:`MAX_RATIO` of their snapshot (those steps went in full);
    ``last_ratio``: the newest delta's bytes over its snapshot's (a dropped one's
    too); ``skipped``: sessions under ``delta="auto"`` that sent full snapshots
    without waiting for their step's delta because ``last_ratio`` was over their
    plan's ``delta_max_ratio``.
    """

    active: bool
    step: int | None
    base_step: int | None
    nbytes: int
    full_bytes: int
    changed_fraction: float
    computed: int
    last_compute_s: float
    resident_bytes: int
    deltas_kept: int = 0
    dropped: int = 0
    last_ratio: float | None = None
    skipped: int = 0


@dataclass(eq=False)
class DeltaSnapshot:
    """The delta of snapshot ``step`` against base ``header.base_step`` (trainer side).

    ``buckets`` are the delta buckets (in shared memory), ``target`` the target
    snapshot's manifest. Valid while pinned (:meth:`DeltaStore.pinned`).
    """

    step: int
    target: tuple[BucketManifest, ...]
    header: DeltaHeader
    buckets: tuple[Bucket, ...]
    changed_words: int
    total_words: int
    compute_s: float
    buffers: list[SharedBuffer] = field(default_factory=list)
    pins: int = 0
    superseded: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of the delta's payload (what a session moves per engine)."""
        return sum(b.nbytes for b in self.buckets)

    @property
    def full_bytes(self) -> int:
        """Bytes of the target snapshot (what a full session moves per engine)."""
        return sum(m.nbytes for m in self.target)

    @property
    def ratio(self) -> float:
        """The delta's payload bytes over the full snapshot's."""
        full = self.full_bytes
        return self.nbytes / full if full else 0.0

    @property
    def changed_fraction(self) -> float:
        """Share of the snapshot's 2-byte words that changed against the base."""
        return self.changed_words / self.total_words if self.total_words else 0.0


class PrivateBuffer:
    """A process-private buffer with :class:`~asyncsync.sharedmem.SharedBuffer`'s
    ``array`` / ``region()`` shape, for :func:`encode_bucket` outside a train actor
    (the buckets it makes have no shared region)."""

    def __init__(self, nbytes: int) -> None:
        self.array = np.empty(nbytes, dtype=np.uint8)

    def region(self) -> None:
        return None


def _allocate(nbytes: int) -> SharedBuffer:
    from .sharedmem import SharedBuffer

    return SharedBuffer.allocate(nbytes)


def _release(buffers: list[SharedBuffer]) -> None:
    for buffer in buffers:
        buffer.release()


class DeltaStore:
    """Computes, after each publish, the delta of the newest snapshot against the previous.

    Owned by a train actor, on its loop. :meth:`published` (after a build)
    schedules the work; :meth:`pinned` hands a session the delta of the step it
    pinned, waiting for its computation if it is running, or ``None``.
    """

    def __init__(
        self,
        cache: BucketCache,
        *,
        threads: int | None = None,
        max_ratio: float = MAX_RATIO,
    ) -> None:
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ConfigError(f"DeltaStore: threads must be None or an int >= 1, got {threads!r}")
        if (
            isinstance(max_ratio, bool)
            or not isinstance(max_ratio, int | float)
            or not 0 < max_ratio <= 1
        ):
            raise ConfigError(f"DeltaStore: max_ratio must be in (0, 1], got {max_ratio!r}")
        self.cache = cache
        self.threads = delta_threads() if threads is None else threads
        self.max_ratio = max_ratio
        self.dropped = 0
        self._base: list[np.ndarray] | None = None
        self._base_manifest: tuple[BucketManifest, ...] = ()
        self._base_step: int | None = None
        self._base_weights: str | None = None
        # The newest deltas (oldest first, at most KEEP_DELTAS): a session that pinned
        # step N still finds N's delta while N+1's is being computed.
        self._deltas: list[DeltaSnapshot] = []
        self._task: asyncio.Task[None] | None = None
        self._again = False
        # The newest snapshot step processed (its delta made, or its base taken).
        self._processed: int | None = None
        self._progress = Signal()
        self._closed = False
        self._active = False
        self.computed = 0
        self.last_compute_s = 0.0
        # The newest delta's bytes over its snapshot's (a dropped one's when it was
        # dropped), and sessions that went full without waiting because of it.
        self.last_ratio: float | None = None
        self.skipped = 0

    @property
    def base_step(self) -> int | None:
        """The step the store's private copy holds (the base of the next delta)."""
        return self._base_step

    @property
    def resident_bytes(self) -> int:
        """Bytes the store holds: its base copy and the deltas it keeps."""
        base = sum(a.nbytes for a in self._base or [])
        return base + sum(d.nbytes for d in self._deltas if d.buffers)

    @property
    def active(self) -> bool:
        """Whether deltas are computed (from the first :meth:`want` on)."""
        return self._active

    def stats(self) -> DeltaStats:
        """What the store holds and did (see :class:`DeltaStats`)."""
        latest = self._deltas[-1] if self._deltas else None
        return DeltaStats(
            active=self._active,
            step=latest.step if latest else None,
            base_step=latest.header.base_step if latest else None,
            nbytes=latest.nbytes if latest else 0,
            full_bytes=sum(m.nbytes for m in latest.target) if latest else 0,
            changed_fraction=latest.changed_fraction if latest else 0.0,
            computed=self.computed,
            last_compute_s=self.last_compute_s,
            resident_bytes=self.resident_bytes,
            deltas_kept=len(self._deltas),
            dropped=self.dropped,
            last_ratio=self.last_ratio,
            skipped=self.skipped,
        )

    def skip_if_larger(self, limit: float) -> bool:
        """Whether the newest delta made (or dropped) was over ``limit`` of its
        snapshot's bytes; counted in ``skipped`` when it was.

        A session under ``delta="auto"`` then sends full snapshots at once instead of
        waiting for its own step's delta: the share of weights a step changes moves
        slowly with the learning rate, and the store keeps computing, so the first
        session after a small enough delta takes deltas again.
        """
        if self.last_ratio is not None and self.last_ratio > limit:
            self.skipped += 1
            return True
        return False

    def want(self) -> None:
        """A session had an engine a delta would go to: compute deltas from now on
        (the first publish after this only takes the base copy)."""
        if not self._active and not self._closed:
            self._active = True
            self.published()

    def published(self) -> None:
        """A build published a step: compute its delta in the background (once active)."""
        if self._closed or not self._active:
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self._process()
                except ClosedError:
                    return
                except Exception:  # never fatal: sessions then send full snapshots
                    log.exception("delta computation failed; sessions send full snapshots")
                    self._forget_base()
                self._progress.notify()
                if not self._again or self._closed:
                    return
        finally:
            self._task = None
            self._progress.notify()

    async def _process(self) -> None:
        async with self.cache.read() as snap:
            if snap.step == self._base_step:
                self._processed = snap.step
                return
            start = time.perf_counter()
            # Never cut short: the worker reads the pinned snapshot and writes the
            # base; the pin (and close()) must wait for it to end.
            result = await uninterrupted(asyncio.to_thread(self._compute, snap))
            identity = await asyncio.to_thread(weights_identity, snap.manifest)
        took = time.perf_counter() - start
        self.last_compute_s = took
        if isinstance(result, DeltaSnapshot):
            result.compute_s = took
            self._keep(result)
            self.computed += 1
            self.last_ratio = result.ratio
        elif result is not None:  # dropped: too large, at this share of the bytes
            self.dropped += 1
            self.last_ratio = result
        self._base_step, self._base_weights = snap.step, identity
        self._base_manifest = snap.manifest
        self._processed = snap.step

    def _compute(self, snap: Snapshot) -> DeltaSnapshot | float | None:
        """Worker thread: the delta of ``snap`` against the base (``None``: no base yet;
        a float: dropped as too large, at that share of the bytes); the base becomes
        ``snap``. The loop's counters are the caller's to update."""
        manifest = snap.manifest
        base = self._base
        same_layout = (
            base is not None
            and self._base_weights is not None
            and len(self._base_manifest) == len(manifest)
            and all(
                a.index == b.index and a.nbytes == b.nbytes
                for a, b in zip(self._base_manifest, manifest, strict=True)
            )
        )
        if not same_layout or base is None or self._base_step is None:
            # No base of this layout: take a copy; the next publish gets a delta.
            self._base = [np.array(b.buffer, copy=True) for b in snap.buckets]
            return None
        kinds, buckets, buffers = [], [], []
        changed = total = size = 0
        full = sum(b.nbytes for b in snap.buckets)
        too_large = False
        try:
            for kept, bucket in zip(base, snap.buckets, strict=True):
                if too_large:
                    np.copyto(kept, bucket.buffer)  # the base still becomes this snapshot
                    continue
                # The base becomes this snapshot in the same pass (on a failure it is a
                # mix: the caller forgets it).
                kind, delta, words, buffer = encode_bucket(
                    kept, bucket, _allocate, update_base=True, threads=self.threads
                )
                if buffer is not None:
                    buffers.append(buffer)
                kinds.append(kind)
                buckets.append(delta)
                changed += words
                total += bucket.nbytes // WORD
                size += delta.nbytes
                if size > self.max_ratio * full:
                    # Too large to be worth sending: free what it holds now, not later.
                    too_large = True
                    _release(buffers)
                    buffers = []
        except BaseException:
            _release(buffers)
            raise
        if too_large:
            return size / full
        header = DeltaHeader(
            base_step=self._base_step,
            base_weights=self._base_weights or "",
            base_checksums=tuple(m.checksum for m in self._base_manifest),
            payload=tuple(b.manifest for b in buckets),
            kinds=tuple(kinds),
        )
        return DeltaSnapshot(
            step=snap.step,
            target=manifest,
            header=header,
            buckets=tuple(buckets),
            changed_words=changed,
            total_words=total,
            compute_s=0.0,
            buffers=buffers,
        )

    def _keep(self, delta: DeltaSnapshot) -> None:
        self._deltas.append(delta)
        while len(self._deltas) > KEEP_DELTAS:
            old = self._deltas.pop(0)
            old.superseded = True
            self._maybe_free(old)

    def _maybe_free(self, delta: DeltaSnapshot) -> None:
        if delta.superseded and delta.pins == 0 and delta.buffers:
            buffers, delta.buffers = delta.buffers, []
            asyncio.get_running_loop().run_in_executor(None, _release, buffers)

    def _forget_base(self) -> None:
        self._base, self._base_step, self._base_weights = None, None, None
        self._base_manifest = ()

    @contextlib.asynccontextmanager
    async def pinned(self, step: int) -> AsyncIterator[DeltaSnapshot | None]:
        """The delta whose target is ``step``, held for the block (or ``None``).

        Waits for a computation in flight (it may be that of ``step``); never for
        a build.
        """
        while self._task is not None and (self._processed is None or self._processed < step):
            # A computation in flight will process ``step`` (or a newer one): wait
            # for it, then see whether it made ``step``'s delta.
            await self._progress.waiter().wait()
        delta = next((d for d in self._deltas if d.step == step), None)
        if delta is None:
            yield None
            return
        delta.pins += 1
        try:
            yield delta
        finally:
            delta.pins -= 1
            self._maybe_free(delta)

    async def close(self) -> None:
        """Stop computing and free everything (idempotent)."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        deltas, self._deltas = self._deltas, []
        for delta in deltas:
            delta.superseded = True
            self._maybe_free(delta)
        self._forget_base()
