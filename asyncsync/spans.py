"""Recorded spans (kind, step, start, end) that prove what overlapped with what.

Times are ``time.time()`` wall-clock seconds so spans from different processes on
one node can be laid on one timeline: :func:`write_chrome_trace` writes them as the
Chrome/Perfetto trace of the demo and of the bench.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Lane",
    "Span",
    "SpanLog",
    "chrome_trace",
    "lanes_by_kind",
    "write_chrome_trace",
    "write_sync_trace",
]


@dataclass(frozen=True)
class Span:
    kind: str
    step: int | None
    start: float
    end: float
    ok: bool = True

    def overlaps(self, other: Span) -> bool:
        return self.start < other.end and other.start < self.end


class SpanLog:
    """A bounded log of the most recent spans (oldest dropped first)."""

    def __init__(self, maxlen: int = 4096) -> None:
        self._spans: deque[Span] = deque(maxlen=maxlen)

    @contextmanager
    def span(self, kind: str, step: int | None = None) -> Iterator[None]:
        start = time.time()
        ok = False
        try:
            yield
            ok = True
        finally:
            self._spans.append(Span(kind, step, start, time.time(), ok))

    def snapshot(self) -> list[Span]:
        return list(self._spans)


Lane = tuple[str, Iterable[Span]]
"""One row of a trace: its name and its spans."""


def chrome_trace(processes: Iterable[tuple[str, Iterable[Lane]]], origin: float) -> dict[str, Any]:
    """Chrome-trace / Perfetto JSON (open in ui.perfetto.dev or chrome://tracing).

    ``processes`` are ``(name, lanes)`` pairs, shown in that order; each lane is one
    thread of its process, in order. Every span is a complete event named
    ``"<kind> <step>"`` with ``cat`` = its kind, ``ts`` in microseconds since
    ``origin`` (a ``time.time()`` value) and ``args`` = its step and whether it
    ended without an error.
    """
    events: list[dict[str, Any]] = []
    for pid, (process, lanes) in enumerate(processes, start=1):
        events.append(_meta("process_name", pid, 0, {"name": process}))
        events.append(_meta("process_sort_index", pid, 0, {"sort_index": pid}))
        for tid, (lane, spans) in enumerate(lanes, start=1):
            events.append(_meta("thread_name", pid, tid, {"name": lane}))
            events.append(_meta("thread_sort_index", pid, tid, {"sort_index": tid}))
            events.extend(
                {
                    "name": f"{span.kind} {span.step}",
                    "cat": span.kind,
                    "ph": "X",
                    "ts": round((span.start - origin) * 1e6, 1),
                    "dur": round(max(0.0, span.end - span.start) * 1e6, 1),
                    "pid": pid,
                    "tid": tid,
                    "args": {"step": span.step, "ok": span.ok},
                }
                for span in spans
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_chrome_trace(
    path: Path | str, processes: Iterable[tuple[str, Iterable[Lane]]], origin: float
) -> Path:
    """Write :func:`chrome_trace` of ``processes`` to ``path`` (blocking file I/O)."""
    out = Path(path)
    out.write_text(json.dumps(chrome_trace(processes, origin), allow_nan=False) + "\n")
    return out


def lanes_by_kind(spans: Iterable[Span]) -> list[Lane]:
    """One lane per span kind (``build``, ``session``, ...), in the order kinds first appear."""
    lanes: dict[str, list[Span]] = {}
    for span in spans:
        lanes.setdefault(span.kind, []).append(span)
    return list(lanes.items())


def write_sync_trace(
    path: Path | str, trainer_spans: Iterable[Span], driver_spans: Iterable[Span] = ()
) -> Path:
    """Write a train actor's spans (its ``sync_spans()``) as a Chrome/Perfetto trace.

    The train actor's builds and sessions are one lane each, so their overlap shows
    the way the demo shows it; ``driver_spans`` (e.g. the train loop's waits that
    :class:`~asyncsync.SyncCoordinator` records) are a second process above it.
    Times are relative to the earliest span. Blocking file I/O: from an event loop,
    run it in a thread.
    """
    trainer, driver = list(trainer_spans), list(driver_spans)
    origin = min((s.start for s in [*trainer, *driver]), default=time.time())
    processes: list[tuple[str, list[Lane]]] = []
    if driver:
        processes.append(("driver", lanes_by_kind(driver)))
    processes.append(("train actor", lanes_by_kind(trainer)))
    return write_chrome_trace(path, processes, origin)


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args}
