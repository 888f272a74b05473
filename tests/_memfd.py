"""Which shared snapshot buffers (``/memfd:asyncsync-<token>``) processes hold and map.

One copy for every suite. Read from ``/proc``, so only for processes on this
machine that the test may inspect (same user). Buffers are named by their token.
"""

from __future__ import annotations

import os
import stat

from asyncsync.sharedmem import NAME_PREFIX

_LINK = "/memfd:" + NAME_PREFIX


def open_buffers(pid: int | str = "self") -> dict[str, int]:
    """Buffers process ``pid`` holds an fd of: token -> the fd's permission bits."""
    out = {}
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return out  # exited, or not ours to read
    for fd in fds:
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
            if link.startswith(_LINK):
                mode = stat.S_IMODE(os.stat(f"{fd_dir}/{fd}").st_mode)
                out[link.removeprefix(_LINK).split()[0]] = mode
        except OSError:
            continue  # closed meanwhile
    return out


def mapped_buffers(pid: int | str = "self") -> set[str]:
    """Buffers mapped into process ``pid`` now."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split(_LINK, 1)[1].split()[0] for line in maps if _LINK in line}


def held_buffers() -> set[str]:
    """Buffers some process on this machine holds an fd of (an owner)."""
    return {token for pid in os.listdir("/proc") if pid.isdigit() for token in open_buffers(pid)}
