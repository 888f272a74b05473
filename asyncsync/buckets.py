"""Buckets: named tensors packed into one flat, checksummed CPU buffer.

A :class:`Bucket` is the unit of transfer. Its payload is a 1-D ``numpy.uint8``
array (so the Ray object store can share it zero-copy), its index lists every
tensor's name, dtype, shape, byte offset and size, and its checksum is the xxh3-64
of the payload. Offsets are aligned to :data:`ALIGN` bytes so that every view back
out is correctly aligned for its dtype; padding bytes are zero, so equal tensors
always give equal checksums.

Packing respects a byte budget per bucket. A single tensor larger than the budget
gets a bucket of its own (real embedding tables exceed 512 MiB); that is by design,
never an error.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xxhash

from .errors import BucketError, ChecksumMismatchError, ManifestMismatchError

__all__ = [
    "ALIGN",
    "Bucket",
    "BucketManifest",
    "TensorMeta",
    "TensorStream",
    "aligned",
    "checksum",
    "dtype_from_name",
    "dtype_name",
    "fill_buffer",
    "pack",
    "tensor_digest",
]

ALIGN = 64
"""Byte alignment of every tensor inside a bucket (a cache line; >= any dtype's size)."""


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALIGN`."""
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def dtype_name(dtype: torch.dtype) -> str:
    """Stable text name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises :class:`BucketError` for unknown names."""
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise BucketError(f"unknown dtype name {name!r}")
    return value


def checksum(payload: np.ndarray) -> int:
    """xxh3-64 of a contiguous uint8 array (the GIL is released for large inputs)."""
    return int(xxhash.xxh3_64_intdigest(memoryview(payload)))  # type: ignore[arg-type]


def tensor_digest(t: torch.Tensor) -> int:
    """xxh3-64 of a CPU tensor's raw bytes in row-major order (bit-for-bit identity)."""
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return checksum(raw)


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside a bucket's payload."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorMeta:
        return cls(
            name=str(data["name"]),
            dtype=str(data["dtype"]),
            shape=tuple(int(d) for d in data["shape"]),
            offset=int(data["offset"]),
            nbytes=int(data["nbytes"]),
        )


@dataclass(frozen=True)
class BucketManifest:
    """What a receiver expects of one bucket before it arrives: index, size, checksum."""

    index: tuple[TensorMeta, ...]
    nbytes: int
    checksum: int

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.index)

    def to_json(self) -> str:
        """JSON text (no pickle anywhere on the wire)."""
        return json.dumps(
            {
                "index": [m.to_json() for m in self.index],
                "nbytes": self.nbytes,
                "checksum": self.checksum,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> BucketManifest:
        data = json.loads(text)
        return cls(
            index=tuple(TensorMeta.from_json(m) for m in data["index"]),
            nbytes=int(data["nbytes"]),
            checksum=int(data["checksum"]),
        )


@dataclass(frozen=True, eq=False)
class Bucket:
    """One flat uint8 payload plus its index and checksum.

    ``buffer`` is exactly ``nbytes`` long. Buckets handed out by a cache read are
    immutable while pinned: do not write through :meth:`named_tensors` views.
    """

    buffer: np.ndarray
    index: tuple[TensorMeta, ...]
    checksum: int

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    @property
    def manifest(self) -> BucketManifest:
        return BucketManifest(index=self.index, nbytes=self.nbytes, checksum=self.checksum)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Zero-copy views of the packed tensors, bit-identical to what was packed.

        The views share memory with ``buffer``; they stay valid as long as the
        bucket object is referenced. If ``buffer`` is read-only (for example a
        zero-copy object-store read), the views must not be written to.
        """
        flat = _as_uint8_tensor(self.buffer)
        out: list[tuple[str, torch.Tensor]] = []
        for meta in self.index:
            dtype = dtype_from_name(meta.dtype)
            if meta.nbytes == 0:
                # torch cannot change the dtype of a view of an empty buffer (stride 0),
                # and a tensor without elements has no bytes to share anyway.
                out.append((meta.name, torch.empty(meta.shape, dtype=dtype)))
                continue
            raw = flat[meta.offset : meta.offset + meta.nbytes]
            out.append((meta.name, raw.view(dtype).view(meta.shape)))
        return out

    def verify(self, expected: BucketManifest | None = None) -> None:
        """Check the payload against ``expected`` (or this bucket's own manifest).

        Raises :class:`ManifestMismatchError` naming the first differing tensor or
        field, or :class:`ChecksumMismatchError` if the bytes do not hash to the
        expected checksum. Blocking (hashes the payload): call it off the loop.
        """
        want = expected or self.manifest
        first = self.index[0].name if self.index else "<empty>"
        buf = self.buffer
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
            # Offsets are byte offsets: any other array would be sliced by elements.
            raise ManifestMismatchError(
                f"bucket starting at tensor {first!r}: payload must be a flat contiguous "
                f"uint8 array, got {buf.dtype} of shape {list(buf.shape)}"
            )
        check_index(want)
        if expected is not None:
            check_manifest(self.manifest, expected)
        actual = checksum(self.buffer)
        if actual != want.checksum:
            raise ChecksumMismatchError(
                f"bucket starting at tensor {first!r} ({self.nbytes} bytes): checksum "
                f"{actual:#018x} != expected {want.checksum:#018x}"
            )


def check_manifest(got: BucketManifest, want: BucketManifest) -> None:
    """Raise :class:`ManifestMismatchError` naming the first difference of two manifests."""
    if len(got.index) != len(want.index):
        got_first = repr(got.names[0]) if got.index else "<empty>"
        want_first = repr(want.names[0]) if want.index else "<empty>"
        raise ManifestMismatchError(
            f"bucket starting at tensor {got_first} holds {len(got.index)} tensors; the "
            f"manifest expects {len(want.index)} starting at {want_first}"
        )
    for g, w in zip(got.index, want.index, strict=True):
        if g.name != w.name:
            raise ManifestMismatchError(f"tensor name {g.name!r} where manifest has {w.name!r}")
        for field in ("dtype", "shape", "offset", "nbytes"):
            if getattr(g, field) != getattr(w, field):
                raise ManifestMismatchError(
                    f"tensor {g.name!r}: {field} {getattr(g, field)!r} != manifest "
                    f"{getattr(w, field)!r}"
                )
    if got.nbytes != want.nbytes:
        first = want.names[0] if want.index else "<empty>"
        raise ManifestMismatchError(
            f"bucket starting at tensor {first!r}: size {got.nbytes} != manifest size {want.nbytes}"
        )


def check_index(manifest: BucketManifest) -> None:
    """Raise :class:`ManifestMismatchError` unless the index describes a well-formed bucket.

    Every tensor needs a known dtype, non-negative dimensions, ``nbytes`` equal to
    its element count times its element size, an offset that is a multiple of its
    element size, and must lie inside the bucket without overlapping another. An
    index that breaks this can still match its own checksum, and would then fail
    only when viewed back out: halfway through writing a model.
    """
    end = 0
    # Zero-size tensors share an offset with the next tensor: sort them first.
    for meta in sorted(manifest.index, key=lambda m: (m.offset, m.nbytes)):
        name = meta.name
        try:
            itemsize = dtype_from_name(meta.dtype).itemsize
        except BucketError:
            raise ManifestMismatchError(f"tensor {name!r}: unknown dtype {meta.dtype!r}") from None
        if any(d < 0 for d in meta.shape):
            raise ManifestMismatchError(
                f"tensor {name!r}: negative dimension in {list(meta.shape)}"
            )
        numel = math.prod(meta.shape)
        if meta.nbytes != numel * itemsize:
            raise ManifestMismatchError(
                f"tensor {name!r}: nbytes {meta.nbytes} != {numel} elements x {itemsize} bytes "
                f"({meta.dtype}{list(meta.shape)})"
            )
        if meta.offset < end:
            raise ManifestMismatchError(
                f"tensor {name!r}: offset {meta.offset} overlaps the tensor before it, which "
                f"ends at byte {end}"
            )
        if meta.offset % itemsize:
            raise ManifestMismatchError(
                f"tensor {name!r}: offset {meta.offset} is not a multiple of its element size "
                f"{itemsize}"
            )
        end = meta.offset + meta.nbytes
        if end > manifest.nbytes:
            raise ManifestMismatchError(
                f"tensor {name!r} ends at byte {end}, past the bucket's {manifest.nbytes} bytes"
            )


def check_manifests(manifest: Sequence[BucketManifest]) -> None:
    """:func:`check_index` for every bucket, and every tensor name at most once overall."""
    seen: set[str] = set()
    for bucket in manifest:
        check_index(bucket)
        for name in bucket.names:
            if name in seen:
                raise ManifestMismatchError(f"tensor {name!r} appears twice in the manifest")
            seen.add(name)


def _as_uint8_tensor(buffer: np.ndarray) -> torch.Tensor:
    if buffer.flags.writeable:
        return torch.from_numpy(buffer)
    # torch warns that it cannot mark tensors read-only; the contract above says so.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(buffer)


def validate_tensor(name: object, value: object) -> torch.Tensor:
    """Return ``value`` as a packable tensor, or raise :class:`BucketError` naming it.

    Accepts dense (strided) tensors on CPU or an accelerator; refuses non-tensors,
    sparse and meta tensors, and names that are not non-empty strings.
    """
    if not isinstance(name, str) or not name:
        # No usable name: say what the value is, so the item can still be found.
        what = (
            f"{dtype_name(value.dtype)}{list(value.shape)} tensor"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise BucketError(f"tensor names must be non-empty strings, got {name!r} for a {what}")
    if not isinstance(value, torch.Tensor):
        raise BucketError(f"{name!r} is a {type(value).__name__}, not a torch.Tensor")
    if value.layout != torch.strided:
        raise BucketError(f"{name!r} has layout {value.layout}; only dense tensors can be packed")
    if value.is_meta:
        raise BucketError(f"{name!r} is a meta tensor and holds no data")
    return value


def tensor_nbytes(t: torch.Tensor) -> int:
    return int(t.numel() * t.element_size())


class TensorStream:
    """Pulls ``(name, tensor)`` pairs from an iterable, one bucket's worth at a time.

    :meth:`next_group` is blocking (the iterable may run collectives or conversions)
    and is meant to run in a worker thread; calls must not overlap. A group is the
    longest run of tensors whose aligned sizes fit ``bucket_bytes``, or a single
    tensor larger than that. Names must be unique across everything pulled through
    the streams sharing ``seen``.
    """

    def __init__(
        self,
        items: Iterable[tuple[str, torch.Tensor]],
        bucket_bytes: int,
        seen: set[str] | None = None,
    ) -> None:
        if bucket_bytes <= 0:
            raise BucketError(f"bucket_bytes must be positive, got {bucket_bytes}")
        # iter() is deferred to the first next_group() call, in the worker thread:
        # creating the iterator may already do blocking work.
        self._items = items
        self._it: Iterator[tuple[str, torch.Tensor]] | None = None
        self._budget = bucket_bytes
        self._carry: tuple[str, torch.Tensor] | None = None
        self._seen = seen if seen is not None else set()

    def next_group(self) -> list[tuple[str, torch.Tensor]]:
        """The next group, or ``[]`` when the iterable is exhausted."""
        group: list[tuple[str, torch.Tensor]] = []
        size = 0
        while True:
            if self._carry is not None:
                item, self._carry = self._carry, None
            else:
                if self._it is None:
                    self._it = iter(self._items)
                nxt = next(self._it, None)
                if nxt is None:
                    return group
                item = self._validated(nxt)
            n = aligned(tensor_nbytes(item[1]))
            if group and size + n > self._budget:
                self._carry = item
                return group
            group.append(item)
            size += n
            if size >= self._budget:
                return group

    def _validated(self, item: object) -> tuple[str, torch.Tensor]:
        if not isinstance(item, tuple) or len(item) != 2:
            raise BucketError(
                f"expected (name, tensor) pairs, got a {type(item).__name__}: {item!r:.80}"
            )
        name, value = item
        tensor = validate_tensor(name, value)
        assert isinstance(name, str)
        if name in self._seen:
            raise BucketError(f"duplicate tensor name {name!r}")
        self._seen.add(name)
        return name, tensor


def layout(group: list[tuple[str, torch.Tensor]]) -> tuple[tuple[TensorMeta, ...], int]:
    """Offsets for one group packed back to back; returns (index, payload bytes)."""
    index: list[TensorMeta] = []
    offset = 0
    for name, t in group:
        n = tensor_nbytes(t)
        index.append(TensorMeta(name, dtype_name(t.dtype), tuple(t.shape), offset, n))
        offset += aligned(n)
    # The last tensor needs no trailing padding.
    total = index[-1].offset + index[-1].nbytes if index else 0
    return tuple(index), total


def fill_buffer(
    payload: np.ndarray, index: tuple[TensorMeta, ...], tensors: list[torch.Tensor]
) -> None:
    """Copy ``tensors`` into ``payload`` at ``index`` offsets and zero the padding.

    Blocking; run it in a worker thread (torch releases the GIL while copying).
    Accelerator tensors are copied to the host here, asynchronously (into pinned
    memory when ``payload`` is pinned), with one synchronization per source device
    per call, after the last copy. The checksum is left to the caller, so it can
    overlap the next bucket's copy.
    """
    flat = torch.from_numpy(payload)
    end = 0
    devices: set[torch.device] = set()
    for meta, src in zip(index, tensors, strict=True):
        if meta.offset > end:
            flat[end : meta.offset].zero_()
        end = meta.offset + meta.nbytes
        if meta.nbytes == 0:
            continue  # nothing to copy (and an empty buffer cannot be viewed as another dtype)
        dst = flat[meta.offset : meta.offset + meta.nbytes].view(src.dtype).view(src.shape)
        accel = src.device.type != "cpu"
        if accel:
            devices.add(src.device)
        dst.copy_(src.detach(), non_blocking=accel)
    for device in devices:
        _wait_for_copies(device)


def _wait_for_copies(device: torch.device) -> None:
    """Block until the copies queued on ``device``'s current stream by this thread are done.

    Not ``torch.cuda.synchronize()``: that waits on the thread's current device (the
    first GPU in a fresh worker thread) whatever device the tensors are on, and for
    every stream's work there, not just these copies.
    """
    if device.type == "cuda":
        done = torch.cuda.Event()  # type: ignore[no-untyped-call]
        done.record(torch.cuda.current_stream(device))
        done.synchronize()
    else:
        torch.accelerator.synchronize(device)


def pack(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 512 << 20
) -> list[Bucket]:
    """Pack tensors into freshly allocated buckets of at most ``bucket_bytes`` each.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. Raises
    :class:`BucketError` naming the first bad item (non-tensor, sparse, meta,
    duplicate or empty name). Blocking; the cache does the same work off the loop
    into pooled buffers.
    """
    stream = TensorStream(named_tensors, bucket_bytes)
    buckets: list[Bucket] = []
    while group := stream.next_group():
        index, total = layout(group)
        payload = np.empty(total, dtype=np.uint8)
        fill_buffer(payload, index, [t for _, t in group])
        buckets.append(Bucket(payload, index, checksum(payload)))
    return buckets
