"""What ``asyncsync status`` shows: the train actors of a running cluster and their fleets.

A train actor is found by its name: create it with ``name=`` (and, usually, a
``namespace=``) in the options :func:`~asyncsync.train_actor` passes to Ray::

    Trainer = train_actor(MyTrainer, name="trainer", namespace="rl", lifetime="detached")

:func:`find_train_actors` lists the cluster's named actors
(``ray.util.list_named_actors(all_namespaces=True)``) and keeps those whose
class has ``fleet_status``; :func:`fetch` asks each for its
:class:`~asyncsync.metrics.FleetStatus`. Unnamed train actors cannot be found
from outside the program that made them.

Everything here is synchronous and blocks on Ray: call it from a plain thread
(the command's main thread), never from an event loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .metrics import FleetStatus

__all__ = ["Found", "fetch", "find_train_actors", "render", "to_json", "watch"]

_HEALTH_STYLE = {
    "serving": "green",
    "catching_up": "yellow",
    "quarantined": "bold red",
    "gone": "dim",
}


@dataclass(frozen=True)
class Found:
    """One named train actor and what it answered (``status``) or why not (``error``)."""

    namespace: str
    name: str
    status: FleetStatus | None
    error: str | None = None


def find_train_actors(namespace: str | None = None) -> list[tuple[str, str, Any]]:
    """``(namespace, name, handle)`` of every named train actor (in ``namespace`` if given)."""
    import ray

    found = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        ns, name = entry["namespace"], entry["name"]
        if namespace is not None and ns != namespace:
            continue
        try:
            handle = ray.get_actor(name, namespace=ns)
        except ValueError:  # gone between the listing and now
            continue
        # A handle knows its class's methods: no remote call for other actors.
        if hasattr(handle, "fleet_status"):
            found.append((ns, name, handle))
    return sorted(found, key=lambda f: (f[0], f[1]))


def fetch(namespace: str | None = None, timeout_s: float = 10.0) -> list[Found]:
    """Every named train actor's status; one that does not answer within ``timeout_s``
    is listed with the error."""
    import ray

    actors = find_train_actors(namespace)
    refs = [handle.fleet_status.remote() for _, _, handle in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    done = set(ready)
    out = []
    for (ns, name, _), ref in zip(actors, refs, strict=True):
        if ref not in done:
            ray.cancel(ref)
            out.append(Found(ns, name, None, f"no answer within {timeout_s:g}s"))
            continue
        try:
            out.append(Found(ns, name, ray.get(ref)))
        except Exception as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            out.append(Found(ns, name, None, f"{type(exc).__name__}: {lines[-1] if lines else ''}"))
    return out


def to_json(found: Sequence[Found]) -> dict[str, Any]:
    """Machine-readable: ``{"taken_at": ..., "train_actors": [...]}`` (times are Unix seconds)."""
    actors = []
    for f in found:
        entry: dict[str, Any] = {"namespace": f.namespace, "name": f.name, "error": f.error}
        if f.status is not None:
            entry.update(dataclasses.asdict(f.status))
            last = f.status.last_session
            if last is not None:
                entry["last_session"]["bytes_per_s"] = last.bytes_per_s
        actors.append(entry)
    return {"taken_at": time.time(), "train_actors": actors}


def render(found: Sequence[Found], now: float | None = None) -> RenderableType:
    """One table per train actor: its engines, and a caption with its sessions."""
    now = time.time() if now is None else now
    if not found:
        return Text(
            "no named train actor found (create it with name= and namespace=, see "
            "'asyncsync status --help')",
            style="yellow",
        )
    parts: list[RenderableType] = []
    for f in found:
        title = f"{f.namespace}/{f.name}"
        if f.status is None:
            parts.append(Text(f"{title}: {f.error}", style="red"))
            continue
        parts.append(_table(title, f.status, now))
    return Group(*parts)


def _table(title: str, status: FleetStatus, now: float) -> Table:
    table = Table(title=f"{title}  ready step {status.ready_step}", title_justify="left")
    for column in ("engine", "node", "health", "version", "behind", "quarantines", "since"):
        table.add_column(column, justify="right" if column in ("version", "behind") else "left")
    for e in status.engines:
        table.add_row(
            e.name,
            (e.node_id or "-")[:8],
            Text(e.health, style=_HEALTH_STYLE.get(e.health, "")),
            "-" if e.version is None else str(e.version),
            "-" if e.staleness is None else str(e.staleness),
            str(e.quarantines),
            _ago(now - e.since),
        )
    last = status.last_session
    if last is None:
        caption = "no session yet"
    else:
        caption = (
            f"last {last.kind}: {last.result}, step {last.step}, {_ago(now - last.ended_at)} ago, "
            f"{last.seconds:.2f} s, {_rate(last.bytes_per_s)}"
        )
    caption += (
        f" | sessions {status.sessions} (failed {status.failed_sessions}), catch-ups "
        f"{status.catch_ups}, refused {status.admissions_refused}"
    )
    table.caption = caption
    table.caption_justify = "left"
    return table


def watch(
    source: Callable[[], Sequence[Found]],
    console: Console,
    interval_s: float,
    frames: int | None = None,
) -> None:
    """Show ``source()`` live, redrawn in place every ``interval_s`` (no flicker: one
    render per frame, no automatic refresh), until interrupted or after ``frames``."""
    shown = 0
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while frames is None or shown < frames:
            if shown:
                time.sleep(interval_s)
            live.update(render(source()), refresh=True)
            shown += 1


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _rate(bytes_per_s: float) -> str:
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= size:
            return f"{bytes_per_s / size:.1f} {unit}"
    return f"{bytes_per_s:.0f} B/s"
