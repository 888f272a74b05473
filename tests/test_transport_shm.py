"""The shm transport's files: safetensors, 0600, unguessable names, always unlinked."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from asyncsync.buckets import pack
from asyncsync.transport import SessionContext, load_payload
from asyncsync.transport.shm import PREFIX, ShmTransport, read_bucket_file, sweep, write_bucket_file


def _bucket():  # type: ignore[no-untyped-def]
    (bucket,) = pack([("a", torch.randn(8, 8)), ("b", torch.arange(5, dtype=torch.int64))])
    return bucket


def test_file_is_valid_safetensors_mode_0600_and_maps_back(tmp_path: os.PathLike[str]) -> None:
    bucket = _bucket()
    path = os.path.join(tmp_path, f"{PREFIX}1-x-0.safetensors")
    write_bucket_file(path, bucket)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with safe_open(path, framework="np") as f:
        assert list(f.keys()) == ["bucket"]
        assert np.array_equal(f.get_tensor("bucket"), bucket.buffer)
    loaded = read_bucket_file(path)
    loaded.verify(bucket.manifest)
    os.unlink(path)
    # The read-only mapping outlives the name.
    for (_, want), (_, got) in zip(bucket.named_tensors(), loaded.named_tensors(), strict=True):
        assert got.equal(want)
    write_bucket_file(path, bucket)
    with pytest.raises(FileExistsError):
        write_bucket_file(path, bucket)  # O_EXCL: never writes through someone's file


async def test_session_files_have_random_names_and_are_unlinked(tmp_path: os.PathLike[str]) -> None:
    directory = str(tmp_path)
    transport = ShmTransport(directory)
    bucket = _bucket()
    names = []
    for session_id in ("s1", "s2"):
        ctx = SessionContext(session_id, 0, {}, (bucket.manifest,))
        await transport.start(ctx)
        payload = await transport.put(ctx, 0, bucket)
        names.append(os.path.basename(payload.path))
        got = await asyncio.to_thread(load_payload, payload, {})
        got.verify(bucket.manifest)
        await transport.finish(ctx, ok=False)
        assert os.listdir(directory) == []
    token = [n.split("-")[2] for n in names]
    assert token[0] != token[1] and len(token[0]) == 24


async def test_cancelled_put_leaves_no_file(tmp_path: os.PathLike[str]) -> None:
    transport = ShmTransport(str(tmp_path))
    (big,) = pack([("w", torch.randn(8 << 20))])  # 32 MiB: the write takes a while
    ctx = SessionContext("s", 0, {}, (big.manifest,))
    await transport.start(ctx)
    put = asyncio.create_task(transport.put(ctx, 0, big))
    await asyncio.sleep(0)
    put.cancel()
    with pytest.raises(asyncio.CancelledError):
        await put
    await transport.finish(ctx, ok=False)
    assert os.listdir(tmp_path) == []


def test_sweep_removes_files_of_dead_processes_only(tmp_path: os.PathLike[str]) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    bucket = _bucket()
    mine = os.path.join(tmp_path, f"{PREFIX}{os.getpid()}-tok-0.safetensors")
    theirs = os.path.join(tmp_path, f"{PREFIX}{dead_pid}-tok-0.safetensors")
    other = os.path.join(tmp_path, "unrelated.safetensors")
    for path in (mine, theirs, other):
        write_bucket_file(path, bucket)
    assert sweep(str(tmp_path)) == [theirs]
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(mine), "unrelated.safetensors"])
    assert sweep(str(tmp_path), include_live=True) == [mine]
    assert os.listdir(tmp_path) == ["unrelated.safetensors"]
