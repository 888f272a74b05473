"""Route rollout calls to serving engines by version, and check rollouts' staleness.

A :class:`FleetRouter` sends a call (``generate``, or any method of your engines)
to a serving engine chosen by a :class:`Rule` (the newest version, at least ``v``,
at most ``k`` steps behind the trainer, or exactly ``v``), balanced by the calls
each engine has outstanding. It learns the fleet by push: a background task keeps
one long poll (:meth:`~asyncsync.WeightSyncActor.fleet_watch`) open on the train
actor, which answers as soon as the fleet changes, so an engine that leaves
routing (killed, quarantined, removed) or a version that commits reaches the
router within one round trip of the fleet knowing it; no call polls the view.

A call that fails because its engine did not answer (died, restarting, hung past
``timeout_s``) is retried on another eligible engine, at most ``attempts`` engines
in all (never the same one twice); an answer stamped below the rule (an engine
that lost its weights since the router last heard) is retried the same way. Such
an engine is skipped by later calls too, until the fleet's view shows it changed
(restarted, caught up, a new version) or :data:`SUSPECT_S` passed. When no engine is eligible the
call waits up to ``wait_s`` for the fleet to change, then raises
:class:`~asyncsync.RoutingError`. An error the engine itself raised is the
answer: it is raised to the caller, never retried.

Every answer comes back as :class:`Routed`: the value, the engine, and the
answer's :class:`~asyncsync.protocol.Stamp` when it carries one (an attribute
``stamp``, as :class:`~asyncsync.engines.Generation` does).

The trainer's side of the chain: :func:`staleness` of a stamped rollout against
the step being trained, and :class:`StalenessFilter`, which refuses (and counts)
rollouts beyond a bound.

The router is an ordinary async object for asyncio and trio drivers (it uses
anyio and :mod:`asyncsync.aio`); use it as an async context manager.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from ray.exceptions import GetTimeoutError, RayActorError

from . import aio
from ._checks import check_int, check_number
from .errors import ConfigError, RoutingError
from .fleet import EngineState, FleetView, Health
from .protocol import Stamp

__all__ = ["FleetRouter", "Routed", "RouterStats", "Rule", "StalenessFilter", "staleness"]

SUSPECT_S = 30.0
"""How long an engine that did not answer is skipped if the view shows no change of it."""


@dataclass(frozen=True)
class Rule:
    """Which versions a call may run on (make one with the class methods)."""

    kind: str
    value: int | None = None

    @classmethod
    def newest(cls) -> Rule:
        """The newest version any serving engine serves."""
        return cls("newest")

    @classmethod
    def at_least(cls, version: int) -> Rule:
        """Any version >= ``version``."""
        return cls("at_least", check_int(version, "Rule.at_least: version", ConfigError, low=-1))

    @classmethod
    def within(cls, steps: int) -> Rule:
        """At most ``steps`` behind the trainer's newest published step."""
        return cls("within", check_int(steps, "Rule.within: steps", ConfigError, low=0))

    @classmethod
    def exactly(cls, version: int) -> Rule:
        """Exactly ``version``."""
        return cls("exactly", check_int(version, "Rule.exactly: version", ConfigError, low=-1))

    def floor(self, view: FleetView, ready_step: int | None) -> int | None:
        """The oldest version allowed now (``None``: none is, or none is known)."""
        if self.kind == "newest":
            served = [v for v in view.serving().values() if v is not None]
            return max(served) if served else None
        if self.kind == "within":
            return None if ready_step is None else ready_step - (self.value or 0)
        return self.value

    def allows(self, version: int | None, floor: int | None) -> bool:
        """Whether ``version`` satisfies the rule, given :meth:`floor`."""
        if version is None or floor is None:
            return False
        if self.kind == "exactly":
            return version == floor
        return version >= floor

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}({self.value})"


@dataclass(frozen=True)
class Routed:
    """One answer: its ``value``, the ``engine`` that gave it, its ``stamp`` (if the
    answer carries one), and the ``attempts`` it took (1 when nothing failed)."""

    value: Any
    engine: str
    stamp: Stamp | None
    attempts: int


@dataclass
class RouterStats:
    """What a router did since it started (a live object; copy what you keep).

    ``lag_s``: for each fleet change, the time from the train actor recording it
    to the router routing by it (the push's delay).
    """

    calls: int = 0
    retries: int = 0
    failed: int = 0
    updates: int = 0
    by_version: dict[int | None, int] = field(default_factory=dict)
    lag_s: list[float] = field(default_factory=list)


class FleetRouter:
    """Routes calls to the serving engines of ``trainer``'s fleet (see the module doc).

    Args:
        trainer: the train actor's handle.
        rule: the default rule of :meth:`call`.
        attempts: engines tried per call at most (>= 1).
        timeout_s: bound on one engine's answer (``None``: none); past it the
            engine counts as not answering and the call goes elsewhere.
        wait_s: how long a call waits for an eligible engine to appear.
        watch_s: how long one long poll stays open on the train actor.
    """

    def __init__(
        self,
        trainer: Any,
        *,
        rule: Rule | None = None,
        attempts: int = 3,
        timeout_s: float | None = 60.0,
        wait_s: float = 30.0,
        watch_s: float = 10.0,
    ) -> None:
        if not hasattr(trainer, "fleet_watch"):
            raise ConfigError(
                f"FleetRouter needs a train actor's handle, got {type(trainer).__name__}"
            )
        if rule is not None and not isinstance(rule, Rule):
            raise ConfigError(f"FleetRouter rule must be a Rule, got {rule!r}")
        check_int(attempts, "FleetRouter attempts", ConfigError, low=1)
        if timeout_s is not None:
            check_number(timeout_s, "FleetRouter timeout_s", ConfigError, positive=True)
        check_number(wait_s, "FleetRouter wait_s", ConfigError, low=0.0)
        check_number(watch_s, "FleetRouter watch_s", ConfigError, positive=True)
        self.trainer = trainer
        self.rule = rule or Rule.newest()
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.wait_s = wait_s
        self.watch_s = watch_s
        self.view = FleetView({})
        self.ready_step: int | None = None
        self.epoch = -1
        self.stats = RouterStats()
        self._handles: dict[str, Any] = {}
        self._outstanding: dict[str, int] = {}
        self._turn = 0
        # Engines whose call got no answer: their state in the view then, and when.
        # Skipped until the view shows them changed (restarted, caught up, a new
        # version) or SUSPECT_S passed.
        self._suspect: dict[str, tuple[EngineState | None, float]] = {}
        self._changed = anyio.Event()
        self._watch_error: BaseException | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._stack = AsyncExitStack()

    # ----------------------------------------------------------------- lifetime

    async def __aenter__(self) -> FleetRouter:
        if self._group is not None:
            raise RoutingError("this FleetRouter is already running")
        await self._stack.enter_async_context(self._running())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        await self._update(await aio.get(self.trainer.fleet_watch.remote(-1, 0.0)))
        async with anyio.create_task_group() as group:
            self._group = group
            group.start_soon(self._watch)
            try:
                yield
            finally:
                group.cancel_scope.cancel()
                self._group = None

    async def _watch(self) -> None:
        backoff = 0.05
        while True:
            try:
                update = await aio.get(self.trainer.fleet_watch.remote(self.epoch, self.watch_s))
            except Exception as exc:  # the trainer is busy or gone: say so to waiting calls
                self._watch_error = exc
                self._wake()
                await anyio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            backoff = 0.05
            self._watch_error = None
            await self._update(update)

    async def _update(self, update: Any) -> None:
        if update.epoch != self.epoch:
            self.stats.updates += 1
            if update.changed_at is not None and self.epoch >= 0:
                self.stats.lag_s.append(max(0.0, time.time() - update.changed_at))
        self.epoch = update.epoch
        self.view = update.view
        self.ready_step = update.ready_step
        self._handles = dict(update.handles)
        now = time.monotonic()
        self._suspect = {
            n: (state, at)
            for n, (state, at) in self._suspect.items()
            if update.view.engines.get(n) == state and now - at < SUSPECT_S
        }
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # ----------------------------------------------------------------- routing

    def eligible(self, rule: Rule | None = None) -> list[str]:
        """The engines a call under ``rule`` may go to now, least loaded first (by the
        calls this router has outstanding on each)."""
        rule = rule or self.rule
        floor = rule.floor(self.view, self.ready_step)
        names = [
            name
            for name, state in self.view.engines.items()
            if state.health is Health.SERVING
            and rule.allows(state.version, floor)
            and name in self._handles
            and name not in self._suspect
        ]
        return sorted(names, key=lambda n: self._outstanding.get(n, 0))

    async def call(
        self, method: str, *args: Any, rule: Rule | None = None, **kwargs: Any
    ) -> Routed:
        """``engine.<method>.remote(*args, **kwargs)`` on an eligible engine; its answer.

        Raises :class:`~asyncsync.RoutingError` when no engine was eligible within
        ``wait_s``, or every attempt went to an engine that did not answer or
        answered below the rule; an exception the engine raised is raised as is.
        """
        if self._group is None:
            raise RoutingError("FleetRouter.call outside `async with FleetRouter(...)`")
        if not isinstance(method, str) or not method:
            raise ConfigError(f"FleetRouter.call: method must be a method name, got {method!r}")
        rule = rule or self.rule
        self.stats.calls += 1
        tried: list[str] = []
        # Engines this call tried, with their state in the view then: skipped until
        # the view shows them changed (a new version, restarted, caught up).
        avoid: dict[str, EngineState | None] = {}
        for attempt in range(1, self.attempts + 1):
            name, floor = await self._choose(rule, tried, avoid)
            handle = self._handles[name]
            self._outstanding[name] = self._outstanding.get(name, 0) + 1
            try:
                with anyio.fail_after(self.timeout_s):
                    value = await aio.get(getattr(handle, method).remote(*args, **kwargs))
            except (TimeoutError, RayActorError, GetTimeoutError) as exc:
                self._suspect_of(name)
                avoid[name] = self.view.engines.get(name)
                tried.append(f"{name} ({type(exc).__name__})")
                self.stats.retries += 1
                continue
            finally:
                self._outstanding[name] -= 1
            stamp = getattr(value, "stamp", None)
            # Judged by the floor the engine was chosen under: a trainer that moved on
            # while the call ran does not void a rollout that met the rule it was sent
            # under (the trainer's StalenessFilter bounds what it trains on).
            if isinstance(stamp, Stamp) and not (
                stamp.intact and rule.allows(stamp.version, floor)
            ):
                # Its weights are not what the view said (it lost them since): elsewhere.
                self._suspect_of(name)
                avoid[name] = self.view.engines.get(name)
                tried.append(f"{name} (answered on {stamp.version})")
                self.stats.retries += 1
                continue
            version = stamp.version if isinstance(stamp, Stamp) else None
            self.stats.by_version[version] = self.stats.by_version.get(version, 0) + 1
            return Routed(value, name, stamp if isinstance(stamp, Stamp) else None, attempt)
        self.stats.failed += 1
        raise RoutingError(
            f"{method!r} under rule {rule}: {self.attempts} attempts, none answered: {tried}"
        )

    def _suspect_of(self, name: str) -> None:
        self._suspect[name] = (self.view.engines.get(name), time.monotonic())

    async def _choose(
        self, rule: Rule, tried: list[str], avoid: Mapping[str, EngineState | None]
    ) -> tuple[str, int | None]:
        """An eligible engine not in ``avoid`` (or changed since it was put there), and
        the rule's floor it was chosen under; waits up to ``wait_s`` for one."""
        with anyio.move_on_after(self.wait_s):
            while True:
                names = [
                    n
                    for n in self.eligible(rule)
                    if n not in avoid or self.view.engines.get(n) != avoid[n]
                ]
                if names:
                    # The least loaded; among equals, take turns.
                    least = min(self._outstanding.get(n, 0) for n in names)
                    equal = [n for n in names if self._outstanding.get(n, 0) == least]
                    self._turn += 1
                    return equal[self._turn % len(equal)], rule.floor(self.view, self.ready_step)
                changed = self._changed
                await changed.wait()
        self.stats.failed += 1
        why = f"; the fleet watch failed: {self._watch_error}" if self._watch_error else ""
        raise RoutingError(
            f"no engine eligible under rule {rule} within {self.wait_s:g}s (view {self.view!r}, "
            f"trainer at step {self.ready_step}; tried {tried}){why}"
        )


# --------------------------------------------------------------------- the trainer's side


def staleness(stamp: Stamp, step: int) -> int | None:
    """How many steps the weights of a stamped rollout lag the step being trained.

    ``None`` when the rollout ran on no trainer version (initial weights, or an
    engine that held no whole version).
    """
    if not stamp.intact or stamp.version is None:
        return None
    return step - stamp.version


@dataclass
class StalenessFilter:
    """Admits rollouts at most ``max_steps`` behind the step being trained.

    :meth:`admit` counts what it refuses (``refused``, and by reason in
    ``refused_by``): a rollout beyond the bound, or one that ran on no trainer
    version. The chain from rollout to gradient is checked, not assumed.
    """

    max_steps: int
    admitted: int = 0
    refused: int = 0
    refused_by: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_int(self.max_steps, "StalenessFilter max_steps", ConfigError, low=0)

    def admit(self, stamp: Stamp, step: int) -> bool:
        """Whether a rollout stamped ``stamp`` may train step ``step``."""
        lag = staleness(stamp, step)
        if lag is None:
            reason = "no trainer version"
        elif lag > self.max_steps:
            reason = f"more than {self.max_steps} behind"
        else:
            self.admitted += 1
            return True
        self.refused += 1
        self.refused_by[reason] = self.refused_by.get(reason, 0) + 1
        return False
