"""Recorded spans (kind, step, start, end) that prove what overlapped with what.

Times are ``time.time()`` wall-clock seconds so spans from different processes on
one node can be laid on one timeline (the bench writes them as a Chrome trace).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Span", "SpanLog"]


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
