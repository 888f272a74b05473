"""Shared-memory buffers: memfd on the owner's side, read-only maps in other processes."""

from __future__ import annotations

import fcntl
import gc
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from _memfd import mapped_buffers, open_buffers

from asyncsync.buckets import checksum
from asyncsync.errors import SharedMemoryError
from asyncsync.sharedmem import NAME_PREFIX, SharedBuffer, SharedMappings, SharedRegion, map_region


def pattern(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def test_buffer_is_a_private_close_on_exec_memfd_and_nothing_lands_in_dev_shm() -> None:
    before = set(os.listdir("/dev/shm"))
    buffer = SharedBuffer.allocate(1 << 20, prefault=True)
    try:
        link = os.readlink(f"/proc/self/fd/{buffer.fd}")
        assert link == f"/memfd:{NAME_PREFIX}{buffer.token} (deleted)"
        assert stat.S_IMODE(os.fstat(buffer.fd).st_mode) == 0o600
        assert fcntl.fcntl(buffer.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert buffer.array.flags.writeable and buffer.array.nbytes == 1 << 20
        assert not buffer.array.any()  # fresh memory reads zero
    finally:
        buffer.release()
    assert set(os.listdir("/dev/shm")) == before


def test_region_maps_read_only_with_the_owners_bytes_and_survives_release() -> None:
    buffer = SharedBuffer.allocate(3 << 20)
    data = pattern(buffer.nbytes)
    buffer.array[:] = data
    region = buffer.region(12345, 1 << 20)  # not page aligned
    assert pickle.loads(pickle.dumps(region)) == region
    assert str(region).startswith(f"shared region {NAME_PREFIX}{buffer.token} [12345, ")
    view = map_region(region)
    assert view.nbytes == 1 << 20
    assert np.array_equal(view, data[12345 : 12345 + (1 << 20)])
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view.flags.writeable = True  # a read-only page could not take the write
    # The owner writes again: the mapping is the same memory, not a copy.
    buffer.array[12345] ^= 0xFF
    assert view[0] == data[12345] ^ 0xFF
    # Released by the owner: the memory is returned, the view stays safe to read.
    buffer.release()
    assert not view.any()
    assert buffer.token in mapped_buffers()
    del view
    gc.collect()
    assert buffer.token not in mapped_buffers()
    assert buffer.token not in open_buffers()


def test_empty_region_and_bad_ranges() -> None:
    buffer = SharedBuffer.allocate(4096)
    try:
        assert map_region(buffer.region(4096, 0)).nbytes == 0
        with pytest.raises(SharedMemoryError, match=r"range \[4000, 5000\) is outside"):
            buffer.region(4000, 1000)
        forged = SharedRegion(os.getpid(), buffer.fd, 0, 8192, buffer.token)
        with pytest.raises(SharedMemoryError, match="holds only 4096 bytes"):
            map_region(forged)
    finally:
        buffer.release()


def test_a_released_or_reused_fd_is_refused_naming_the_region() -> None:
    old = SharedBuffer.allocate(4096)
    region = old.region()
    old.release()
    with pytest.raises(SharedMemoryError, match=rf"cannot open shared region {region.name}"):
        map_region(region)
    # The fd number is taken again by another buffer: the token tells them apart.
    new = SharedBuffer.allocate(4096)
    try:
        assert new.fd == region.fd
        with pytest.raises(SharedMemoryError, match=rf"{region.name}.*names '/memfd:{NAME_PREFIX}"):
            map_region(region)
        # And by a file that is not a buffer at all.
    finally:
        new.release()
    with open(__file__) as f:
        assert f.fileno() == region.fd
        with pytest.raises(SharedMemoryError, match="not that buffer"):
            map_region(region)
    with pytest.raises(SharedMemoryError, match="pid 999999999"):
        map_region(SharedRegion(999_999_999, 3, 0, 1, "0" * 16))


OWNER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from asyncsync.sharedmem import SharedBuffer
    buffer = SharedBuffer.allocate(int(sys.argv[1]), prefault=True)
    buffer.array[:] = np.random.default_rng(7).integers(0, 256, buffer.nbytes, dtype=np.uint8)
    r = buffer.region(0)
    print(r.pid, r.fd, r.offset, r.nbytes, r.token, flush=True)
    time.sleep(600)
    """
)


def test_another_process_maps_it_and_a_killed_owner_leaves_the_view_valid() -> None:
    nbytes = 5 << 20
    with subprocess.Popen(
        [sys.executable, "-c", OWNER, str(nbytes)], stdout=subprocess.PIPE, text=True
    ) as owner:
        region, view, want = _map_then_kill(owner, nbytes)
    token = region.token
    # The owner is gone (and never cleaned up): the mapping still holds the bytes.
    assert checksum(view) == checksum(want)
    with pytest.raises(SharedMemoryError, match="owner closed it or exited"):
        map_region(region)
    del view
    gc.collect()
    # Nothing is left anywhere: the last mapping was the memory's last reference.
    assert token not in mapped_buffers()
    assert not any(token in name for name in os.listdir("/dev/shm"))


def _map_then_kill(
    owner: subprocess.Popen[str], nbytes: int
) -> tuple[SharedRegion, np.ndarray, np.ndarray]:
    try:
        assert owner.stdout is not None
        pid, fd, offset, size, token = owner.stdout.readline().split()
        region = SharedRegion(int(pid), int(fd), int(offset), int(size), token)
        view = map_region(region)
        want = np.random.default_rng(7).integers(0, 256, nbytes, dtype=np.uint8)
        assert checksum(view) == checksum(want)
        return region, view, want
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()


def test_read_only_view_pickles_by_value() -> None:
    buffer = SharedBuffer.allocate(1 << 16)
    try:
        buffer.array[:] = pattern(buffer.nbytes, seed=3)
        view = map_region(buffer.region())
        copy = pickle.loads(pickle.dumps(view, protocol=5))
        assert np.array_equal(copy, view)
    finally:
        buffer.release()


@pytest.mark.skipif(torch.cuda.is_available(), reason="page-locking works with CUDA")
def test_page_locking_without_cuda_is_a_typed_error_and_leaks_nothing() -> None:
    before = set(open_buffers())
    with pytest.raises(SharedMemoryError, match=rf"cannot page-lock shared buffer {NAME_PREFIX}"):
        SharedBuffer.allocate(1 << 20, pin_memory=True)
    gc.collect()
    assert set(open_buffers()) == before


# ------------------------------------------------------------ kept maps (engine side)


def _mapping_count(token: str) -> int:
    """How many separate maps of buffer ``token`` this process has."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"/memfd:{NAME_PREFIX}{token}" in line)


def test_kept_maps_map_each_buffer_once_and_serve_every_region_from_it() -> None:
    buffer = SharedBuffer.allocate(3 * 4096 + 100)
    buffer.array[:] = pattern(buffer.nbytes)
    owner_maps = _mapping_count(buffer.token)
    mappings = SharedMappings()
    try:
        regions = [buffer.region(0, 4096), buffer.region(4096, 5000), buffer.region(9096, 3292)]
        for _ in range(3):  # session after session: no new map
            for region in regions:
                view = mappings.map(region)
                assert not view.flags.writeable
                assert np.array_equal(
                    view, buffer.array[region.offset : region.offset + region.nbytes]
                )
            assert _mapping_count(buffer.token) == owner_maps + 1
        assert len(mappings) == 1 and mappings.nbytes == buffer.nbytes
        # The same bytes through the same map: what the owner writes next is seen.
        first = mappings.map(regions[0])
        assert np.shares_memory(first, mappings.map(regions[0]))
        buffer.array[:4096] = 7
        assert (first == 7).all()
        bad = SharedRegion(buffer.pid, buffer.fd, buffer.nbytes - 10, 11, buffer.token)
        with pytest.raises(SharedMemoryError, match="holds only"):
            mappings.map(bad)
    finally:
        buffer.release()


def test_prune_keeps_held_buffers_and_drops_released_ones() -> None:
    held = SharedBuffer.allocate(1 << 20)
    gone = SharedBuffer.allocate(1 << 20)
    mappings = SharedMappings()
    try:
        mappings.map(held.region(0, 10))
        mappings.map(gone.region(0, 10))
        assert mappings.prune() == 2 << 20
        gone.release()
        assert mappings.prune() == 1 << 20 == mappings.nbytes
        gc.collect()
        assert gone.token not in mapped_buffers()
        assert _mapping_count(held.token) == 2  # the owner's and the kept one
        mappings.clear()
        assert len(mappings) == 0 and _mapping_count(held.token) == 1
    finally:
        held.release()
        gone.release()


def test_prune_drops_the_maps_of_an_owner_that_died() -> None:
    """A killed owner's buffer lives on only in kept maps: prune lets it go."""
    nbytes = 5 << 20
    mappings = SharedMappings()
    with subprocess.Popen(
        [sys.executable, "-c", OWNER, str(nbytes)], stdout=subprocess.PIPE, text=True
    ) as owner:
        try:
            assert owner.stdout is not None
            pid, fd, offset, size, token = owner.stdout.readline().split()
            region = SharedRegion(int(pid), int(fd), int(offset), int(size), token)
            view = mappings.map(region)
            want = np.random.default_rng(7).integers(0, 256, nbytes, dtype=np.uint8)
            assert checksum(view) == checksum(want)
            del view
            assert mappings.prune() == nbytes  # the owner still holds it
        finally:
            owner.send_signal(signal.SIGKILL)
            owner.wait()
    assert token in mapped_buffers()
    assert mappings.prune() == 0
    gc.collect()
    assert token not in mapped_buffers()
