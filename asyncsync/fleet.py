"""The fleet: the engines a train actor keeps in sync, and what each one serves.

An :class:`EngineFleet` lives on the train actor's event loop. It holds each
engine's handle and what the engine itself last reported (:class:`EngineInfo`:
incarnation, node, served version) plus a health:

``serving``       in routing; normal sessions bring it the newest step
``catching_up``   new, restarted (or restarting), or left behind by a session that
                  went on without it; a catch-up session brings it the newest ready
                  step first
``quarantined``   failed, hung or unreachable; out of routing until a catch-up
                  session (retried with back-off) brings it the newest ready step
``gone``          died for good (Ray will not restart it); removed engines leave
                  the fleet altogether

Versions always come from the engine (``engine_info``, ``begin``, ``commit``),
never from what a session meant to do. :meth:`EngineFleet.view` answers "which
engines serve which version" at any time, so an orchestrator can route
version-pinned requests and keep an engine out of routing until its weights are
there.

Every call to an engine goes through the fleet's :attr:`EngineFleet.client`
(:class:`~asyncsync.client.EngineClient`). The first call to an engine that fails
because the engine is unreachable (dead, restarting, or silent past its bound)
takes it out of routing at once, whoever made the call; a call the engine answered
with an error leaves the verdict to the session that made it.

Membership changes at runtime (:meth:`EngineFleet.add`, :meth:`EngineFleet.remove`)
while sessions run. The train actor's :class:`~asyncsync.keeper.FleetKeeper`
probes the engines, notices restarts (a new incarnation) and deaths, and runs
catch-up sessions for engines that are not serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._primitives import Signal
from .client import Deadlines, EngineClient
from .errors import ConfigError, FleetError, last_line
from .protocol import EngineInfo

__all__ = ["EngineFleet", "EngineState", "FleetView", "Health"]

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
    weights: str | None = None
    """The identity of the served weights (:func:`~asyncsync.protocol.weights_identity`)."""


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
            weights=info.weights if info else None,
        )


class EngineFleet:
    """The engines of a train actor (or of one ad-hoc session) and their health.

    Args:
        engines: initial members, name -> Ray actor handle of an engine. They
            start as ``initial`` health without a probe (call :meth:`refresh` to
            learn their node and version).
        initial: health of the initial members (``catching_up`` for a fleet that
            must bring them to the newest step first; ``serving`` for an ad-hoc
            session's engines).
        deadlines: the bounds of every call to the engines (the train actor's).

    Use from one event loop (the train actor's).
    """

    def __init__(
        self,
        engines: Mapping[str, Any] | None = None,
        *,
        initial: Health = Health.CATCHING_UP,
        deadlines: Deadlines | None = None,
    ) -> None:
        if engines is not None and not isinstance(engines, Mapping):
            raise FleetError(
                f"EngineFleet engines must be a mapping of name -> engine handle, got "
                f"{type(engines).__name__}"
            )
        if not isinstance(initial, Health):
            raise ConfigError(f"EngineFleet initial must be a Health, got {initial!r}")
        if deadlines is not None and not isinstance(deadlines, Deadlines):
            raise ConfigError(f"EngineFleet deadlines must be a Deadlines, got {deadlines!r}")
        now = time.time()
        self.deadlines = deadlines or Deadlines()
        self.client = EngineClient(self.handle, self.deadlines, on_failure=self.call_failed)
        """Every call to these engines goes through this client."""
        self._members: dict[str, _Member] = {}
        for name, handle in (engines or {}).items():
            _check_name(name)
            self._members[name] = _Member(name, handle, initial, now)
        # Set whenever an engine may need a catch-up (the keeper waits on it).
        self.wake = asyncio.Event()
        self.closed = False
        # Every change of the view makes a new epoch; watchers wake on it.
        self.epoch = 0
        self.changed_at = time.time()
        """When the view last changed (wall clock), for routers to measure their lag."""
        self._change = Signal()
        self.on_change: Callable[[EngineState], None] | None = None
        """Told each engine's state whenever a session, a probe or the keeper sets its
        health (the train actor's metrics recorder); it must not raise or block."""

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
        if self.closed:
            raise FleetError(f"cannot add engine {name!r}: the fleet is closed")
        existing = self._members.get(name)
        if existing is not None:
            if existing.handle == handle:
                return existing.state()
            raise FleetError(f"engine name {name!r} is already used by another handle")
        probe = EngineClient.of({name: handle}, self.deadlines)
        info = await probe.engine_info(name, probe=False)
        existing = self._members.get(name)  # added concurrently while we probed?
        if existing is not None:
            if existing.handle == handle:
                return existing.state()
            raise FleetError(f"engine name {name!r} is already used by another handle")
        member = _Member(name, handle, Health.CATCHING_UP, time.time(), info=info)
        self._members[name] = member
        member.reason = "joined"
        self._changed()
        # Give whoever added it a moment to include it in a session of their own
        # before the keeper catches it up.
        member.retry_at = time.monotonic() + self.deadlines.probe_interval_s
        self.wake.set()
        return member.state()

    async def remove(self, name: str) -> EngineState:
        """Take an engine out of the fleet; sessions running on it drop it (and abort it).

        Returns its last state. Raises :class:`~asyncsync.FleetError` for an unknown
        name.
        """
        member = self._member(name)
        del self._members[name]
        member.removed.set()
        member.health, member.reason, member.since = Health.GONE, "removed", time.time()
        self._changed()
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
        if info != old:
            self._changed()
        if not info.intact:
            # Its apply failed partway: a mix of two versions, no version at all.
            if member.health is not Health.QUARANTINED:
                self.mark(name, Health.QUARANTINED, "apply failed partway: serves no version")
            return
        if old is not None and old.incarnation != info.incarnation:
            # A new process: the back-off earned by the old one's failures does not
            # apply to it, so the keeper catches it up at its next round.
            member.failures, member.retry_at = 0, 0.0
            self._set(
                member,
                Health.CATCHING_UP,
                "restarted: a new incarnation serves its initial weights",
            )

    def committed(self, name: str, version: int, weights: str | None = None) -> None:
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
            member.info = dataclasses.replace(
                member.info,
                version=version,
                weights=weights if weights is not None else member.info.weights,
                intact=True,
            )
            self._changed()
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

    def version_unknown(self, name: str) -> None:
        """Engine ``name``'s commit failed: its apply may have written part of the new
        weights, so the fleet knows no version for it until it reports one again."""
        member = self._members.get(name)
        if member is not None and member.info is not None:
            member.info = dataclasses.replace(member.info, version=None, weights=None)
            self._changed()

    def mark(self, name: str, health: Health, reason: str | None = None) -> None:
        """Set an engine's health (sessions do: committed -> serving, failed -> quarantined)."""
        member = self._members.get(name)
        if member is None:
            return
        if health is Health.QUARANTINED and member.health is not Health.QUARANTINED:
            member.failures += 1
            member.retry_at = time.monotonic() + min(
                _MAX_BACKOFF_S, self.deadlines.probe_interval_s * 2 ** (member.failures - 1)
            )
        elif health is Health.SERVING:
            member.failures = 0
            member.retry_at = 0.0
        self._set(member, health, reason)
        if health is not Health.SERVING:
            self.wake.set()

    def _set(self, member: _Member, health: Health, reason: str | None) -> None:
        if member.health is Health.GONE and health is not Health.GONE:
            return  # dead for good stays dead
        if member.health is not health:
            member.since = time.time()
        if (member.health, member.reason) != (health, reason):
            member.health = health
            member.reason = reason
            self._changed()
        if self.on_change is not None:
            self.on_change(member.state())

    def note_published(self) -> None:
        """The train actor published a new ready step: a new epoch, so watchers
        (a router's ``within`` floor) learn it as they learn an engine's change."""
        self._changed()

    def _changed(self) -> None:
        self.epoch += 1
        self.changed_at = time.time()
        self._change.notify()

    async def watch(self, after: int, timeout_s: float) -> int:
        """Wait until the fleet changed after epoch ``after`` (or ``timeout_s`` passed).

        Returns the epoch now. Every change of an engine's health, reported version
        or weights, every engine added or removed, and every step the train actor
        published, makes a new epoch; a caller
        that holds the view of epoch ``e`` is up to date until ``watch(e)`` returns.
        """
        if self.epoch > after or self.closed:
            return self.epoch
        changed = self._change.waiter()
        try:
            async with asyncio.timeout(timeout_s):
                await changed.wait()
        except TimeoutError:
            pass
        return self.epoch

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
        self.wake.set()

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

    def session_engines(self) -> list[str]:
        """Engines a normal session sends to: serving ones and those catching up."""
        return [
            n for n, m in self._members.items() if m.health in (Health.SERVING, Health.CATCHING_UP)
        ]

    def due_for_catch_up(self) -> list[str]:
        """Engines a catch-up should bring to the newest step now: catching up or
        quarantined, driven by no session, and past their back-off."""
        now = time.monotonic()
        return [
            n
            for n, m in self._members.items()
            if m.health in (Health.CATCHING_UP, Health.QUARANTINED)
            and m.claimed_by is None
            and now >= m.retry_at
        ]

    def failed(self, name: str, error: BaseException) -> None:
        """Engine ``name`` failed a call or a session: out of routing now.

        An engine Ray is restarting is ``catching_up`` (its new incarnation has done
        nothing wrong; it is retried at the next probe round, without back-off); any
        other failure quarantines it (retried with back-off).
        """
        member = self._members.get(name)
        if member is None:
            return
        if _restarting(error):
            self.mark(name, Health.CATCHING_UP, f"restarting: {last_line(error)}")
            member.retry_at = time.monotonic() + self.deadlines.probe_interval_s
        else:
            self.mark(name, Health.QUARANTINED, last_line(error))

    def call_failed(self, name: str, error: BaseException) -> None:
        """A client's call to ``name`` failed with ``error`` (see :meth:`failed`)."""
        # The engine did not answer (dead, restarting, silent past the bound): it
        # leaves routing at this first failed call. An error the engine raised is
        # an answer; the session that made the call decides.
        if _unreachable(error):
            self.failed(name, error)

    async def refresh(self, names: Iterable[str] | None = None) -> FleetView:
        """Probe engines (all by default) now; record what they report; return the view.

        An engine that does not answer within the probe bound leaves routing; one
        that Ray reports dead for good is ``gone``.
        """
        members = [self._members[n] for n in (names or list(self._members)) if n in self._members]

        async def probe(member: _Member) -> None:
            if member.health is Health.GONE:
                return
            try:
                info = await self.client.engine_info(member.name)
            except FleetError as exc:
                if _died_for_good(exc.__cause__):
                    self.mark(member.name, Health.GONE, f"died: {last_line(exc)}")
                elif not _unreachable(exc) and member.health is not Health.QUARANTINED:
                    self.mark(member.name, Health.QUARANTINED, f"probe failed: {last_line(exc)}")
                return
            self.observe(member.name, info)

        await asyncio.gather(*(probe(m) for m in members))
        return self.view()

    def close(self) -> None:
        """No engine joins any more (the train actor is closing); watchers wake."""
        self.closed = True
        self.wake.set()
        self._change.notify()

    def _member(self, name: str) -> _Member:
        _check_name(name)
        try:
            return self._members[name]
        except KeyError:
            raise FleetError(
                f"engine {name!r} is not in the fleet (members: {sorted(self._members)})"
            ) from None


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise FleetError(f"engine names must be non-empty strings, got {name!r}")


def _died_for_good(exc: BaseException | None) -> bool:
    import ray.exceptions

    return isinstance(exc, ray.exceptions.ActorDiedError)


def _unreachable(error: BaseException) -> bool:
    """A failed call's error (from the client) says the engine did not answer at all."""
    import ray.exceptions

    cause = error.__cause__
    if isinstance(cause, ray.exceptions.RayTaskError):
        return False  # the engine answered by raising (whatever it raised)
    return isinstance(cause, ray.exceptions.RayActorError | TimeoutError)


def _restarting(error: BaseException) -> bool:
    import ray.exceptions

    return isinstance(error.__cause__, ray.exceptions.ActorUnavailableError)
