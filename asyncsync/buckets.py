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
import warnings
from collections.abc import Iterable, Iterator
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
            raw = flat[meta.offset : meta.offset + meta.nbytes]
            out.append((meta.name, raw.view(dtype_from_name(meta.dtype)).view(meta.shape)))
        return out

    def verify(self, expected: BucketManifest | None = None) -> None:
        """Check the payload against ``expected`` (or this bucket's own manifest).

        Raises :class:`ManifestMismatchError` naming the first differing tensor or
        field, or :class:`ChecksumMismatchError` if the bytes do not hash to the
        expected checksum. Blocking (hashes the payload): call it off the loop.
        """
        want = expected or self.manifest
        if expected is not None:
            check_manifest(self.manifest, expected)
        actual = checksum(self.buffer)
        if actual != want.checksum:
            first = self.index[0].name if self.index else "<empty>"
            raise ChecksumMismatchError(
                f"bucket starting at tensor {first!r} ({self.nbytes} bytes): checksum "
                f"{actual:#018x} != expected {want.checksum:#018x}"
            )


def check_manifest(got: BucketManifest, want: BucketManifest) -> None:
    """Raise :class:`ManifestMismatchError` naming the first difference of two manifests."""
    if len(got.index) != len(want.index):
        raise ManifestMismatchError(
            f"bucket holds {len(got.index)} tensors, manifest says {len(want.index)} "
            f"(first expected: {want.names[:1]})"
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
        raise ManifestMismatchError(f"bucket size {got.nbytes} != manifest size {want.nbytes}")


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
        raise BucketError(f"tensor names must be non-empty strings, got {name!r}")
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
            raise BucketError(f"expected (name, tensor) pairs, got {type(item).__name__}")
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
    Accelerator tensors are copied to the host here; one synchronization per call.
    The checksum is left to the caller, so it can overlap the next bucket's copy.
    """
    flat = torch.from_numpy(payload)
    end = 0
    any_accel = False
    for meta, src in zip(index, tensors, strict=True):
        if meta.offset > end:
            flat[end : meta.offset].zero_()
        dst = flat[meta.offset : meta.offset + meta.nbytes].view(src.dtype).view(src.shape)
        accel = src.device.type != "cpu"
        any_accel |= accel
        dst.copy_(src.detach(), non_blocking=accel)
        end = meta.offset + meta.nbytes
    if any_accel and torch.cuda.is_available():
        torch.cuda.synchronize()


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
