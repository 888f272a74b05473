"""What a sync session is asked to do, and what it reports.

:class:`SyncPlan` holds what a caller chooses per session (which step, which
transport, which commit policy, the session's own time bounds); bounds on each
call to an engine are the train actor's (:class:`~asyncsync.client.Deadlines`).
:class:`SyncReport` says what the session did, engine by engine
(:class:`EngineReport`, with an :class:`Outcome`).

Commit policies (see :mod:`asyncsync.session` for what each does):

``"all_or_nothing"``  two phases: every engine prepared, then every engine commits
``"per_engine"``      each engine commits as soon as it is prepared; a quorum is a success
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._checks import is_int, is_number
from .errors import ConfigError, InvalidStepError
from .fleet import FleetView
from .transport import AUTO, backend, transport_names

__all__ = ["POLICIES", "EngineReport", "Outcome", "SyncPlan", "SyncReport"]

ALL_OR_NOTHING = "all_or_nothing"
PER_ENGINE = "per_engine"
POLICIES = (ALL_OR_NOTHING, PER_ENGINE)
"""Commit policies (see the module docstring)."""
DELTA_MODES = ("auto", "never", "always")
"""``SyncPlan.delta`` values (see :class:`SyncPlan` and :mod:`asyncsync.delta`)."""
DELTA_MAX_RATIO = 0.1
"""Default :attr:`SyncPlan.delta_max_ratio`."""

# Renamed in 0.2: the old name, for the error that says so.
_RENAMED_POLICIES = {"fleet": ALL_OR_NOTHING}


class Outcome(enum.StrEnum):
    """What became of one engine in a session (:attr:`EngineReport.outcome`)."""

    COMMITTED = "committed"
    """It committed the session's step."""
    CURRENT = "current"
    """It reported at ``begin`` that it serves the step already: nothing was sent."""
    CATCHING_UP = "catching_up"
    """``per_engine``: still streaming in the background when the session returned."""
    QUARANTINED = "quarantined"
    """It failed; it keeps its old version, out of routing until caught up."""
    ABORTED = "aborted"
    """``all_or_nothing``: the session failed elsewhere; it keeps its old version."""
    REMOVED = "removed"
    """It left the fleet mid-session."""


@dataclass(frozen=True)
class SyncPlan:
    """What a sync session should do.

    Args:
        engines: engine name -> Ray actor handle of an engine (see
            :class:`~asyncsync.protocol.Receiver`) for an ad-hoc session, or
            ``None``: the train actor's fleet (its serving engines and those
            catching up).
        min_step: send the newest ready step >= this (``None``: the newest ready;
            then a cache that never published fails at once).
        transport: ``"auto"`` (default: per engine, the shared snapshot on the cache
            owner's node, ``cross_node`` elsewhere), ``"shm"`` (same node only),
            ``"object_store"`` or ``"collective"``.
        cross_node: what ``"auto"`` uses for engines on other nodes
            (``"object_store"`` or ``"collective"``).
        policy: ``"all_or_nothing"`` (two phases) or ``"per_engine"``.
        min_engines: ``per_engine`` only: the commits that make the session a
            success, a count >= 1 or a fraction of the engines in (0, 1].
        max_updating: at most this many engines apply weights at once, so the rest
            keep generating (rolling update); ``None``: all at once.
        straggler_grace_s: ``per_engine`` only: how long engines still streaming
            after the quorum committed get before the session returns without
            them (``None``: as long as the quorum took).
        timeout_s: bound on the session after the pin. Reached before the session
            returned, it aborts every engine not committed and raises
            :class:`~asyncsync.SessionTimeoutError`, naming the engines that held
            it up; ``per_engine`` stragglers left finishing in the background are
            aborted and quarantined when it is reached.
        pin_timeout_s: bound on waiting for a ready step >= ``min_step``
            (:class:`~asyncsync.ReadTimeoutError`); ``None`` waits without bound.
        max_inflight_buckets: unacknowledged buckets per engine (memory bound and
            pipelining depth).
        delta: ``"auto"`` (default): an engine on another Ray node than the
            train actor that serves the base of the pinned step's delta gets the
            delta (only the changed words, see :mod:`asyncsync.delta`) when it is
            at most ``delta_max_ratio`` of the full bytes; every other engine gets
            the full snapshot (on the train actor's node bytes do not cross a
            network, and a delta's CPU cost is not repaid). ``"always"``: the delta
            to every engine on its base, any transport, any size; ``"never"``: full
            snapshots only. An engine that refuses a delta's base gets the full
            snapshot in the same session. A train actor made with
            ``delta_sync=False`` computes no deltas: every mode sends full snapshots.
        delta_max_ratio: under ``"auto"``, the largest delta (its bytes over the
            full snapshot's) still sent; default 0.1 (measured: at 4% of the
            bytes a delta session across nodes took half the time of a full one,
            at 15% longer; see the Delta sync guide).

    Bounds on each call to an engine (a control call, delivering an abort, a
    probe) are the train actor's, not the plan's: see
    :class:`~asyncsync.client.Deadlines`. An engine drops a session's staging
    ``timeout_s`` plus the abort bound after ``begin`` if nothing committed it.

    Every field is checked here: a mistake raises :class:`~asyncsync.ConfigError`
    at construction, before any session starts.
    """

    engines: Mapping[str, Any] | None = None
    min_step: int | None = None
    transport: str = AUTO
    cross_node: str = "object_store"
    policy: str = ALL_OR_NOTHING
    min_engines: int | float = 1
    max_updating: int | None = None
    straggler_grace_s: float | None = None
    timeout_s: float = 300.0
    pin_timeout_s: float | None = 60.0
    max_inflight_buckets: int = 2
    delta: str = "auto"
    delta_max_ratio: float = DELTA_MAX_RATIO

    def __post_init__(self) -> None:
        engines = self.engines
        if engines is not None:
            if not isinstance(engines, Mapping) or not engines:
                raise ConfigError(
                    "SyncPlan.engines must be None (the train actor's fleet) or a non-empty "
                    f"mapping of name -> engine handle, got {_brief(engines)}"
                )
            bad = [n for n in engines if not isinstance(n, str) or not n]
            if bad:
                raise ConfigError(f"SyncPlan.engines: engine names must be strings, got {bad!r}")
        if self.min_step is not None and (
            isinstance(self.min_step, bool)
            or not isinstance(self.min_step, int)
            or self.min_step < -1
        ):
            raise InvalidStepError(
                f"SyncPlan.min_step must be None or an int >= -1, got {self.min_step!r}"
            )
        if self.transport != AUTO:
            backend(self.transport)  # ConfigError naming the choices
        cross = backend(self.cross_node)
        if cross.same_node_only:
            raise ConfigError(
                f"SyncPlan.cross_node={self.cross_node!r} only works on one node; choose "
                f"one of {[n for n in transport_names() if not backend(n).same_node_only]}"
            )
        if self.policy in _RENAMED_POLICIES:
            raise ConfigError(
                f"SyncPlan.policy {self.policy!r} was renamed "
                f"{_RENAMED_POLICIES[self.policy]!r} (0.2)"
            )
        if self.policy not in POLICIES:
            raise ConfigError(f"SyncPlan.policy must be one of {POLICIES}, got {self.policy!r}")
        m = self.min_engines
        if isinstance(m, bool) or not (
            (isinstance(m, int) and m >= 1) or (isinstance(m, float) and 0 < m <= 1)
        ):
            raise ConfigError(
                f"SyncPlan.min_engines must be an int >= 1 or a fraction in (0, 1], got {m!r}"
            )
        if self.max_updating is not None and (
            not is_int(self.max_updating) or self.max_updating < 1
        ):
            raise ConfigError(
                f"SyncPlan.max_updating must be None or an int >= 1, got {self.max_updating!r}"
            )
        if not is_int(self.max_inflight_buckets) or self.max_inflight_buckets < 1:
            raise ConfigError(
                f"SyncPlan.max_inflight_buckets must be an int >= 1, got "
                f"{self.max_inflight_buckets!r}"
            )
        if self.delta not in DELTA_MODES:
            raise ConfigError(f"SyncPlan.delta must be one of {DELTA_MODES}, got {self.delta!r}")
        if not is_number(self.delta_max_ratio) or not 0 < self.delta_max_ratio <= 1:
            raise ConfigError(
                f"SyncPlan.delta_max_ratio must be in (0, 1], got {self.delta_max_ratio!r}"
            )
        if not is_number(self.timeout_s) or not self.timeout_s > 0:
            raise ConfigError(f"SyncPlan.timeout_s must be positive, got {self.timeout_s!r}")
        for name in ("pin_timeout_s", "straggler_grace_s"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or not value >= 0):
                raise ConfigError(f"SyncPlan.{name} must be None or >= 0, got {value!r}")

    def quorum(self, engines: int) -> int:
        """Commits needed out of ``engines`` under ``per_engine`` (all under ``all_or_nothing``)."""
        if self.policy == ALL_OR_NOTHING:
            return engines
        if isinstance(self.min_engines, float):
            needed = -(-self.min_engines * engines // 1)  # ceil
            return max(1, min(engines, int(needed)))
        return min(engines, self.min_engines)


@dataclass(frozen=True)
class EngineReport:
    """What one engine did in a session (see :class:`Outcome`); times in seconds.

    ``version`` is the version the engine reported serving (``None`` if unknown).
    ``begin_s`` is this engine's own ``begin`` call. ``delta``: it was sent the
    delta on its base (not the full snapshot); ``sent_bytes``: the payload bytes
    streamed to it.
    """

    name: str
    transport: str
    outcome: Outcome
    version: int | None
    begin_s: float
    transfer_s: float
    commit_s: float
    error: str | None = None
    delta: bool = False
    sent_bytes: int = 0


@dataclass(frozen=True)
class SyncReport:
    """What a session did. ``step`` is the step actually sent.

    ``view`` is the fleet after the session: which engine serves which version, as
    the engines reported it. ``busy`` names engines left out because another
    session (a catch-up) was driving them.
    """

    session_id: str
    step: int
    min_step: int | None
    policy: str
    transport: str
    nbytes: int
    num_buckets: int
    pin_wait_s: float
    seconds: float
    started_at: float
    engines: Mapping[str, EngineReport]
    view: FleetView
    busy: tuple[str, ...] = ()
    weights: str | None = None
    """The identity of the weights sent (:func:`~asyncsync.protocol.weights_identity`):
    what every engine that committed now stamps its answers with."""

    @property
    def committed(self) -> tuple[str, ...]:
        """Engines that committed ``step``."""
        return tuple(n for n, t in self.engines.items() if t.outcome is Outcome.COMMITTED)

    @property
    def current(self) -> tuple[str, ...]:
        """Engines that already served ``step`` (nothing was sent to them)."""
        return tuple(n for n, t in self.engines.items() if t.outcome is Outcome.CURRENT)

    @property
    def quarantined(self) -> tuple[str, ...]:
        """Engines that failed the session (out of routing until caught up)."""
        return tuple(n for n, t in self.engines.items() if t.outcome is Outcome.QUARANTINED)

    @property
    def gbps(self) -> float:
        """Snapshot bytes delivered to the engine set per second of the session, in GB/s."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def fleet_plan(plan: object, what: str, why: str) -> SyncPlan:
    """``plan`` checked as a plan for the train actor's fleet, whose runner (the
    coordinator, the keeper) chooses the engines and the step itself.

    Raises :class:`~asyncsync.ConfigError` naming ``what`` for anything but a
    :class:`SyncPlan`, or one that sets ``engines`` or ``min_step`` (``why`` says why).
    """
    if not isinstance(plan, SyncPlan):
        raise ConfigError(f"{what} must be a SyncPlan, got {_brief(plan)}")
    if plan.engines is not None or plan.min_step is not None:
        raise ConfigError(f"{what} must leave engines and min_step unset: {why}")
    return plan


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
