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
pins the newest snapshot and, in a worker thread, compares it with the store's
private copy of the previous one (the base), writes the delta into shared
memory, and patches the base copy into the new snapshot (only the changed
words). The build never waits for it; a session that wants the delta of the
step it pinned waits for that one computation (never for a build).

Memory: the store keeps one private copy of the newest processed snapshot (1x the
model) and the two newest deltas (each at most 1x the model, typically a few
percent), plus any older delta a session still streams. An engine keeps one private
copy of the buckets it serves (1x the model); set
:attr:`~asyncsync.StagingReceiver.keeps_delta_base` to ``False`` to save it
(the engine then refuses deltas and always gets full snapshots).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._primitives import Signal, uninterrupted
from .buckets import Bucket, BucketManifest, TensorMeta, aligned, checksum
from .errors import ChecksumMismatchError, ClosedError, ProtocolError
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
    "encode_bucket",
]

log = logging.getLogger(__name__)

SPARSE, BITMAP, DENSE = "sparse", "bitmap", "dense"
KEEP_DELTAS = 2
"""Deltas a store keeps (the newest ones): a session that pinned step N finds N's
delta while N+1's is computed."""
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


def _sparse_layout(words: int, changed: int) -> tuple[tuple[TensorMeta, ...], int]:
    index_dtype = "int32" if words < 2**31 else "int64"
    index_bytes = changed * (4 if index_dtype == "int32" else 8)
    values_at = aligned(index_bytes)
    index = (
        TensorMeta(_INDEX, index_dtype, (changed,), 0, index_bytes),
        TensorMeta(_VALUES, "int16", (changed,), values_at, changed * WORD),
    )
    return index, values_at + changed * WORD


def _bitmap_layout(words: int, changed: int) -> tuple[tuple[TensorMeta, ...], int]:
    bits = (words + 7) // 8
    values_at = aligned(bits)
    index = (
        TensorMeta(_BITS, "uint8", (bits,), 0, bits),
        TensorMeta(_VALUES, "int16", (changed,), values_at, changed * WORD),
    )
    return index, values_at + changed * WORD


def encode_bucket(
    base: np.ndarray, new: Bucket, allocate: Any
) -> tuple[str, Bucket, int, SharedBuffer | None]:
    """The delta of bucket ``new`` against ``base`` (same layout): kind, delta bucket,
    changed words, and the buffer holding it (``None`` for an empty one).

    ``allocate(nbytes)`` returns a :class:`~asyncsync.sharedmem.SharedBuffer`. The
    smallest of three encodings (chosen by measurement, see the Delta sync guide):
    ``sparse`` (4-byte word indices and 2-byte values: 6 bytes per changed word,
    smallest below about 3% changed), ``bitmap`` (one bit per word and the
    values: 1/16 of the bucket plus 2 bytes per changed word) or ``dense`` (the
    bucket). Blocking.
    """
    payload = new.buffer
    n = payload.nbytes
    if n % WORD:
        return _dense(payload, new.checksum, n // WORD, allocate)
    words = n // WORD
    mask = changed_mask(base, payload)
    changed = int(np.count_nonzero(mask))
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
        vals = out[values.offset : values.offset + values.nbytes].view(np.uint16)
        new_words = payload.view(np.uint16)
        if kind == SPARSE:
            where = np.flatnonzero(mask)
            out[: head.nbytes].view(np.dtype(head.dtype))[:] = where
            np.take(new_words, where, out=vals)
        else:
            out[: head.nbytes] = np.packbits(mask, bitorder="little")
            vals[:] = new_words[mask]
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


def apply_delta_bucket(base: np.ndarray, kind: str, payload: Bucket) -> None:
    """Patch ``base`` (a writable flat uint8 array) in place with a delta bucket. Blocking.

    Raises :class:`~asyncsync.ProtocolError` for a payload that does not fit ``base``.
    """
    if kind == DENSE:
        np.copyto(base, payload.buffer)
        return
    tensors = dict(payload.named_tensors())
    values = tensors[_VALUES].numpy().view(np.uint16)
    words = base.view(np.uint16)
    if kind == BITMAP:
        bits = tensors[_BITS].numpy()
        mask = np.unpackbits(bits, count=words.size, bitorder="little").view(bool)
        if int(np.count_nonzero(mask)) != values.size:
            raise ProtocolError(
                f"bitmap delta: {int(np.count_nonzero(mask))} words marked, {values.size} values"
            )
        words[mask] = values
        return
    index = tensors[_INDEX].numpy()
    if index.size:
        if int(index.min()) < 0 or int(index.max()) >= words.size:
            raise ProtocolError(
                f"sparse delta: word index outside the bucket of {words.size} words"
            )
        words[index] = values


def patch_and_verify(
    base: list[np.ndarray],
    header: DeltaHeader,
    target: Sequence[BucketManifest],
    payloads: Sequence[Bucket],
) -> None:
    """Patch every kept base bucket with its delta and check each against ``target``.

    Raises :class:`~asyncsync.ChecksumMismatchError` naming the first bucket whose
    result does not hash to the target's checksum (the kept base is then garbage:
    the caller drops it). Blocking.
    """
    for i, (kept, kind, payload, want) in enumerate(
        zip(base, header.kinds, payloads, target, strict=True)
    ):
        apply_delta_bucket(kept, kind, payload)
        got = checksum(kept)
        if got != want.checksum:
            raise ChecksumMismatchError(
                f"delta bucket {i} applied on base step {header.base_step}: result hashes "
                f"to {got:#018x}, the target's checksum is {want.checksum:#018x}"
            )


# ------------------------------------------------------------------ trainer side


@dataclass(frozen=True)
class DeltaStats:
    """A :class:`DeltaStore` at one instant (what ``delta_stats()`` of a train actor returns).

    ``step``/``base_step``: the newest delta's target and base (``None``: none
    yet); ``nbytes``/``full_bytes``: its payload against the full snapshot's;
    ``changed_fraction``: the share of 2-byte words that changed;
    ``resident_bytes``: what the store holds (its base copy and the deltas it
    keeps, ``deltas_kept`` of them).
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

    def __init__(self, cache: BucketCache) -> None:
        self.cache = cache
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
        )

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
        if result is not None:
            result.compute_s = took
            self._keep(result)
            self.computed += 1
        self._base_step, self._base_weights = snap.step, identity
        self._base_manifest = snap.manifest
        self._processed = snap.step

    def _compute(self, snap: Snapshot) -> DeltaSnapshot | None:
        """Worker thread: the delta of ``snap`` against the base; the base becomes ``snap``."""
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
        kinds, buckets, buffers, changes = [], [], [], []
        changed = total = 0
        try:
            for kept, bucket in zip(base, snap.buckets, strict=True):
                kind, delta, words, buffer = encode_bucket(kept, bucket, _allocate)
                if buffer is not None:
                    buffers.append(buffer)
                kinds.append(kind)
                buckets.append(delta)
                changes.append(words)
                changed += words
                total += bucket.nbytes // WORD
        except BaseException:
            _release(buffers)
            raise
        header = DeltaHeader(
            base_step=self._base_step,
            base_weights=self._base_weights or "",
            base_checksums=tuple(m.checksum for m in self._base_manifest),
            payload=tuple(b.manifest for b in buckets),
            kinds=tuple(kinds),
        )
        # The base becomes this snapshot (a plain copy: faster than a scatter of the
        # changed words once more than a few percent changed, and never slower by much).
        for kept, bucket, words in zip(base, snap.buckets, changes, strict=True):
            if words:
                np.copyto(kept, bucket.buffer)
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
