"""Shared-memory transport: one safetensors file per bucket on ``/dev/shm``.

For engines on the same node as the train actor. Each bucket is written once as
a valid safetensors file holding a single ``uint8`` tensor ``"bucket"`` (the flat
payload) and the bucket's index and checksum as JSON metadata: no pickle on
either side. Files are created with ``O_EXCL`` and mode ``0600``, named
``asyncsync-<pid>-<random token>-<index>.safetensors`` (a fixed prefix for sweeps,
the creator's pid to tell leftovers of dead processes, an unguessable token).
The engine maps the file read-only (no copy); the train side unlinks every file
when all targets have it, and again in ``finish`` on failure or cancellation.
:func:`sweep` removes files left behind by processes that crashed.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import secrets
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..buckets import Bucket, BucketManifest
from . import SessionContext

__all__ = ["PREFIX", "ShmPayload", "ShmTransport", "read_bucket_file", "sweep", "write_bucket_file"]

PREFIX = "asyncsync-"
SUFFIX = ".safetensors"
DEFAULT_DIR = "/dev/shm"
_DATA_ALIGN = 64  # payload offset inside the file, so typed views stay aligned
_METADATA_KEY = "asyncsync.manifest"


def write_bucket_file(path: str, bucket: Bucket) -> None:
    """Write ``bucket`` as a safetensors file at ``path`` (mode 0600, must not exist).

    Blocking. On any error the partial file is removed.
    """
    header = {
        "__metadata__": {_METADATA_KEY: bucket.manifest.to_json()},
        "bucket": {"dtype": "U8", "shape": [bucket.nbytes], "data_offsets": [0, bucket.nbytes]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces (allowed by the format) so the payload starts 64-byte aligned.
    pad = (-(8 + len(text))) % _DATA_ALIGN
    text += b" " * pad
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            f.write(memoryview(bucket.buffer))  # type: ignore[arg-type]
    except BaseException:
        _unlink(path)
        raise


def read_bucket_file(path: str) -> Bucket:
    """Map a bucket file read-only and return it as a :class:`Bucket` (no copy).

    The mapping stays valid after the file is unlinked. The caller verifies the
    checksum against the manifest it expects.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    manifest = BucketManifest.from_json(header["__metadata__"][_METADATA_KEY])
    start = 8 + header_len
    begin, end = header["bucket"]["data_offsets"]
    payload = np.frombuffer(mapped, dtype=np.uint8, count=end - begin, offset=start + begin)
    return Bucket(payload, manifest.index, manifest.checksum)


@dataclass(frozen=True)
class ShmPayload:
    """What the engine receives: the file to map. Loaded in an engine worker thread."""

    path: str

    def load(self, state: dict[str, Any]) -> Bucket:
        return read_bucket_file(self.path)


class ShmTransport:
    name = "shm"

    def __init__(self, directory: str = DEFAULT_DIR) -> None:
        self.directory = directory
        # Files written and not yet unlinked, per session.
        self._files: dict[str, dict[int, str]] = {}
        self._tokens: dict[str, str] = {}
        self._writes: dict[str, set[asyncio.Future[None]]] = {}

    async def start(self, session: SessionContext) -> None:
        self._files[session.session_id] = {}
        self._writes[session.session_id] = set()
        self._tokens[session.session_id] = secrets.token_hex(12)

    async def put(self, session: SessionContext, index: int, bucket: Bucket) -> Any:
        token = self._tokens[session.session_id]
        path = os.path.join(self.directory, f"{PREFIX}{os.getpid()}-{token}-{index}{SUFFIX}")
        self._files[session.session_id][index] = path
        # If this task is cancelled, the worker thread still runs to completion and
        # may create the file after the cancel: finish() waits for every write it
        # started before unlinking, so nothing is left behind.
        write = asyncio.get_running_loop().run_in_executor(None, write_bucket_file, path, bucket)
        self._writes[session.session_id].add(write)
        await asyncio.shield(write)
        self._writes[session.session_id].discard(write)
        return ShmPayload(path)

    async def release(self, session: SessionContext, index: int, payload: Any) -> None:
        # Every engine has mapped the file; the mappings outlive the name.
        path = self._files[session.session_id].pop(index, None)
        if path is not None:
            _unlink(path)

    async def finish(self, session: SessionContext, ok: bool) -> None:
        writes = self._writes.pop(session.session_id, set())
        if writes:
            await asyncio.wait(writes)
        for path in self._files.pop(session.session_id, {}).values():
            _unlink(path)
        self._tokens.pop(session.session_id, None)

    async def close(self) -> None:
        for files in self._files.values():
            for path in files.values():
                _unlink(path)
        self._files.clear()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def sweep(directory: str = DEFAULT_DIR, *, include_live: bool = False) -> list[str]:
    """Remove asyncsync bucket files left by crashed processes; return their paths.

    A file belongs to a crashed process when the pid in its name no longer
    exists. ``include_live=True`` also removes files of running processes (only
    safe when no session is in flight on this node).
    """
    removed = []
    for entry in os.scandir(directory):
        if not (entry.name.startswith(PREFIX) and entry.name.endswith(SUFFIX)):
            continue
        pid_text = entry.name[len(PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        if include_live or not _pid_alive(int(pid_text)):
            _unlink(entry.path)
            removed.append(entry.path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
