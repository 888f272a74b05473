"""Buckets: named tensors packed into one flat, checksummed CPU buffer.

A :class:`Bucket` is the unit of transfer. Its payload is a 1-D ``numpy.uint8``
array (so the Ray object store can share it zero-copy), its index lists every
tensor's name, dtype, shape, byte offset and size, and its checksum is the xxh3-64
of the payload. Offsets are aligned to :data:`ALIGN` bytes so that every view back
out is correctly aligned for its dtype; padding bytes are zero, so equal tensors
always give equal checksums.

Copying and hashing are one pass over memory (:func:`fill_and_hash`): each chunk
of a bucket is fed to a streaming xxh3-64 right after it is written, while it is
still in the CPU cache, so a build reads the weights once and writes the bucket
once. Tensors the format cannot hold (quantized, sub-byte dtypes, any dtype whose
bytes cannot be viewed back out) are refused with :class:`BucketError` before
anything of theirs is copied.

Packing respects a byte budget per bucket. A single tensor larger than the budget
gets a bucket of its own (real embedding tables exceed 512 MiB); that is by design,
never an error.
"""

from __future__ import annotations

import ctypes
import json
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xxhash

from ._checks import check_int, check_iterable, check_type, is_int
from .errors import BucketError, ChecksumMismatchError, ProtocolError

if TYPE_CHECKING:
    from .sharedmem import SharedRegion

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
    "fill_and_hash",
    "fill_buffer",
    "pack",
    "tensor_digest",
]

ALIGN = 64
"""Byte alignment of every tensor inside a bucket (a cache line; >= any dtype's size)."""


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALIGN`."""
    check_int(nbytes, "aligned: nbytes", BucketError, low=0)
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


HASH_CHUNK = 1 << 20
"""Bytes copied before they are hashed, while still in the CPU cache (chosen by
measurement: ``benchmarks/build_speed.py``; below 256 KiB the per-chunk overhead
shows, above the L2 size the hash reads from farther away)."""

DEVICE_CHUNK = 16 << 20
"""Bytes per device-to-host copy that the hash can start on once it has landed:
large enough that the copy's launch cost is small, small enough that hashing
overlaps the transfer of the rest of the bucket."""

_DTYPE_NAMES: dict[torch.dtype, str] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """Stable text name of a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        check_type(dtype, torch.dtype, "dtype_name: dtype", BucketError)
        name = _DTYPE_NAMES[dtype] = str(dtype).removeprefix("torch.")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises :class:`BucketError` for unknown names."""
    if not isinstance(name, str):
        raise BucketError(f"dtype names are strings, got {name!r}")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise BucketError(f"unknown dtype name {name!r}")
    return value


def checksum(payload: np.ndarray) -> int:
    """xxh3-64 of a contiguous uint8 array (the GIL is released for large inputs)."""
    if not isinstance(payload, np.ndarray) or not payload.flags.c_contiguous:
        raise BucketError(
            f"checksum: payload must be a contiguous numpy array, got {type(payload).__name__}"
        )
    return int(xxhash.xxh3_64_intdigest(memoryview(payload)))  # type: ignore[arg-type]


def tensor_digest(t: torch.Tensor) -> int:
    """xxh3-64 of a CPU tensor's raw bytes in row-major order (bit-for-bit identity).

    Raises :class:`BucketError` for anything but a dense CPU tensor of a packable dtype.
    """
    validate_tensor("tensor_digest: t", t)
    if not t.is_cpu:
        raise BucketError(f"tensor_digest: t must be a CPU tensor, got one on {t.device}")
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

    def __post_init__(self) -> None:
        # Types only: whether the entry fits its bucket is check_index's (a receiver's) job.
        if not isinstance(self.name, str):
            raise BucketError(f"TensorMeta.name must be a str, got {self.name!r}")
        if not isinstance(self.dtype, str):
            raise BucketError(f"TensorMeta {self.name!r}: dtype must be a str, got {self.dtype!r}")
        if not isinstance(self.shape, tuple) or not all(is_int(d) for d in self.shape):
            raise BucketError(
                f"TensorMeta {self.name!r}: shape must be a tuple of ints, got {self.shape!r}"
            )
        for field_name in ("offset", "nbytes"):
            value = getattr(self, field_name)
            if not is_int(value):
                raise BucketError(
                    f"TensorMeta {self.name!r}: {field_name} must be an int, got {value!r}"
                )

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
        """Inverse of :meth:`to_json`; raises :class:`BucketError` naming what is wrong."""
        if not isinstance(data, dict):
            raise BucketError(f"TensorMeta.from_json: data must be a dict, got {data!r:.80}")
        try:
            return cls._from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, BucketError):
                raise
            raise BucketError(
                f"TensorMeta.from_json: malformed entry {data!r:.120} ({type(exc).__name__}: {exc})"
            ) from None

    @classmethod
    def _from_json(cls, data: dict[str, Any]) -> TensorMeta:
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

    def __post_init__(self) -> None:
        _check_record("BucketManifest", self.index, self.checksum)
        if not is_int(self.nbytes):
            raise BucketError(f"BucketManifest.nbytes must be an int, got {self.nbytes!r}")

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
        """Inverse of :meth:`to_json`; raises :class:`BucketError` naming what is wrong."""
        if not isinstance(text, str | bytes):
            raise BucketError(f"BucketManifest.from_json: text must be a str, got {text!r:.80}")
        try:
            data = json.loads(text)
            return cls(
                index=tuple(TensorMeta.from_json(m) for m in data["index"]),
                nbytes=int(data["nbytes"]),
                checksum=int(data["checksum"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, BucketError):
                raise
            raise BucketError(
                f"BucketManifest.from_json: malformed manifest {text!r:.120} "
                f"({type(exc).__name__}: {exc})"
            ) from None


@dataclass(frozen=True, eq=False)
class Bucket:
    """One flat uint8 payload plus its index and checksum.

    ``buffer`` is exactly ``nbytes`` long. Buckets handed out by a cache read are
    immutable while pinned: do not write through :meth:`named_tensors` views.
    ``region`` names the shared memory that holds ``buffer`` when a cache built
    it (a reader on the same node maps it with
    :func:`~asyncsync.sharedmem.map_region` instead of receiving a copy);
    ``None`` for buckets from :func:`pack` or received over a transport.
    Pickling copies the payload zero-copy out of band (protocol 5) and the
    region as a few fields.
    """

    buffer: np.ndarray
    index: tuple[TensorMeta, ...]
    checksum: int
    region: SharedRegion | None = None

    def __post_init__(self) -> None:
        # Types only; whether the payload is flat and matches its index is verify()'s job.
        _check_record("Bucket", self.index, self.checksum)
        if not isinstance(self.buffer, np.ndarray):
            raise BucketError(
                f"Bucket.buffer must be a numpy array, got {type(self.buffer).__name__}"
            )

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

        Raises :class:`ProtocolError` naming the first differing tensor or
        field, or :class:`ChecksumMismatchError` if the bytes do not hash to the
        expected checksum. Blocking (hashes the payload): call it off the loop.
        """
        if expected is not None and not isinstance(expected, BucketManifest):
            raise BucketError(
                f"verify: expected must be a BucketManifest or None, got {expected!r:.80}"
            )
        want = expected or self.manifest
        first = self.index[0].name if self.index else "<empty>"
        buf = self.buffer
        if buf.dtype != np.uint8 or buf.ndim != 1 or not buf.flags.c_contiguous:
            # Offsets are byte offsets: any other array would be sliced by elements.
            raise ProtocolError(
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


def _check_record(what: str, index: object, digest: object) -> None:
    if not isinstance(index, tuple) or not all(isinstance(m, TensorMeta) for m in index):
        raise BucketError(f"{what}.index must be a tuple of TensorMeta, got {index!r:.80}")
    if not is_int(digest):
        raise BucketError(f"{what}.checksum must be an int, got {digest!r}")


def check_manifest(got: BucketManifest, want: BucketManifest) -> None:
    """Raise :class:`ProtocolError` naming the first difference of two manifests."""
    if len(got.index) != len(want.index):
        got_first = repr(got.names[0]) if got.index else "<empty>"
        want_first = repr(want.names[0]) if want.index else "<empty>"
        raise ProtocolError(
            f"bucket starting at tensor {got_first} holds {len(got.index)} tensors; the "
            f"manifest expects {len(want.index)} starting at {want_first}"
        )
    for g, w in zip(got.index, want.index, strict=True):
        if g.name != w.name:
            raise ProtocolError(f"tensor name {g.name!r} where manifest has {w.name!r}")
        for field in ("dtype", "shape", "offset", "nbytes"):
            if getattr(g, field) != getattr(w, field):
                raise ProtocolError(
                    f"tensor {g.name!r}: {field} {getattr(g, field)!r} != manifest "
                    f"{getattr(w, field)!r}"
                )
    if got.nbytes != want.nbytes:
        first = want.names[0] if want.index else "<empty>"
        raise ProtocolError(
            f"bucket starting at tensor {first!r}: size {got.nbytes} != manifest size {want.nbytes}"
        )


def check_index(manifest: BucketManifest) -> None:
    """Raise :class:`ProtocolError` unless the index describes a well-formed bucket.

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
            raise ProtocolError(f"tensor {name!r}: unknown dtype {meta.dtype!r}") from None
        if any(d < 0 for d in meta.shape):
            raise ProtocolError(f"tensor {name!r}: negative dimension in {list(meta.shape)}")
        numel = math.prod(meta.shape)
        if meta.nbytes != numel * itemsize:
            raise ProtocolError(
                f"tensor {name!r}: nbytes {meta.nbytes} != {numel} elements x {itemsize} bytes "
                f"({meta.dtype}{list(meta.shape)})"
            )
        if meta.offset < end:
            raise ProtocolError(
                f"tensor {name!r}: offset {meta.offset} overlaps the tensor before it, which "
                f"ends at byte {end}"
            )
        if meta.offset % itemsize:
            raise ProtocolError(
                f"tensor {name!r}: offset {meta.offset} is not a multiple of its element size "
                f"{itemsize}"
            )
        end = meta.offset + meta.nbytes
        if end > manifest.nbytes:
            raise ProtocolError(
                f"tensor {name!r} ends at byte {end}, past the bucket's {manifest.nbytes} bytes"
            )


def check_manifests(manifest: Sequence[BucketManifest]) -> None:
    """:func:`check_index` for every bucket, and every tensor name at most once overall."""
    seen: set[str] = set()
    for bucket in manifest:
        check_index(bucket)
        for name in bucket.names:
            if name in seen:
                raise ProtocolError(f"tensor {name!r} appears twice in the manifest")
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
    sparse, nested, meta and quantized tensors, dtypes whose bytes cannot be
    copied into a bucket and viewed back out (sub-byte ``uint1``..``uint7``,
    ``int1``..``int7`` and the like), and names that are not non-empty strings.
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
    if value.layout != torch.strided or value.is_nested:
        what = "nested" if value.is_nested else str(value.layout)
        raise BucketError(f"{name!r} has layout {what}; only dense tensors can be packed")
    if value.is_meta:
        raise BucketError(f"{name!r} is a meta tensor and holds no data")
    if value.is_quantized or value.dtype in _QUANTIZED:
        raise BucketError(
            f"{name!r} is a quantized {dtype_name(value.dtype)} tensor, which a bucket cannot "
            "hold; send its int_repr() and its scales and zero points as separate tensors"
        )
    problem = _dtype_problem(value.dtype)
    if problem is not None:
        raise BucketError(
            f"{name!r} has dtype {dtype_name(value.dtype)}, which a bucket cannot hold: {problem}"
        )
    return value


_QUANTIZED = frozenset({torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4})
_DTYPE_PROBLEMS: dict[torch.dtype, str | None] = {}


def _dtype_problem(dtype: torch.dtype) -> str | None:
    """Why a dtype cannot go through a bucket, or ``None`` if it can (cached per dtype).

    A dtype is packable when its name maps back to it (the index stores names),
    and torch can view bytes as it and copy it element-wise: that is exactly what
    packing and :meth:`Bucket.named_tensors` do. The probe views a small uint8
    buffer, so no tensor of the dtype is created (which warns for some dtypes).
    """
    if dtype in _DTYPE_PROBLEMS:
        return _DTYPE_PROBLEMS[dtype]
    problem: str | None = None
    name = dtype_name(dtype)
    if getattr(torch, name, None) is not dtype:
        problem = f"its name {name!r} does not map back to it"
    else:
        try:
            probe = torch.zeros(2 * max(1, dtype.itemsize), dtype=torch.uint8).view(dtype)
            probe[:1].copy_(probe[1:2])
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            problem = f"torch cannot copy it byte for byte ({_first_line(exc)})"
    _DTYPE_PROBLEMS[dtype] = problem
    return problem


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


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
        check_iterable(items, "named_tensors", BucketError)
        check_int(bucket_bytes, "bucket_bytes", BucketError, low=1)
        if seen is not None and not isinstance(seen, set):
            raise BucketError(f"seen must be a set or None, got {seen!r:.80}")
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


def fill_and_hash(
    payload: np.ndarray, index: Sequence[TensorMeta], tensors: Sequence[torch.Tensor]
) -> int:
    """Copy ``tensors`` into ``payload`` at ``index`` offsets, zero the padding, return the hash.

    The result equals ``checksum(payload)`` bit for bit, but memory is crossed
    once: the payload is written in chunks of :data:`HASH_CHUNK` bytes and each
    chunk is fed to a streaming xxh3-64 right after it is written, while it is
    still in the CPU cache. Contiguous CPU tensors are copied with ``memmove``;
    other tensors with ``Tensor.copy_`` in blocks of rows. Accelerator tensors are
    copied to the host asynchronously (DMA when ``payload`` is page-locked), in
    blocks of about :data:`DEVICE_CHUNK` bytes, each hashed as soon as it has
    landed, so the hash overlaps the rest of the transfer; the call returns after
    every copy finished.

    ``index`` must describe ``tensors`` (same order, sizes and shapes) in
    increasing, non-overlapping offsets inside ``payload``, which must be a
    writable, contiguous 1-D ``uint8`` array; bytes not covered by a tensor are
    zeroed. Raises :class:`BucketError` naming the tensor when an argument does not
    fit, before anything is written, or when torch fails to copy a tensor (the
    payload is then partly written and must be discarded). Blocking: run it in a
    worker thread (the GIL is released during every copy and hash).
    """
    _check_fill(payload, index, tensors)
    hasher = xxhash.xxh3_64()
    _fill(payload, index, tensors, hasher)
    return int(hasher.intdigest())


def fill_buffer(
    payload: np.ndarray, index: Sequence[TensorMeta], tensors: Sequence[torch.Tensor]
) -> None:
    """:func:`fill_and_hash` without the hash: the copy alone, to measure it apart.

    Same contract and errors; the payload's checksum is left to the caller.
    """
    _check_fill(payload, index, tensors)
    _fill(payload, index, tensors, None)


def _check_fill(
    payload: np.ndarray, index: Sequence[TensorMeta], tensors: Sequence[torch.Tensor]
) -> None:
    # Bytes are moved by address below: every range must lie inside the payload.
    if (
        not isinstance(payload, np.ndarray)
        or payload.dtype != np.uint8
        or payload.ndim != 1
        or not payload.flags.c_contiguous
        or not payload.flags.writeable
    ):
        raise BucketError("payload must be a writable, contiguous 1-D uint8 numpy array")
    for what, items in (("index", index), ("tensors", tensors)):
        if not isinstance(items, list | tuple):
            raise BucketError(f"{what} must be a list or tuple, got {type(items).__name__}")
    wrong = [m for m in index if not isinstance(m, TensorMeta)]
    if wrong:
        raise BucketError(f"index entries must be TensorMeta, got {wrong[0]!r:.80}")
    if len(index) != len(tensors):
        raise BucketError(f"{len(index)} index entries for {len(tensors)} tensors")
    end = 0
    for meta, src in zip(index, tensors, strict=True):
        if not isinstance(src, torch.Tensor):
            raise BucketError(f"{meta.name!r} is a {type(src).__name__}, not a torch.Tensor")
        if tensor_nbytes(src) != meta.nbytes or src.shape != meta.shape:
            raise BucketError(
                f"tensor {meta.name!r}: index says {meta.dtype}{list(meta.shape)} of "
                f"{meta.nbytes} bytes, the tensor is {dtype_name(src.dtype)}{list(src.shape)}"
            )
        if meta.offset < end or meta.offset + meta.nbytes > payload.nbytes:
            raise BucketError(
                f"tensor {meta.name!r}: bytes [{meta.offset}, {meta.offset + meta.nbytes}) "
                f"overlap the tensor before it or lie outside the {payload.nbytes}-byte payload"
            )
        end = meta.offset + meta.nbytes


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _fill(
    payload: np.ndarray,
    index: Sequence[TensorMeta],
    tensors: Sequence[torch.Tensor],
    hasher: xxhash.xxh3_64 | None,
) -> None:
    """The copy loop of :func:`fill_and_hash` (arguments already checked)."""
    base = payload.ctypes.data
    view = memoryview(payload)  # type: ignore[arg-type]
    total = payload.nbytes
    flat: torch.Tensor | None = None
    hashed = 0  # payload[:hashed] was fed to the hasher
    device = _DeviceCopies()

    def written(upto: int) -> None:
        """payload[:upto] is final on the host: hash it in chunks while it is hot."""
        nonlocal hashed
        if hasher is not None and not device.queued and upto - hashed >= HASH_CHUNK:
            hasher.update(view[hashed:upto])
            hashed = upto

    end = 0
    for meta, src in zip(index, tensors, strict=True):
        if meta.offset > end:
            ctypes.memset(base + end, 0, meta.offset - end)
        end = meta.offset + meta.nbytes
        if meta.nbytes == 0:
            continue  # nothing to copy (and an empty buffer cannot be viewed as another dtype)
        try:
            if (
                type(src) in _PLAIN_TENSOR_TYPES
                and src.is_cpu
                and src.is_contiguous()
                and not src.is_conj()
                and not src.is_neg()
            ):
                # Plain bytes: memmove (releases the GIL), cut where the hash wants them.
                pos = meta.offset
                src_at = src.data_ptr() - pos
                while pos < end:
                    # Up to the next hash boundary; in one piece when nothing is hashed
                    # now (no hasher, or device copies queued that the hash must wait
                    # for anyway).
                    inline = hasher is not None and not device.queued
                    cut = max(min(end, hashed + HASH_CHUNK), pos + 1) if inline else end
                    ctypes.memmove(base + pos, src_at + pos, cut - pos)
                    pos = cut
                    written(pos)
                continue
            if flat is None:
                flat = _as_uint8_tensor(payload)
            dst = flat[meta.offset : end].view(src.dtype).view(src.shape)
            src = src.detach()
            accel = not src.is_cpu
            rows = src.shape[0] if src.dim() else 1
            row_bytes = meta.nbytes // rows
            per_block = max(1, (DEVICE_CHUNK if accel else HASH_CHUNK) // row_bytes)
            if src.dim() == 0 or per_block >= rows:
                blocks = [(0, rows)]
            else:
                blocks = [(a, min(rows, a + per_block)) for a in range(0, rows, per_block)]
            for a, b in blocks:
                if len(blocks) == 1:
                    dst.copy_(src, non_blocking=accel)
                else:
                    dst[a:b].copy_(src[a:b], non_blocking=accel)
                block_end = meta.offset + b * row_bytes
                if accel:
                    device.add(src.device, (b - a) * row_bytes, block_end)
                else:
                    written(block_end)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            raise BucketError(
                f"cannot copy tensor {meta.name!r} ({dtype_name(src.dtype)}{list(src.shape)} "
                f"on {src.device}) into its bucket: {_first_line(exc)}"
            ) from exc
    if total > end:
        ctypes.memset(base + end, 0, total - end)
    # Hash what landed, in payload order, as it lands; the host's own writes
    # between device copies are final already. Every copy has landed on return.
    for upto, landed in device.marks(total):
        for copies in landed:
            copies.wait()
        if hasher is not None and upto > hashed:
            hasher.update(view[hashed:upto])
            hashed = upto


class _DeviceCopies:
    """Device-to-host copies queued by one fill, marked for the hash in payload order.

    A mark is recorded once about :data:`DEVICE_CHUNK` bytes were queued since the
    last one: it covers every copy queued before it, on every device, so the hash
    may take the payload up to its offset once the mark's copies have landed.
    """

    def __init__(self) -> None:
        self.queued = False
        self._marks: list[tuple[int, list[_Landed]]] = []
        self._unmarked: dict[torch.device, None] = {}
        self._since = 0

    def add(self, device: torch.device, nbytes: int, upto: int) -> None:
        self.queued = True
        self._unmarked[device] = None
        self._since += nbytes
        if self._since >= DEVICE_CHUNK:
            self._mark(upto)

    def _mark(self, upto: int) -> None:
        if self._unmarked:
            self._marks.append((upto, [_Landed(d) for d in self._unmarked]))
            self._unmarked.clear()
            self._since = 0

    def marks(self, total: int) -> list[tuple[int, list[_Landed]]]:
        """Every mark, the last one at ``total`` (after the last copy)."""
        self._mark(total)
        if not self._marks or self._marks[-1][0] < total:
            self._marks.append((total, []))
        return self._marks


class _Landed:
    """Marks the copies queued so far on ``device``'s current stream by this thread.

    Not ``torch.cuda.synchronize()``: that waits on the thread's current device
    (the first GPU in a fresh worker thread) whatever device the tensors are on,
    and for every stream's work there, not just these copies.
    """

    def __init__(self, device: torch.device) -> None:
        self.event: torch.cuda.Event | None = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.event.record(torch.cuda.current_stream(device))
        else:
            # No events to wait on per copy elsewhere: wait for the device now.
            torch.accelerator.synchronize(device)

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # type: ignore[no-untyped-call]


def pack(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = 512 << 20
) -> list[Bucket]:
    """Pack tensors into freshly allocated buckets of at most ``bucket_bytes`` each.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. Raises
    :class:`BucketError` naming the first bad item (non-tensor, sparse, meta,
    quantized, an unpackable dtype, duplicate or empty name). Blocking; the
    cache does the same work off the loop into pooled shared-memory buffers.
    The buckets have no shared region (``region=None``).
    """
    stream = TensorStream(named_tensors, bucket_bytes)
    buckets: list[Bucket] = []
    while group := stream.next_group():
        index, total = layout(group)
        payload = np.empty(total, dtype=np.uint8)
        digest = fill_and_hash(payload, index, [t for _, t in group])
        buckets.append(Bucket(payload, index, digest))
    return buckets
