"""The one way any part calls an engine: typed, bounded, cancellable, errors named.

Sessions, transports and the fleet's keeper reach engines only through an
:class:`EngineClient`. Each of its methods is one call of the engine protocol
(:class:`~asyncsync.protocol.Receiver`), named through that interface, so mypy
checks every call site; no part names an engine method in a string.

Every call:

- is bounded: control calls by :attr:`Deadlines.call_s`, probes by
  :attr:`Deadlines.probe_s`, aborts by :attr:`Deadlines.abort_s`; ``receive`` and
  ``commit`` by the session that waits for them;
- cancels the remote call when its waiter is cancelled or times out (except a
  commit, which must run to its end: the engine may be copying into the model);
- raises any failure (an engine that died, hung, raised, or is not an engine at
  all) as a :class:`~asyncsync.SessionError` naming the engine and the step when
  it belongs to a session (:class:`~asyncsync.SessionTimeoutError` for a bound),
  else as a :class:`~asyncsync.FleetError`;
- reports each failure to ``on_failure`` (the fleet takes the engine out of
  routing at its first failed call, before anyone decides what to do about it).

:class:`Deadlines` holds every time bound on engine calls, set once per train
actor and passed down; a session's own bounds are in its
:class:`~asyncsync.SyncPlan`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ._checks import is_number
from ._primitives import shielded
from .buckets import BucketManifest
from .errors import (
    ConfigError,
    DeltaBaseError,
    FleetError,
    SessionError,
    SessionTimeoutError,
    first_session_error,
    last_line,
)
from .protocol import DeltaHeader, EngineInfo, Receiver, ReceiverStats

__all__ = ["Deadlines", "EngineClient", "SessionTag"]

T = TypeVar("T")


@dataclass(frozen=True)
class Deadlines:
    """Every bound on a call to an engine, in seconds (one set per train actor).

    Args:
        call_s: a control call (``begin``, ``engine_info`` when a session needs
            it, a transport's set-up).
        abort_s: delivering ``abort`` after a failure (best effort; an engine that
            misses it drops the staging when its time to live passes).
        probe_interval_s: how often the fleet's keeper probes every engine.
        probe_s: one probe (``None``: ``min(call_s, max(5, 5 * probe_interval_s))``:
            an engine that cannot answer within a few probe intervals is hung for
            routing purposes, and must not hold a keeper's round for a whole call
            bound).

    Each is checked here (:class:`~asyncsync.ConfigError`).
    """

    call_s: float = 60.0
    abort_s: float = 10.0
    probe_interval_s: float = 2.0
    probe_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("call_s", "abort_s", "probe_interval_s", "probe_s"):
            value = getattr(self, name)
            if value is None and name == "probe_s":
                continue
            if not is_number(value) or not value > 0 or value == float("inf"):
                raise ConfigError(f"Deadlines.{name} must be positive seconds, got {value!r}")

    @property
    def probe(self) -> float:
        """The bound on one probe."""
        if self.probe_s is not None:
            return self.probe_s
        return min(self.call_s, max(5.0, 5 * self.probe_interval_s))


@dataclass(frozen=True)
class SessionTag:
    """Names the session a call belongs to, for errors (``None`` fields: not known)."""

    session_id: str | None = None
    step: int | None = None

    def prefix(self) -> str:
        if self.session_id is None:
            return ""
        return f"session {self.session_id} (step {self.step}): "


class EngineClient:
    """Calls engines by name.

    Args:
        lookup: name -> the engine's handle (a Ray actor handle of a
            :class:`~asyncsync.protocol.Receiver`); raises
            :class:`~asyncsync.FleetError` for an unknown name.
        deadlines: the bounds of every call.
        on_failure: told ``(name, error)`` of every failed call (not of a
            cancelled one), before the error is raised.

    Use from one event loop (the train actor's).
    """

    def __init__(
        self,
        lookup: Callable[[str], Any],
        deadlines: Deadlines,
        on_failure: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self._lookup = lookup
        self.deadlines = deadlines
        self._on_failure = on_failure

    @classmethod
    def of(cls, handles: Mapping[str, Any], deadlines: Deadlines | None = None) -> EngineClient:
        """A client of a fixed set of engines (an ad-hoc session's, or a test's)."""
        handles = dict(handles)

        def lookup(name: str) -> Any:
            try:
                return handles[name]
            except KeyError:
                raise FleetError(
                    f"engine {name!r} is not known (engines: {sorted(handles)})"
                ) from None

        return cls(lookup, deadlines or Deadlines())

    # ----------------------------------------------------------------- the protocol

    async def engine_info(
        self, name: str, *, session: SessionTag | None = None, probe: bool = True
    ) -> EngineInfo:
        """Ask ``name`` what it is and serves (a probe's bound, or a control call's)."""
        bound = self.deadlines.probe if probe else self.deadlines.call_s
        info: EngineInfo = await self._call(name, Receiver.engine_info, (), bound, "probe", session)
        return info

    async def begin(
        self,
        name: str,
        session: SessionTag,
        manifest: Sequence[BucketManifest],
        ttl_s: float,
    ) -> EngineInfo:
        """Open ``session`` (its id and step) on ``name``; what the engine reports."""
        assert session.session_id is not None and session.step is not None
        info: EngineInfo = await self._call(
            name,
            Receiver.begin,
            (session.session_id, session.step, manifest, ttl_s),
            self.deadlines.call_s,
            "begin",
            session,
        )
        return info

    async def begin_delta(
        self,
        name: str,
        session: SessionTag,
        manifest: Sequence[BucketManifest],
        header: DeltaHeader,
        ttl_s: float,
    ) -> EngineInfo | None:
        """Open ``session`` on ``name`` as a delta on ``header``'s base; what the
        engine reports, or ``None`` when it refused the base
        (:class:`~asyncsync.DeltaBaseError`: nothing opened, send it the full snapshot)."""
        assert session.session_id is not None and session.step is not None
        if not hasattr(self._lookup(name), Receiver.begin_delta.__name__):
            return None  # an engine written before deltas: it takes full snapshots
        try:
            info: EngineInfo = await self._call(
                name,
                Receiver.begin_delta,
                (session.session_id, session.step, manifest, header, ttl_s),
                self.deadlines.call_s,
                "begin_delta",
                session,
            )
        except SessionError as exc:
            if isinstance(exc.__cause__, DeltaBaseError):
                return None
            raise
        return info

    async def receive(
        self, name: str, session: SessionTag, index: int, payload: Any, what: str
    ) -> int:
        """Deliver bucket ``index``; unbounded here (the session holds the bound)."""
        assert session.session_id is not None
        size: int = await self._call(
            name, Receiver.receive, (session.session_id, index, payload), None, what, session
        )
        return size

    async def commit(self, name: str, session: SessionTag) -> int:
        """Commit ``session`` on ``name``; the version it serves now.

        Never cancelled on the engine: cancelling this wait leaves the commit
        running to its end (the engine may be copying into the model).
        """
        assert session.session_id is not None
        version: int = await self._call(
            name,
            Receiver.commit,
            (session.session_id,),
            None,
            "commit",
            session,
            cancel_remote=False,
        )
        return version

    async def transport_setup(
        self,
        name: str,
        transport: str,
        config: Any,
        *,
        bound_s: float,
        what: str,
        session: SessionTag,
    ) -> Any:
        """Run ``transport``'s engine-side set-up on ``name`` with ``config``."""
        return await self._call(
            name, Receiver.transport_setup, (transport, config), bound_s, what, session
        )

    async def receiver_stats(self, name: str) -> ReceiverStats:
        """``name``'s counters and timings (a probe's bound)."""
        stats: ReceiverStats = await self._call(
            name, Receiver.receiver_stats, (), self.deadlines.probe, "receiver_stats", None
        )
        return stats

    async def abort(self, handles: Mapping[str, Any], session_id: str) -> None:
        """Deliver ``abort(session_id)`` to these engines: bounded, best effort, and
        completed in the background even if this wait is cancelled.

        Takes handles, not names: an engine removed from the fleet mid-session still
        gets the abort of the session it was part of.
        """
        method = Receiver.abort.__name__

        async def one(handle: Any) -> None:
            try:
                await getattr(handle, method).remote(session_id)
            except Exception:  # a dead engine has nothing to abort
                pass

        async def every() -> None:
            try:
                async with asyncio.timeout(self.deadlines.abort_s):
                    await asyncio.gather(*(one(h) for h in handles.values()))
            except TimeoutError:
                pass

        if handles:
            await shielded(every())

    def handle(self, name: str) -> Any:
        """The handle of ``name`` (for :meth:`abort`, and to compare handles)."""
        return self._lookup(name)

    # ----------------------------------------------------------------- many engines

    @staticmethod
    async def fan_out(names: Iterable[str], call: Callable[[str], Awaitable[T]]) -> dict[str, T]:
        """``call(name)`` for every engine at once; the first failure cancels the rest
        (on the engines too) and is raised."""
        results: dict[str, T] = {}

        async def one(name: str) -> None:
            results[name] = await call(name)

        try:
            async with asyncio.TaskGroup() as group:
                for name in names:
                    group.create_task(one(name))
        except BaseExceptionGroup as errors:
            raise first_session_error(errors) from None
        return results

    @staticmethod
    async def settle(
        names: Iterable[str], call: Callable[[str], Awaitable[T]]
    ) -> dict[str, T | BaseException]:
        """``call(name)`` for every engine at once; wait for all; each result or its error."""
        names = list(names)
        outcomes = await asyncio.gather(*(call(n) for n in names), return_exceptions=True)
        return dict(zip(names, outcomes, strict=True))

    # ----------------------------------------------------------------- one call

    async def _call(
        self,
        name: str,
        method: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        timeout_s: float | None,
        what: str,
        session: SessionTag | None,
        cancel_remote: bool = True,
    ) -> Any:
        tag = session or SessionTag()
        handle = self._lookup(name)
        try:
            ref = getattr(handle, method.__name__).remote(*args)
        except Exception as exc:  # a wrong handle: no such method, or not an actor at all
            raise self._failed(
                tag,
                name,
                what,
                f"it is not an engine ({type(handle).__name__} has no remote "
                f"{method.__name__!r}: {type(exc).__name__})",
                exc,
            ) from exc
        timer = asyncio.timeout(timeout_s)
        try:
            async with timer:
                return await ref
        except asyncio.CancelledError:
            if cancel_remote:
                _cancel(ref)
            raise
        except Exception as exc:
            if timer.expired():
                if cancel_remote:
                    _cancel(ref)
                raise self._failed(
                    tag, name, what, f"no answer within {timeout_s:g}s", exc, timeout=True
                ) from exc
            raise self._failed(
                tag, name, what, f"{type(exc).__name__}: {last_line(exc)}", exc
            ) from exc

    def _failed(
        self,
        tag: SessionTag,
        name: str,
        what: str,
        detail: str,
        cause: BaseException,
        *,
        timeout: bool = False,
    ) -> Exception:
        message = f"{tag.prefix()}engine {name!r} failed in {what}: {detail}"
        error: Exception
        if tag.session_id is None:
            error = FleetError(message)
        else:
            cls = SessionTimeoutError if timeout else SessionError
            error = cls(message, session_id=tag.session_id, step=tag.step, engine=name)
        error.__cause__ = cause
        if self._on_failure is not None:
            self._on_failure(name, error)
        return error


def _cancel(ref: object) -> None:
    import ray

    if isinstance(ref, ray.ObjectRef):
        try:
            ray.cancel(ref)
        except Exception:  # best effort: never replace the error being handled
            pass
