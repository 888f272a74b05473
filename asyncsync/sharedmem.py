"""Shared-memory payload buffers: memfd on the owner's side, a read-only map on the reader's.

The cache owner keeps every snapshot payload in a :class:`SharedBuffer`: an
anonymous memory file (``memfd_create``, close-on-exec, mode 0600) mapped
writable into the owner. Nothing is ever created under ``/dev/shm`` or on disk,
so a ``kill -9`` of the owner leaves nothing behind: the memory is freed when the
last mapping of it goes away.

A :class:`SharedRegion` names a byte range of such a buffer from outside the
owner: its pid, the fd number there, the range, and a random token that is part
of the memory file's name. :func:`map_region` maps a region read-only in another
process of the same node (same user), after checking through ``/proc`` that the
fd still names that buffer; a reused fd number names another file and is refused.

Mappings are made with ``mmap(2)`` directly (not :mod:`mmap`, which keeps a
duplicate fd open for every mapping) and are unmapped when the last numpy array
that views them is garbage-collected, so a view can never outlive its memory.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import secrets
import sys
import threading
from dataclasses import dataclass

import numpy as np

from ._checks import check_bool, check_int, check_str, check_type, is_int
from .errors import ConfigError, SharedMemoryError

__all__ = ["SharedBuffer", "SharedMappings", "SharedRegion", "map_region"]

NAME_PREFIX = "asyncsync-"
"""Every buffer's memory file is named ``asyncsync-<token>`` (``/memfd:asyncsync-<token>``)."""

_PAGE = mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value
_MADV_REMOVE = 9  # free the pages behind a shared mapping (punch a hole in the file)
# Fault every page in for writing (Linux >= 5.14). MAP_POPULATE on a shared mapping
# only read-faults, and the first write to each page then still costs a fault.
_MADV_POPULATE_WRITE = 23
# Ask for transparent huge pages: fewer TLB misses in every copy. Takes effect where
# /sys/kernel/mm/transparent_hugepage/shmem_enabled allows it ("advise" and up).
_MADV_HUGEPAGE = 14
# Register the whole range with every CUDA context, so copies from any device are DMA.
_CUDA_HOST_REGISTER_PORTABLE = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


@dataclass(frozen=True)
class SharedRegion:
    """A byte range of a cache owner's shared buffer, as another process can find it.

    ``pid`` and ``fd`` locate the memory file through ``/proc/<pid>/fd/<fd>``;
    ``token`` is part of its name (``asyncsync-<token>``), so a reader can tell
    that the fd still names the same buffer; ``offset`` and ``nbytes`` are the
    range inside it. Small and picklable; it grants nothing by itself (opening
    the fd needs the owner's uid).
    """

    pid: int
    fd: int
    offset: int
    nbytes: int
    token: str

    def __post_init__(self) -> None:
        for field_name in ("pid", "fd", "offset", "nbytes"):
            value = getattr(self, field_name)
            if not is_int(value) or value < 0:
                raise SharedMemoryError(
                    f"SharedRegion.{field_name} must be an int >= 0, got {value!r}"
                )
        check_str(self.token, "SharedRegion.token", SharedMemoryError)

    @property
    def name(self) -> str:
        """The memory file's name, as ``memfd_create`` was given it."""
        return NAME_PREFIX + self.token

    def __str__(self) -> str:
        return (
            f"shared region {self.name} [{self.offset}, {self.offset + self.nbytes}) "
            f"of pid {self.pid} fd {self.fd}"
        )


class _Mapping:
    """One ``mmap`` range; unmapped (and unregistered from CUDA) when garbage-collected.

    Arrays viewing the range keep this object alive through their ``base``, so
    the range is unmapped only when no view of it is left.
    """

    def __init__(self, addr: int, length: int) -> None:
        self.addr = addr
        self.length = length
        self.registered = False

    def unregister(self) -> None:
        """Undo CUDA host registration, if any (idempotent)."""
        if self.registered:
            self.registered = False
            _cuda_host_unregister(self.addr)

    def __del__(self) -> None:
        try:
            self.unregister()
        finally:
            _libc.munmap(self.addr, self.length)

    def array(self, readonly: bool) -> np.ndarray:
        raw = (ctypes.c_uint8 * self.length).from_address(self.addr)
        # The ctypes array does not own the memory: make it hold the mapping instead.
        raw._asyncsync_mapping = self  # type: ignore[attr-defined]
        view: memoryview = memoryview(raw).cast("B")
        if readonly:
            # A read-only memoryview as the base: numpy then refuses to make the
            # array writable again (writing to a PROT_READ page would crash).
            view = view.toreadonly()
        return np.frombuffer(view, dtype=np.uint8)


def _prefault(mapping: _Mapping) -> None:
    if _libc.madvise(mapping.addr, mapping.length, _MADV_POPULATE_WRITE) == 0:
        return
    # An older kernel: write one byte per page (the pages are zero already).
    mapping.array(readonly=False)[::_PAGE] = 0


def _mmap(fd: int, length: int, offset: int, prot: int, populate: bool) -> _Mapping:
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
    addr = _libc.mmap(None, length, prot, flags, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return _Mapping(addr, length)


class SharedBuffer:
    """A writable shared-memory buffer owned by this process (the cache owner's side).

    Created by :meth:`allocate`; :attr:`array` is a writable ``numpy.uint8`` view
    of all of it. :meth:`release` frees the memory and closes the fd: call it
    once nothing may read the buffer anymore (no pin holds it). Views still alive
    after a release stay mapped (reads return zeros) and are unmapped when
    garbage-collected; a buffer that is never released is freed the same way.
    """

    def __init__(self, fd: int, token: str, nbytes: int, mapping: _Mapping | None) -> None:
        self.fd = fd
        self.token = token
        self.nbytes = nbytes
        self.pid = os.getpid()
        self._mapping = mapping
        self.array: np.ndarray = (
            mapping.array(readonly=False)[:nbytes]
            if mapping is not None
            else np.empty(0, dtype=np.uint8)
        )
        self.released = False

    @classmethod
    def allocate(
        cls, nbytes: int, *, pin_memory: bool = False, prefault: bool = False
    ) -> SharedBuffer:
        """A new buffer of ``nbytes`` (zero-filled).

        ``prefault`` faults every page in for writing up front, so writing into
        the buffer later pays no page faults; ``pin_memory`` page-locks it
        with CUDA host registration (which also faults every page in), so
        device-to-host copies into it are asynchronous DMA. Blocking (the kernel
        zeroes every page when prefaulting): call it in a worker thread. Raises
        :class:`~asyncsync.SharedMemoryError` if the memory cannot be had or
        ``nbytes`` is not an int in ``[0, sys.maxsize]``, :class:`~asyncsync.ConfigError`
        if a flag is not a bool.
        """
        check_int(
            nbytes, "SharedBuffer.allocate: nbytes", SharedMemoryError, low=0, high=sys.maxsize
        )
        check_bool(pin_memory, "SharedBuffer.allocate: pin_memory", ConfigError)
        check_bool(prefault, "SharedBuffer.allocate: prefault", ConfigError)
        token = secrets.token_hex(8)
        try:
            fd = os.memfd_create(NAME_PREFIX + token, os.MFD_CLOEXEC)
        except OSError as exc:
            raise SharedMemoryError(
                f"cannot create a shared buffer of {nbytes} bytes: {exc.strerror}"
            ) from None
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, nbytes)
            mapping = None
            if nbytes:
                mapping = _mmap(fd, nbytes, 0, mmap.PROT_READ | mmap.PROT_WRITE, False)
                _libc.madvise(mapping.addr, mapping.length, _MADV_HUGEPAGE)
                if pin_memory:
                    # Registration faults every page in and locks it.
                    _cuda_host_register(mapping, NAME_PREFIX + token)
                elif prefault:
                    _prefault(mapping)
        except OSError as exc:
            os.close(fd)
            raise SharedMemoryError(
                f"cannot map a shared buffer of {nbytes} bytes: {exc.strerror}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, token, nbytes, mapping)

    @property
    def pinned(self) -> bool:
        """Whether the buffer is registered with CUDA (page-locked)."""
        return self._mapping is not None and self._mapping.registered

    def region(self, offset: int = 0, nbytes: int | None = None) -> SharedRegion:
        """The :class:`SharedRegion` of ``[offset, offset + nbytes)`` (default: to the end).

        Raises :class:`~asyncsync.SharedMemoryError` naming the range unless both are
        ints and the range lies inside the buffer.
        """
        check_int(offset, "SharedBuffer.region: offset", SharedMemoryError, low=0)
        if nbytes is not None:
            check_int(nbytes, "SharedBuffer.region: nbytes", SharedMemoryError, low=0)
        size = self.nbytes - offset if nbytes is None else nbytes
        if offset < 0 or size < 0 or offset + size > self.nbytes:
            raise SharedMemoryError(
                f"range [{offset}, {offset + size}) is outside shared buffer "
                f"{NAME_PREFIX}{self.token} of {self.nbytes} bytes"
            )
        return SharedRegion(self.pid, self.fd, offset, size, self.token)

    def release(self) -> None:
        """Free the memory and close the fd (idempotent). Blocking: call it off the loop.

        Page-locking is undone and the pages are returned to the system at once,
        even if some view of the buffer is still referenced somewhere (it then
        reads zeros); the address range itself is unmapped when the last view is
        garbage-collected, which is then cheap.
        """
        if self.released:
            return
        self.released = True
        mapping = self._mapping
        if mapping is not None:
            mapping.unregister()
            _libc.madvise(mapping.addr, mapping.length, _MADV_REMOVE)
        self.array = np.empty(0, dtype=np.uint8)
        self._mapping = None
        os.close(self.fd)

    def __del__(self) -> None:
        # A buffer dropped without release(): close the fd; the mapping unmaps itself.
        if not self.released:
            self.released = True
            try:
                os.close(self.fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        state = "released" if self.released else f"fd {self.fd}"
        return f"<SharedBuffer {NAME_PREFIX}{self.token} {self.nbytes} B {state}>"


def map_region(region: SharedRegion) -> np.ndarray:
    """Map ``region`` read-only; return it as a ``numpy.uint8`` array of ``region.nbytes``.

    Opens ``/proc/<pid>/fd/<fd>`` read-only, checks that the file it opened is the
    buffer named by ``region.token`` and is large enough, and maps the range
    (pages populated up front). The array stays valid until it is
    garbage-collected, also after the owner closes the fd or dies; its bytes are
    what the owner wrote as long as the owner keeps the buffer (the reader's pin
    on the snapshot), and zeros once the owner released it. Blocking: call it in a
    worker thread for large regions. A reader that maps the same owner's buffers
    again and again keeps them in :class:`SharedMappings` instead.

    Raises :class:`~asyncsync.SharedMemoryError` naming the region when the
    process or fd is gone, the fd names another file, the range is out of
    bounds, or the mapping fails, or ``region`` is not a :class:`SharedRegion`.
    """
    check_type(region, SharedRegion, "map_region: region", SharedMemoryError)
    return _map(region, whole=False)


def _map(region: SharedRegion, whole: bool) -> np.ndarray:
    """``region`` mapped read-only; with ``whole``, all of its buffer (not only the range)."""
    path = f"/proc/{region.pid}/fd/{region.fd}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SharedMemoryError(
            f"cannot open {region} ({exc.strerror}): the owner closed it or exited, "
            "or it is on another node or another user's"
        ) from None
    try:
        # Check the file actually opened, not the path: the fd may be reused in between.
        link = os.readlink(f"/proc/self/fd/{fd}")
        if not _names(link, region):
            raise SharedMemoryError(
                f"cannot map {region}: the fd now names {link!r}, not that buffer "
                "(the owner released it)"
            )
        size = os.fstat(fd).st_size
        if region.offset < 0 or region.nbytes < 0 or region.offset + region.nbytes > size:
            raise SharedMemoryError(f"cannot map {region}: the buffer holds only {size} bytes")
        if whole:
            start, end = 0, size
        else:
            start = region.offset - region.offset % _PAGE
            end = region.offset + region.nbytes
        if end == start:
            empty = np.empty(0, dtype=np.uint8)
            empty.flags.writeable = False
            return empty
        try:
            mapping = _mmap(fd, end - start, start, mmap.PROT_READ, True)
        except OSError as exc:
            raise SharedMemoryError(f"cannot map {region}: {exc.strerror}") from None
    finally:
        os.close(fd)
    view = mapping.array(readonly=True)
    return view if whole else view[region.offset - start :]


def _names(link: str, region: SharedRegion) -> bool:
    """Whether an fd's ``/proc`` link names the buffer of ``region``."""
    expected = "/memfd:" + region.name
    return link in (expected, expected + " (deleted)")


class SharedMappings:
    """A reader's read-only maps of owners' whole buffers, kept between sessions.

    Mapping costs page-table set-up in proportion to its size (tens of ms per
    256 MiB, more than the checksum over the same bytes), and a cache owner reuses
    its pooled buffers step after step: an engine that keeps each buffer mapped
    pays that once per buffer, not once per session. :meth:`map` returns a view of
    a region inside the kept map of its buffer (mapping the buffer on first use).

    A kept map holds no memory of its own while its owner holds the buffer (the
    pages are the owner's, shared). It would hold the pages alive once the owner
    let go of them, so :meth:`prune` drops every map whose buffer the owner
    released or closed, or whose owner exited; the receiver runs it every
    second while it keeps any (see :class:`~asyncsync.StagingReceiver`). Views
    already handed out stay valid until garbage-collected, as with
    :func:`map_region`. Safe to call from several threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[SharedRegion, np.ndarray] = {}

    def map(self, region: SharedRegion) -> np.ndarray:
        """``region`` read-only, as :func:`map_region` maps it; blocking on first use."""
        check_type(region, SharedRegion, "SharedMappings.map: region", SharedMemoryError)
        key = SharedRegion(region.pid, region.fd, 0, 0, region.token)
        with self._lock:
            whole = self._maps.get(key)
        if whole is None:
            whole = _map(region, whole=True)
            with self._lock:
                whole = self._maps.setdefault(key, whole)
        if region.offset < 0 or region.nbytes < 0 or region.offset + region.nbytes > whole.size:
            raise SharedMemoryError(
                f"cannot map {region}: the buffer holds only {whole.size} bytes"
            )
        return whole[region.offset : region.offset + region.nbytes]

    def prune(self) -> int:
        """Drop the maps of buffers their owner no longer holds; return the bytes still kept.

        Blocking (unmapping a dropped buffer takes milliseconds): a worker thread.
        """
        with self._lock:
            keys = list(self._maps)
        gone = []
        for key in keys:
            try:
                held = _names(os.readlink(f"/proc/{key.pid}/fd/{key.fd}"), key)
            except OSError:
                held = False
            if not held:
                gone.append(key)
        with self._lock:
            dropped = [self._maps.pop(key) for key in gone if key in self._maps]
            kept = self.nbytes
        del dropped  # unmapped here, unless a view of it is still alive
        return kept

    def clear(self) -> None:
        """Drop every kept map (blocking, as :meth:`prune`)."""
        with self._lock:
            dropped = list(self._maps.values())
            self._maps.clear()
        del dropped

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers kept mapped."""
        return sum(int(a.size) for a in list(self._maps.values()))

    def __len__(self) -> int:
        return len(self._maps)

    def __repr__(self) -> str:
        return f"<SharedMappings {len(self)} buffers, {self.nbytes} B>"


def _cuda_host_register(mapping: _Mapping, name: str) -> None:
    import torch

    try:
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        err = cudart.cudaHostRegister(mapping.addr, mapping.length, _CUDA_HOST_REGISTER_PORTABLE)
    except (RuntimeError, AssertionError) as exc:
        # No CUDA in this build or process, or a binding that checks the result itself.
        raise SharedMemoryError(f"cannot page-lock shared buffer {name}: {exc}") from None
    if err is not None and err != cudart.cudaError.success:
        raise SharedMemoryError(
            f"cannot page-lock shared buffer {name} ({mapping.length} bytes): "
            f"{cudart.cudaGetErrorString(err)}"
        )
    mapping.registered = True


def _cuda_host_unregister(addr: int) -> None:
    try:
        import torch

        torch.cuda.cudart().cudaHostUnregister(addr)  # type: ignore[no-untyped-call]
    except (ImportError, RuntimeError, AssertionError):
        # The CUDA context (or torch) is already gone at interpreter shutdown:
        # nothing is left to undo.
        pass
