"""Headless Chromium driven over the DevTools protocol on a pipe: no network, no extra packages.

``--remote-debugging-pipe`` makes Chromium read protocol commands from fd 3 and
write answers and events to fd 4, as JSON messages ended by a NUL byte. That is
all a test needs to load a local page, watch what it requested, and read its
DOM, closed shadow roots included (where mkdocs-material puts rendered diagrams).
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Debian's package installs the browser as /usr/bin/chromium (a launcher script).
CHROMIUM_NAMES = ("chromium", "chromium-browser")

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    # Any host name fails to resolve: a page that reaches for the network gets nothing.
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One Chromium process; :meth:`call` sends a command and returns its result."""

    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int):
        self._proc = proc
        self._out = to_browser
        self._in = from_browser
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read(timeout_s=30.0)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                result: dict[str, Any] = answer.get("result", {})
                return result
            self.events.append(answer)

    def _read(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._in], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer within {timeout_s:.0f} s")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit code {self._proc.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        parsed: dict[str, Any] = json.loads(message)
        return parsed

    def open(self, url: str) -> str:
        """Open ``url`` in a new tab with network events on; returns the tab's session id."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        self.call("Network.enable", session=session)
        self.call("Page.enable", session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        return str(session)

    def requested_urls(self, session: str) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("sessionId") == session and e.get("method") == "Network.requestWillBeSent"
        ]

    def dom(self, session: str) -> dict[str, Any]:
        """The whole DOM tree, shadow roots (closed ones too) and frames included."""
        root: dict[str, Any] = self.call(
            "DOM.getDocument", {"depth": -1, "pierce": True}, session=session
        )["root"]
        return root


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node under ``node`` (itself included), through children and shadow roots."""
    yield node
    for child in [*node.get("children", ()), *node.get("shadowRoots", ())]:
        yield from walk(child)


def classes(node: dict[str, Any]) -> set[str]:
    attrs = node.get("attributes", [])
    values = dict(zip(attrs[::2], attrs[1::2], strict=True))
    return set(values.get("class", "").split())


@contextmanager
def chromium(binary: str) -> Iterator[Browser]:
    """Start headless Chromium with an empty profile; stop it and remove the profile after."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    # Above 4, so the redirections below never overwrite or close each other.
    for low in (to_browser_r, from_browser_w):
        high = fcntl.fcntl(low, fcntl.F_DUPFD, 10)
        os.close(low)
        if low == to_browser_r:
            to_browser_r = high
        else:
            from_browser_w = high
    # The launcher gets our pipe ends as fds 3 (commands in) and 4 (answers out).
    command = " ".join(
        [
            'exec "$0"',
            *(f"'{flag}'" for flag in FLAGS),
            f"'--user-data-dir={profile}'",
            "--remote-debugging-pipe",
            "about:blank",
            f"3<&{to_browser_r} 4>&{from_browser_w} {to_browser_r}<&- {from_browser_w}>&-",
        ]
    )
    proc = subprocess.Popen(
        ["bash", "-c", command, binary],
        pass_fds=(to_browser_r, from_browser_w),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(to_browser_r)
    os.close(from_browser_w)
    try:
        yield Browser(proc, to_browser_w, from_browser_r)
    finally:
        os.close(to_browser_w)  # Chromium exits when its command pipe closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the browser and its helper processes
            proc.wait(timeout=10)
        os.close(from_browser_r)
        shutil.rmtree(profile, ignore_errors=True)
