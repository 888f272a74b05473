"""The fleet: the engines a train actor keeps in sync, and every call made to them.

An :class:`EngineFleet` lives on the train actor's event loop. It holds each
engine's handle and what the engine itself last reported (:class:`EngineInfo`:
incarnation, node, served version) plus a health:

``serving``       in routing; normal sessions bring it the newest step
``catching_up``   new, restarted, or left behind by a session that went on without
                  it; a catch-up session brings it the newest ready step first
``quarantined``   failed, hung or unreachable; out of routing until a catch-up
                  session (retried with back-off) brings it the newest ready step
``gone``          died for good (Ray will not restart it); removed engines leave
                  the fleet altogether

Versions always come from the engine (``engine_info``, ``begin``, ``commit``),
never from what a session meant to do. :meth:`EngineFleet.view` answers "which
engines serve which version" at any time, so an orchestrator can route
version-pinned requests and keep an engine out of routing until its weights are
there.

Every call to an engine goes through :meth:`EngineFleet.call`: bounded in time,
the remote call cancelled when its waiter is cancelled, and any failure (an engine
that died, hung, raised, or is not a receiver at all) raised as a
:class:`~asyncsync.SessionError` (inside a session) or
:class:`~asyncsync.FleetError` (outside one) that names the engine.

Membership changes at runtime (:meth:`EngineFleet.add`, :meth:`EngineFleet.remove`)
while sessions run. With a keeper started (:meth:`EngineFleet.start`, done by the
train actor), the fleet probes its engines every ``probe_interval_s``, notices
restarts (a new incarnation) and deaths, and runs catch-up sessions for engines
that are not serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._checks import is_number
from ._primitives import shielded
from .errors import (
    ConfigError,
    FleetError,
    SessionError,
    SessionTimeoutError,
    first_session_error,
    last_line,
)
from .receiver import EngineInfo

__all__ = ["EngineFleet", "EngineState", "FleetView", "Health", "SessionTag"]

_MAX_BACKOFF_S = 30.0


class Health(enum.StrEnum):
    """Where an engine stands in its fleet (see the module docstring)."""

    SERVING = "serving"
    CATCHING_UP = "catching_up"
    QUARANTINED = "quarantined"
    GONE = "gone"


@dataclass(frozen=True)
class EngineState:
    """One engine as its fleet sees it; ``version`` is what the engine last reported."""

    name: str
    health: Health
    version: int | None
    incarnation: str | None
    node_id: str | None
    reason: str | None
    since: float


@dataclass(frozen=True)
class FleetView:
    """Every engine of a fleet at one instant (a frozen copy; safe to send anywhere)."""

    engines: Mapping[str, EngineState]

    def serving(self) -> dict[str, int | None]:
        """Engine -> version, for the engines in routing (health ``serving``)."""
        return {n: s.version for n, s in self.engines.items() if s.health is Health.SERVING}

    def by_version(self) -> dict[int | None, tuple[str, ...]]:
        """Version -> the serving engines that serve it (route version-pinned requests here)."""
        out: dict[int | None, list[str]] = {}
        for name, version in self.serving().items():
            out.setdefault(version, []).append(name)
        return {v: tuple(names) for v, names in out.items()}

    def oldest_serving(self) -> int | None:
        """The oldest version any serving engine serves (``-1`` for initial weights).

        ``None`` when no engine is serving.
        """
        versions = [-1 if v is None else v for v in self.serving().values()]
        return min(versions) if versions else None

    def names(self, *health: Health) -> tuple[str, ...]:
        """Engines with any of these healths (every engine when none is given)."""
        return tuple(n for n, s in self.engines.items() if not health or s.health in health)

    def __repr__(self) -> str:
        parts = [f"{n}={s.health.value}@{s.version}" for n, s in sorted(self.engines.items())]
        return f"<FleetView {' '.join(parts)}>"


@dataclass(frozen=True)
class SessionTag:
    """Names the session a call belongs to, for errors (``None`` fields: not known)."""

    session_id: str | None = None
    step: int | None = None

    def prefix(self) -> str:
        if self.session_id is None:
            return ""
        return f"session {self.session_id} (step {self.step}): "


@dataclass(eq=False)
class _Member:
    name: str
    handle: Any
    health: Health
    since: float
    info: EngineInfo | None = None
    reason: str | None = None
    # The session (or catch-up) that currently drives this engine, if any, and which.
    claimed_by: str | None = None
    claim_kind: str | None = None
    released: asyncio.Event = field(default_factory=asyncio.Event)
    # Catch-up back-off.
    failures: int = 0
    retry_at: float = 0.0
    removed: asyncio.Event = field(default_factory=asyncio.Event)

    def state(self) -> EngineState:
        info = self.info
        return EngineState(
            name=self.name,
            health=self.health,
            version=info.version if info else None,
            incarnation=info.incarnation if info else None,
            node_id=info.node_id if info else None,
            reason=self.reason,
            since=self.since,
        )


class EngineFleet:
    """The engines of a train actor (or of one ad-hoc session) and every call to them.

    Args:
        engines: initial members, name -> Ray actor handle of a receiver. They
            start as ``initial`` health without a probe (call :meth:`refresh` to
            learn their node and version).
        initial: health of the initial members (``catching_up`` for a fleet that
            must bring them to the newest step first; ``serving`` for an ad-hoc
            session's targets).
        call_timeout_s: bound on control calls (probe, begin, abort, set-up).
        abort_timeout_s: bound on delivering ``abort`` after a failure.
        probe_interval_s: how often the keeper probes every engine.

    Use from one event loop (the train actor's).
    """

    def __init__(
        self,
        engines: Mapping[str, Any] | None = None,
        *,
        initial: Health = Health.CATCHING_UP,
        call_timeout_s: float = 60.0,
        abort_timeout_s: float = 10.0,
        probe_interval_s: float = 2.0,
    ) -> None:
        if engines is not None and not isinstance(engines, Mapping):
            raise FleetError(
                f"EngineFleet engines must be a mapping of name -> engine handle, got "
                f"{type(engines).__name__}"
            )
        if not isinstance(initial, Health):
            raise ConfigError(f"EngineFleet initial must be a Health, got {initial!r}")
        for option, value in (
            ("call_timeout_s", call_timeout_s),
            ("abort_timeout_s", abort_timeout_s),
            ("probe_interval_s", probe_interval_s),
        ):
            if not is_number(value) or not value > 0:
                raise ConfigError(f"EngineFleet {option} must be positive seconds, got {value!r}")
        now = time.time()
        self.call_timeout_s = call_timeout_s
        self.abort_timeout_s = abort_timeout_s
        self.probe_interval_s = probe_interval_s
        # A probe is one small call: an engine that cannot answer it within a few
        # probe intervals is hung for routing purposes (and must not hold the
        # keeper's round, and every catch-up, for a whole call timeout).
        self.probe_timeout_s = min(call_timeout_s, max(5.0, 5 * probe_interval_s))
        self._members: dict[str, _Member] = {}
        for name, handle in (engines or {}).items():
            _check_name(name)
            self._members[name] = _Member(name, handle, initial, now)
        self._keeper: asyncio.Task[None] | None = None
        self._catch_ups: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._closed = False

    def __repr__(self) -> str:
        return f"<EngineFleet {self.view()!r}>"

    # ----------------------------------------------------------------- membership

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __len__(self) -> int:
        return len(self._members)

    def view(self) -> FleetView:
        """Every member's state now."""
        return FleetView({n: m.state() for n, m in self._members.items()})

    def handle(self, name: str) -> Any:
        return self._member(name).handle

    def handles(self, names: Iterable[str]) -> dict[str, Any]:
        return {n: self._member(n).handle for n in names}

    def node_of(self, name: str) -> str | None:
        info = self._member(name).info
        return info.node_id if info else None

    async def add(self, name: str, handle: Any) -> EngineState:
        """Add an engine: ask it what it is, then bring it to the newest step.

        It starts ``catching_up``: the keeper (after one probe interval) or the
        next session brings it the newest ready step, and finds it ``current``,
        sending nothing, if it already serves that step. Adding the same handle
        under the same name again is a no-op. Raises
        :class:`~asyncsync.FleetError` for a name in use by another handle, or if
        the engine cannot be reached or is not a receiver; the fleet is unchanged.
        """
        _check_name(name)
        if self._closed:
            raise FleetError(f"cannot add engine {name!r}: the fleet is closed")
        existing = self._members.get(name)
        if existing is not None:
            if existing.handle == handle:
                return existing.state()
            raise FleetError(f"engine name {name!r} is already used by another handle")
        member = _Member(name, handle, Health.CATCHING_UP, time.time())
        member.info = await self._call(member, "engine_info", (), self.call_timeout_s, "probe")
        if name in self._members:  # added concurrently while we probed: same rules as above
            return await self.add(name, handle)
        self._members[name] = member
        member.reason = "joined"
        # Give whoever added it a moment to include it in a session of their own
        # before the keeper catches it up.
        member.retry_at = time.monotonic() + self.probe_interval_s
        self._wake.set()
        return member.state()

    async def remove(self, name: str) -> EngineState:
        """Take an engine out of the fleet; sessions running on it drop it (and abort it).

        Returns its last state. Raises :class:`~asyncsync.FleetError` for an unknown
        name.
        """
        member = self._member(name)
        del self._members[name]
        member.removed.set()
        task = self._catch_ups.pop(name, None)
        if task is not None:
            task.cancel()
        member.health, member.reason, member.since = Health.GONE, "removed", time.time()
        return member.state()

    def removed(self, name: str) -> asyncio.Event:
        """An event set when ``name`` leaves the fleet."""
        return self._member(name).removed

    # ----------------------------------------------------------------- health

    def observe(self, name: str, info: EngineInfo) -> None:
        """Record what engine ``name`` reported; a new incarnation means Ray restarted it."""
        member = self._members.get(name)
        if member is None:
            return
        old = member.info
        member.info = info
        if old is not None and old.incarnation != info.incarnation:
            # A new process: the back-off earned by the old one's failures does not
            # apply to it, so the keeper catches it up at its next round.
            member.failures, member.retry_at = 0, 0.0
            self._set(
                member,
                Health.CATCHING_UP,
                "restarted: a new incarnation serves its initial weights",
            )

    def committed(self, name: str, version: int) -> None:
        """Engine ``name`` answered a commit with ``version``: it serves that version now.

        It is serving unless it committed a step older than one the serving engines
        already serve (a straggler finishing an old session): then it is catching
        up, out of routing and out of the staleness count, until the keeper brings
        it the newest step.
        """
        member = self._members.get(name)
        if member is None:
            return
        if member.info is not None:
            member.info = dataclasses.replace(member.info, version=version)
        newest = max(
            (
                m.info.version
                for m in self._members.values()
                if m is not member
                and m.health is Health.SERVING
                and m.info is not None
                and m.info.version is not None
            ),
            default=None,
        )
        if newest is not None and version < newest:
            self.mark(name, Health.CATCHING_UP, f"committed step {version}, behind {newest}")
            member.retry_at = 0.0
        else:
            self.mark(name, Health.SERVING, f"committed step {version}")

    def mark(self, name: str, health: Health, reason: str | None = None) -> None:
        """Set an engine's health (sessions do: committed -> serving, failed -> quarantined)."""
        member = self._members.get(name)
        if member is None:
            return
        if health is Health.QUARANTINED and member.health is not Health.QUARANTINED:
            member.failures += 1
            member.retry_at = time.monotonic() + min(
                _MAX_BACKOFF_S, self.probe_interval_s * 2 ** (member.failures - 1)
            )
        elif health is Health.SERVING:
            member.failures = 0
            member.retry_at = 0.0
        self._set(member, health, reason)
        if health is not Health.SERVING:
            self._wake.set()

    def _set(self, member: _Member, health: Health, reason: str | None) -> None:
        if member.health is Health.GONE and health is not Health.GONE:
            return  # dead for good stays dead
        if member.health is not health:
            member.since = time.time()
        member.health = health
        member.reason = reason

    def claim(self, names: Iterable[str], owner: str, kind: str = "session") -> list[str]:
        """Claim the engines no other session drives; return those claimed (in order).

        ``kind`` is ``"session"`` or ``"catch_up"`` (a catch-up run by the keeper).
        """
        claimed = []
        for name in names:
            member = self._members.get(name)
            if member is not None and member.claimed_by is None:
                member.claimed_by, member.claim_kind = owner, kind
                member.released = asyncio.Event()
                claimed.append(name)
        return claimed

    def release(self, names: Iterable[str], owner: str) -> None:
        for name in names:
            member = self._members.get(name)
            if member is not None and member.claimed_by == owner:
                member.claimed_by, member.claim_kind = None, None
                member.released.set()
        self._wake.set()

    def caught_up_elsewhere(self, names: Iterable[str]) -> list[str]:
        """Of ``names``, the engines a catch-up session drives right now."""
        return [
            n for n in names if n in self._members and self._members[n].claim_kind == "catch_up"
        ]

    async def wait_released(self, names: Iterable[str], timeout_s: float | None) -> None:
        """Wait until none of ``names`` is claimed (or the timeout passes; no error)."""
        waits = [
            asyncio.ensure_future(self._members[n].released.wait())
            for n in names
            if n in self._members and self._members[n].claimed_by is not None
        ]
        if not waits:
            return
        try:
            await asyncio.wait(waits, timeout=timeout_s)
        finally:
            for wait in waits:
                wait.cancel()

    def targets(self) -> list[str]:
        """Engines a normal session targets: serving ones and those catching up."""
        return [
            n for n, m in self._members.items() if m.health in (Health.SERVING, Health.CATCHING_UP)
        ]

    # ----------------------------------------------------------------- calls

    async def call(
        self,
        name: str,
        method: str,
        *args: Any,
        timeout_s: float | None,
        what: str | None = None,
        session: SessionTag | None = None,
        cancel_remote: bool = True,
    ) -> Any:
        """``handle.<method>.remote(*args)`` on engine ``name``, awaited with a bound.

        ``timeout_s=None`` waits without bound (the caller holds one). If this wait
        is cancelled, or times out, the remote call is cancelled too (unless
        ``cancel_remote`` is false: a commit must run to its end). Any failure is
        raised as :class:`~asyncsync.SessionError` when ``session`` is given (a
        :class:`~asyncsync.SessionTimeoutError` for the bound), else as
        :class:`~asyncsync.FleetError`, naming the engine and ``what``.
        """
        return await self._call(
            self._member(name), method, args, timeout_s, what or method, session, cancel_remote
        )

    async def fan_out(
        self,
        names: Iterable[str],
        method: str,
        args: Callable[[str], tuple[Any, ...]] | tuple[Any, ...] = (),
        *,
        timeout_s: float | None,
        what: str | None = None,
        session: SessionTag | None = None,
        cancel_remote: bool = True,
    ) -> dict[str, Any]:
        """:meth:`call` on every engine at once; the first failure cancels the rest and is raised.

        ``args`` is the argument tuple, or a function of the engine's name giving it.
        """
        results: dict[str, Any] = {}

        async def one(name: str) -> None:
            call_args = args(name) if callable(args) else args
            results[name] = await self.call(
                name,
                method,
                *call_args,
                timeout_s=timeout_s,
                what=what,
                session=session,
                cancel_remote=cancel_remote,
            )

        try:
            async with asyncio.TaskGroup() as group:
                for name in names:
                    group.create_task(one(name))
        except BaseExceptionGroup as errors:
            raise first_session_error(errors) from None
        return results

    async def settle(
        self,
        names: Iterable[str],
        method: str,
        args: Callable[[str], tuple[Any, ...]] | tuple[Any, ...] = (),
        *,
        timeout_s: float | None,
        what: str | None = None,
        session: SessionTag | None = None,
    ) -> dict[str, Any | BaseException]:
        """:meth:`call` on every engine at once; wait for all; each result or its error."""

        async def one(name: str) -> Any:
            call_args = args(name) if callable(args) else args
            return await self.call(
                name, method, *call_args, timeout_s=timeout_s, what=what, session=session
            )

        names = list(names)
        outcomes = await asyncio.gather(*(one(n) for n in names), return_exceptions=True)
        return dict(zip(names, outcomes, strict=True))

    async def abort(self, handles: Mapping[str, Any], session_id: str) -> None:
        """Deliver ``abort(session_id)`` to these engines: bounded, best effort, and
        completed in the background even if this wait is cancelled.

        Takes handles, not names: an engine removed from the fleet mid-session still
        gets the abort of the session it was part of.
        """

        async def one(handle: Any) -> None:
            try:
                await handle.abort.remote(session_id)
            except Exception:  # a dead engine has nothing to abort
                pass

        async def every() -> None:
            try:
                async with asyncio.timeout(self.abort_timeout_s):
                    await asyncio.gather(*(one(h) for h in handles.values()))
            except TimeoutError:
                pass

        if handles:
            await shielded(every())

    async def refresh(self, names: Iterable[str] | None = None) -> FleetView:
        """Probe engines (all by default) now; record what they report; return the view.

        An engine that does not answer within :attr:`probe_timeout_s` is quarantined; one
        that Ray reports dead for good is ``gone``.
        """
        members = [self._members[n] for n in (names or list(self._members)) if n in self._members]

        async def probe(member: _Member) -> None:
            if member.health is Health.GONE:
                return
            try:
                info = await self._call(member, "engine_info", (), self.probe_timeout_s, "probe")
            except FleetError as exc:
                cause = exc.__cause__
                if _died_for_good(cause):
                    self.mark(member.name, Health.GONE, f"died: {last_line(exc)}")
                elif member.health is not Health.QUARANTINED:
                    self.mark(member.name, Health.QUARANTINED, f"unreachable: {last_line(exc)}")
                return
            self.observe(member.name, info)

        await asyncio.gather(*(probe(m) for m in members))
        return self.view()

    async def _call(
        self,
        member: _Member,
        method: str,
        args: tuple[Any, ...],
        timeout_s: float | None,
        what: str,
        session: SessionTag | None = None,
        cancel_remote: bool = True,
    ) -> Any:
        tag = session or SessionTag()
        try:
            ref = getattr(member.handle, method).remote(*args)
        except Exception as exc:  # a wrong handle: no such method, or not an actor at all
            raise self._error(
                tag,
                member.name,
                what,
                f"it is not a receiver ({type(member.handle).__name__} has no remote "
                f"{method!r}: {type(exc).__name__})",
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
                raise self._error(
                    tag, member.name, what, f"no answer within {timeout_s:g}s", timeout=True
                ) from exc
            raise self._error(
                tag, member.name, what, f"{type(exc).__name__}: {last_line(exc)}"
            ) from exc

    @staticmethod
    def _error(
        tag: SessionTag, name: str, what: str, detail: str, *, timeout: bool = False
    ) -> Exception:
        message = f"{tag.prefix()}target {name!r} failed in {what}: {detail}"
        if tag.session_id is None:
            return FleetError(message)
        cls = SessionTimeoutError if timeout else SessionError
        return cls(message, session_id=tag.session_id, step=tag.step, target=name)

    def _member(self, name: str) -> _Member:
        _check_name(name)
        try:
            return self._members[name]
        except KeyError:
            raise FleetError(
                f"engine {name!r} is not in the fleet (members: {sorted(self._members)})"
            ) from None

    # ----------------------------------------------------------------- keeper

    def start(
        self,
        catch_up: Callable[[str], Awaitable[None]],
        ready_step: Callable[[], int | None],
    ) -> None:
        """Start the keeper on the running loop (idempotent).

        Every ``probe_interval_s`` (sooner when an engine needs it) it probes every
        member and, for each engine that is catching up or quarantined (after its
        back-off), reachable, and not driven by a session, runs ``catch_up(name)``
        once a step is ready. ``catch_up`` must bring the engine to the newest ready
        step and mark its health.
        """
        if self._closed or (self._keeper is not None and not self._keeper.done()):
            return
        self._keeper = asyncio.get_running_loop().create_task(self._keep(catch_up, ready_step))

    async def _keep(
        self, catch_up: Callable[[str], Awaitable[None]], ready_step: Callable[[], int | None]
    ) -> None:
        while not self._closed:
            self._wake.clear()
            await self.refresh()
            ready = ready_step()
            now = time.monotonic()
            for name, member in list(self._members.items()):
                if member.health not in (Health.CATCHING_UP, Health.QUARANTINED):
                    continue
                if ready is None or member.claimed_by is not None or name in self._catch_ups:
                    continue
                if now < member.retry_at:
                    continue
                self._catch_ups[name] = asyncio.get_running_loop().create_task(
                    self._run_catch_up(name, catch_up)
                )
            try:
                async with asyncio.timeout(self.probe_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _run_catch_up(self, name: str, catch_up: Callable[[str], Awaitable[None]]) -> None:
        try:
            await catch_up(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.mark(name, Health.QUARANTINED, f"catch-up failed: {last_line(exc)}")
        finally:
            self._catch_ups.pop(name, None)

    async def close(self) -> None:
        """Stop the keeper and every catch-up it started; wait for them to end."""
        self._closed = True
        tasks = [t for t in [self._keeper, *self._catch_ups.values()] if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._catch_ups.clear()


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise FleetError(f"engine names must be non-empty strings, got {name!r}")


def _cancel(ref: object) -> None:
    import ray

    if isinstance(ref, ray.ObjectRef):
        try:
            ray.cancel(ref)
        except Exception:  # best effort: never replace the error being handled
            pass


def _died_for_good(exc: BaseException | None) -> bool:
    import ray.exceptions

    return isinstance(exc, ray.exceptions.ActorDiedError)
