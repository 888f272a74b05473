"""One sync session: pin the newest ready snapshot, stream it, commit by the plan's policy.

Flow (all on the train actor's loop; every blocking step inside a transport runs in
a worker thread):

1. pin the newest ready snapshot with step >= ``plan.min_step`` (one atomic step);
2. choose a transport per engine by where it runs (``"auto"``: the shared snapshot
   for an engine on the cache owner's node, ``plan.cross_node`` for the others), and
   refuse a same-node-only transport for an engine elsewhere before anything moves
   (:class:`~asyncsync.TopologyError`);
3. ``begin`` on every engine with the manifest (engines refuse what they cannot take);
4. stream: every engine pulls the buckets in order with at most
   ``plan.max_inflight_buckets`` unacknowledged; each bucket is put once per
   transport (whichever engine needs it first) and released when every engine of
   that transport has it; an engine that acknowledged every bucket has staged and
   verified everything: it is *prepared*;
5. commit, by ``plan.policy``:

   ``"fleet"`` (all or nothing, two phases): commit starts only once every engine is
   prepared; any failure before that aborts the session on every engine (each
   keeps the version it had) and raises :class:`~asyncsync.SessionError`. Then every
   engine commits (at most ``max_updating`` at a time). The one window left: an
   engine that fails *during* phase two, after others committed, keeps its old
   version; it is quarantined (out of routing) and caught up later, and the report
   says exactly which engine serves which version.

   ``"per_engine"``: each engine commits as soon as it is prepared (at most
   ``max_updating`` at a time). An engine that fails is aborted and quarantined;
   the others go on. Once ``min_engines`` engines committed, the rest get
   ``straggler_grace_s`` more (by default as long as the quorum took); engines still
   streaming then are left to finish in the background (reported ``catching_up``)
   and the session returns: one slow engine never holds back the train loop or the
   other engines. Fewer than ``min_engines`` commits raises
   :class:`~asyncsync.QuorumError`.

Failure, the timeout, or cancellation (``ray.cancel``, a cancelled driver task) abort
every engine not yet committed, finish the transports, and release the pin. A
commit that started is never interrupted: the pin (and the shared memory an
engine may be reading) is held until every commit in flight has ended, in the
background if the session itself was cancelled. The report carries the step that
was actually sent, which may be newer than the one asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

from ._checks import is_int, is_number
from ._primitives import detached, shielded, uninterrupted
from .cache import BucketCache, Snapshot
from .errors import (
    ConfigError,
    InvalidStepError,
    NothingBuiltError,
    QuorumError,
    SessionError,
    SessionTimeoutError,
    TopologyError,
    first_session_error,
    last_line,
)
from .fleet import EngineFleet, FleetView, Health, SessionTag
from .spans import SpanLog
from .transport import AUTO, SessionContext, Transport, backend, transport_names

__all__ = [
    "COMMITTED",
    "POLICIES",
    "SyncPlan",
    "SyncReport",
    "TargetReport",
    "run_session",
]

POLICIES = ("fleet", "per_engine")
"""Commit policies (see the module docstring)."""

# Outcomes of one engine in a session (TargetReport.outcome).
COMMITTED = "committed"
CURRENT = "current"
CATCHING_UP = "catching_up"
QUARANTINED = "quarantined"
ABORTED = "aborted"
REMOVED = "removed"


@dataclass(frozen=True)
class SyncPlan:
    """What a sync session should do.

    Args:
        targets: engine name -> Ray actor handle implementing the receiver protocol
            (see :mod:`asyncsync.receiver`) for an ad-hoc session, or ``None``: the
            train actor's fleet (its serving engines and those catching up).
        min_step: send the newest ready step >= this (``None``: the newest ready;
            then a cache that never published fails at once).
        transport: ``"auto"`` (default: per engine, the shared snapshot on the cache
            owner's node, ``cross_node`` elsewhere), ``"shm"`` (same node only),
            ``"object_store"`` or ``"collective"``.
        cross_node: what ``"auto"`` uses for engines on other nodes
            (``"object_store"`` or ``"collective"``).
        policy: ``"fleet"`` (all or nothing, two phases) or ``"per_engine"``.
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
        abort_timeout_s: bound on delivering ``abort`` after a failure.

    Every field is checked here: a mistake raises :class:`~asyncsync.ConfigError`
    at construction, before any session starts.
    """

    targets: Mapping[str, Any] | None = None
    min_step: int | None = None
    transport: str = AUTO
    cross_node: str = "object_store"
    policy: str = "fleet"
    min_engines: int | float = 1
    max_updating: int | None = None
    straggler_grace_s: float | None = None
    timeout_s: float = 300.0
    pin_timeout_s: float | None = 60.0
    max_inflight_buckets: int = 2
    abort_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        targets = self.targets
        if targets is not None:
            if not isinstance(targets, Mapping) or not targets:
                raise ConfigError(
                    "SyncPlan.targets must be None (the train actor's fleet) or a non-empty "
                    f"mapping of name -> engine handle, got {_brief(targets)}"
                )
            bad = [n for n in targets if not isinstance(n, str) or not n]
            if bad:
                raise ConfigError(f"SyncPlan.targets: engine names must be strings, got {bad!r}")
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
        for name in ("timeout_s", "abort_timeout_s"):
            value = getattr(self, name)
            if not is_number(value) or not value > 0:
                raise ConfigError(f"SyncPlan.{name} must be positive, got {value!r}")
        for name in ("pin_timeout_s", "straggler_grace_s"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or not value >= 0):
                raise ConfigError(f"SyncPlan.{name} must be None or >= 0, got {value!r}")

    def quorum(self, engines: int) -> int:
        """Commits needed out of ``engines`` under ``per_engine`` (all under ``fleet``)."""
        if self.policy == "fleet":
            return engines
        if isinstance(self.min_engines, float):
            needed = -(-self.min_engines * engines // 1)  # ceil
            return max(1, min(engines, int(needed)))
        return min(engines, self.min_engines)


@dataclass(frozen=True)
class TargetReport:
    """What one engine did in a session; times in seconds.

    ``outcome``: ``"committed"``, ``"current"`` (the engine reported at ``begin``
    that it serves this step already: nothing was sent), ``"catching_up"``
    (``per_engine``: still streaming
    in the background when the session returned), ``"quarantined"`` (failed; keeps
    its old version, out of routing until caught up), ``"aborted"`` (``fleet``: the
    session failed elsewhere), ``"removed"`` (left the fleet mid-session).
    ``version`` is the version the engine reported serving (``None`` if unknown).
    """

    name: str
    transport: str
    outcome: str
    version: int | None
    begin_s: float
    transfer_s: float
    commit_s: float
    error: str | None = None


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
    targets: Mapping[str, TargetReport]
    view: FleetView
    busy: tuple[str, ...] = ()

    @property
    def committed(self) -> tuple[str, ...]:
        """Engines that committed ``step``."""
        return tuple(n for n, t in self.targets.items() if t.outcome == COMMITTED)

    @property
    def current(self) -> tuple[str, ...]:
        """Engines that already served ``step`` (nothing was sent to them)."""
        return tuple(n for n, t in self.targets.items() if t.outcome == CURRENT)

    @property
    def quarantined(self) -> tuple[str, ...]:
        return tuple(n for n, t in self.targets.items() if t.outcome == QUARANTINED)

    @property
    def gbps(self) -> float:
        """Snapshot bytes delivered to the engine set per second of the session, in GB/s."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


async def run_session(
    cache: BucketCache,
    plan: SyncPlan,
    fleet: EngineFleet,
    transports: Callable[[str], Transport],
    *,
    names: Sequence[str] | None = None,
    owner_node: str | None = None,
    background: set[asyncio.Task[None]] | None = None,
    spans: SpanLog | None = None,
    kind: str = "session",
) -> SyncReport:
    """Run one session as described in the module docstring.

    Args:
        fleet: the engines (the train actor's fleet, or an ad-hoc one for
            ``plan.targets``); health and versions are recorded there.
        transports: the train side of a transport by backend name (kept by the
            train actor across sessions).
        names: the engines to target (default: ``fleet.targets()``). An engine a
            catch-up drives is waited for (within ``plan.timeout_s``) and then
            included; one another session drives (a straggler) is skipped and
            reported in ``SyncReport.busy``.
        owner_node: the cache owner's Ray node (``None``: not in Ray, where every
            engine counts as on the same node).
        background: work that outlives this call (stragglers still streaming, commits
            still applying after a cancellation) is added here, so its owner can
            wait for it or cancel it at shutdown.
        kind: ``"catch_up"`` for the fleet keeper's catch-up sessions.
    """
    session = _Session(cache, plan, fleet, transports, owner_node, background, spans, kind)
    return await session.run(list(fleet.targets() if names is None else names))


@dataclass(eq=False)
class _Run:
    """One engine's part of a session."""

    name: str
    transport: str
    begin_s: float = 0.0
    transfer_s: float = 0.0
    commit_s: float = 0.0
    outcome: str = ABORTED
    version: int | None = None
    error: str | None = None
    begun: bool = False
    prepared: bool = False
    commit: asyncio.Future[int] | None = None

    @property
    def applying(self) -> bool:
        """A commit was sent and has not ended (it is never interrupted)."""
        return self.commit is not None and not self.commit.done()


class _Puts:
    """One transport's share of a session: each bucket put once, freed once its engines have it."""

    def __init__(
        self, session: _Session, name: str, transport: Transport, ctx: SessionContext
    ) -> None:
        self.session = session
        self.name = name
        self.transport = transport
        self.ctx = ctx
        self.engines = set(ctx.targets)
        self._puts: dict[int, asyncio.Future[Any]] = {}
        self._needed: dict[int, set[str]] = {}
        self.started = False

    async def start(self) -> None:
        # finish() is owed from the moment start() is called, even if it fails.
        self.started = True
        await self.session.guard(self.name, None, self.transport.start(self.ctx))

    async def get(self, index: int) -> Any:
        put = self._puts.get(index)
        if put is None:
            assert self.session.snap is not None
            bucket = self.session.snap.buckets[index]
            put = detached(
                self.session.guard(self.name, index, self.transport.put(self.ctx, index, bucket))
            )
            self._puts[index] = put
            self._needed[index] = set(self.engines)
        # Shielded: one engine giving up must not cancel a put the others share.
        return await asyncio.shield(put)

    async def took(self, index: int, engine: str) -> None:
        needed = self._needed.get(index)
        if needed is None:
            return
        needed.discard(engine)
        if not needed:
            await self._release(index)

    async def leave(self, engine: str) -> None:
        """``engine`` left the session: it no longer holds back any release."""
        self.engines.discard(engine)
        for index in list(self._needed):
            await self.took(index, engine)

    async def _release(self, index: int) -> None:
        del self._needed[index]
        put = self._puts[index]
        if not put.done():
            return  # its engines left before it ended: finish() waits for it
        # No engine asks for this bucket again. Forget the put: its result (for the
        # object store, the bucket's ObjectRef) would otherwise keep the bucket in
        # the object stores of the owner's node and of every node that pulled it
        # until this session (a reference cycle) is garbage-collected.
        del self._puts[index]
        if not put.cancelled() and put.exception() is None:
            release = self.transport.release(self.ctx, index, put.result())
            await self.session.guard(self.name, index, release)

    async def finish(self, ok: bool) -> None:
        running = [p for p in self._puts.values() if not p.done()]
        if running:
            await asyncio.wait(running)  # a put in a worker thread cannot be stopped
        if self.started:
            await shielded(self.transport.finish(self.ctx, ok))
        # What a failed session never released goes with the transport's own references.
        self._puts.clear()


class _Session:
    def __init__(
        self,
        cache: BucketCache,
        plan: SyncPlan,
        fleet: EngineFleet,
        transports: Callable[[str], Transport],
        owner_node: str | None,
        background: set[asyncio.Task[None]] | None,
        spans: SpanLog | None,
        kind: str = "session",
    ) -> None:
        self.id = uuid.uuid4().hex
        self.kind = kind
        self.cache = cache
        self.plan = plan
        self.fleet = fleet
        self.transports = transports
        self.owner_node = owner_node
        self.background = background if background is not None else set()
        self.spans = spans
        self.step = -1
        self.tag = SessionTag(self.id)
        self.runs: dict[str, _Run] = {}
        self.puts: dict[str, _Puts] = {}
        self.busy: tuple[str, ...] = ()
        # Handles as the session started: aborts reach engines removed mid-session too.
        self.handles: dict[str, Any] = {}
        self.snap: Snapshot | None = None
        self.pinned_at = 0.0
        # per_engine: engines still streaming when the session returned, and their work.
        self.stragglers: dict[str, asyncio.Future[None]] = {}

    # ----------------------------------------------------------------- errors

    def error(self, message: str, cls: type[SessionError] = SessionError, **fields: Any) -> Any:
        return cls(
            f"session {self.id} (step {self.step}): {message}",
            session_id=self.id,
            step=self.step,
            **fields,
        )

    async def guard(self, transport: str, bucket: int | None, step: Any) -> Any:
        """Await a transport step; any failure becomes a SessionError naming it."""
        try:
            return await step
        except SessionError:
            raise
        except Exception as exc:
            where = f"bucket {bucket}" if bucket is not None else "its set-up"
            raise self.error(
                f"transport {transport!r} failed on {where}: {type(exc).__name__}: "
                f"{last_line(exc)}",
                transport=transport,
                bucket=bucket,
            ) from exc

    # ----------------------------------------------------------------- main

    async def run(self, names: list[str]) -> SyncReport:
        started = time.time()
        claimed = self.fleet.claim(names, self.id, self.kind)
        # A catch-up brings its engine to the newest ready step, as this session
        # would: wait for it, then include the engine.
        catching = self.fleet.caught_up_elsewhere(n for n in names if n not in claimed)
        if catching:
            await self.fleet.wait_released(catching, self.plan.timeout_s)
            claimed += self.fleet.claim(catching, self.id, self.kind)
        self.busy = tuple(n for n in names if n not in claimed)
        pin = AsyncExitStack()
        handed_off = False
        try:
            try:
                snap = await pin.enter_async_context(
                    self.cache.read(min_step=self.plan.min_step, timeout=self.plan.pin_timeout_s)
                )
            except NothingBuiltError:
                # The cache's message names its own API (read); a session's caller sets a plan.
                raise NothingBuiltError(
                    f"session {self.id}: nothing to send: no snapshot was ever published and "
                    "no build is in flight; build (and publish) a step first, or pass "
                    "SyncPlan(min_step=...) to wait for that step (up to pin_timeout_s)"
                ) from None
            self.snap = snap
            self.step = snap.step
            self.tag = SessionTag(self.id, snap.step)
            pinned = time.time()
            self.pinned_at = time.monotonic()
            with self.spans.span("session", snap.step) if self.spans else nullcontext():
                await self._run_pinned(claimed)
            report = self._report(snap, started, pinned, time.time())
            if self.stragglers:
                self._hand_off(pin, claimed)
                handed_off = True
            return report
        finally:
            if not handed_off:
                await self._finish(pin, claimed)

    async def _run_pinned(self, names: list[str]) -> None:
        """Everything after the pin (stragglers left streaming end up in ``self.stragglers``)."""
        try:
            async with asyncio.timeout(self.plan.timeout_s) as deadline:
                await self._route(names)
                await self._begin()
                await self._start_transports()
                if self.plan.policy == "fleet":
                    await self._fleet_policy()
                else:
                    # per_engine keeps the deadline itself: reaching it after the quorum
                    # committed is a success (the rest is left to catch up), not an error.
                    end = deadline.when()
                    deadline.reschedule(None)
                    await self._per_engine_policy(end)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise self._timed_out() from None
        except SessionError as exc:
            # Under "fleet" an engine that failed the session is taken out of routing
            # (a catch-up brings it back); a refused plan is nobody's fault.
            name = exc.target
            if not isinstance(exc, TopologyError) and name in self.runs:
                run = self.runs[name]
                if run.outcome != QUARANTINED:
                    run.outcome, run.error = QUARANTINED, last_line(exc)
                    self.fleet.mark(name, Health.QUARANTINED, run.error)
            raise

    # ----------------------------------------------------------------- topology

    async def _route(self, names: list[str]) -> None:
        assert self.snap is not None
        for name in names:
            if name in self.fleet:
                self.runs[name] = _Run(name, "")
                self.handles[name] = self.fleet.handle(name)
        unknown = [n for n in self.runs if self.fleet.node_of(n) is None]
        if unknown and self.owner_node is not None:
            infos = await self._on_engines(unknown, "engine_info", (), "probe")
            for name, info in infos.items():
                self.fleet.observe(name, info)
        shareable = _shareable(self.snap)
        for name in self._live():
            self.runs[name].transport = self._choose(name, self.fleet.node_of(name), shareable)

    def _choose(self, name: str, node: str | None, shareable: bool) -> str:
        plan = self.plan
        # Outside Ray neither side has a node: one process, one machine.
        same_node = node == self.owner_node
        if plan.transport == AUTO:
            return "shm" if same_node and shareable else plan.cross_node
        if backend(plan.transport).same_node_only and not same_node:
            raise self.error(
                f"transport {plan.transport!r} only works on the cache owner's node: engine "
                f"{name!r} runs on node {node}, the cache owner on node {self.owner_node}; "
                "use 'auto' or a cross-node transport",
                TopologyError,
                target=name,
                transport=plan.transport,
            )
        return plan.transport

    # ----------------------------------------------------------------- phases

    async def _on_engines(
        self, names: list[str], method: str, args: Any, what: str
    ) -> dict[str, Any]:
        """Call every engine; under ``fleet`` the first failure fails the session,
        under ``per_engine`` failed engines are quarantined and dropped."""
        bound = self.fleet.call_timeout_s
        if self.plan.policy == "fleet":
            return await self.fleet.fan_out(
                names, method, args, timeout_s=bound, what=what, session=self.tag
            )
        outcomes = await self.fleet.settle(
            names, method, args, timeout_s=bound, what=what, session=self.tag
        )
        results = {}
        for name, outcome in outcomes.items():
            if isinstance(outcome, BaseException):
                await self._drop(name, outcome)
            else:
                results[name] = outcome
        self._check_quorum()
        return results

    async def _begin(self) -> None:
        assert self.snap is not None
        manifest = self.snap.manifest
        ttl = self.plan.timeout_s + self.plan.abort_timeout_s
        live = self._live()

        step = self.snap.step

        def args(name: str) -> tuple[Any, ...]:
            self.runs[name].begun = True
            return (self.id, step, manifest, ttl)

        start = time.monotonic()
        infos = await self._on_engines(live, "begin", args, "begin")
        current = []
        for name, info in infos.items():
            self.fleet.observe(name, info)
            run = self.runs[name]
            run.begin_s = time.monotonic() - start
            if info.version == step:
                # The engine itself says it serves this step already: send nothing.
                run.outcome, run.version = CURRENT, step
                self.fleet.committed(name, step)
                current.append(name)
        if current:
            await self._abort(current)

    async def _start_transports(self) -> None:
        assert self.snap is not None
        by_transport: dict[str, dict[str, Any]] = {}
        for name in self._live():
            by_transport.setdefault(self.runs[name].transport, {})[name] = self.fleet.handle(name)
        for name, targets in by_transport.items():
            ctx = SessionContext(self.id, self.snap.step, targets, self.snap.manifest, self.fleet)
            self.puts[name] = _Puts(self, name, self.transports(name), ctx)
        for puts in self.puts.values():
            await puts.start()

    async def _stream(self, name: str) -> None:
        """Send every bucket to ``name``; returns once it acknowledged them all (prepared)."""
        run = self.runs[name]
        puts = self.puts[run.transport]
        assert self.snap is not None
        inflight = asyncio.Semaphore(self.plan.max_inflight_buckets)
        start = time.monotonic()

        async def receive(index: int, payload: Any) -> None:
            try:
                await self.fleet.call(
                    name,
                    "receive",
                    self.id,
                    index,
                    payload,
                    timeout_s=None,
                    what=f"receive of bucket {index} ({run.transport})",
                    session=self.tag,
                )
            finally:
                inflight.release()
            await puts.took(index, name)

        try:
            async with asyncio.TaskGroup() as group:
                for index in range(len(self.snap.buckets)):
                    await inflight.acquire()
                    payload = await puts.get(index)
                    group.create_task(receive(index, payload))
        except BaseExceptionGroup as errors:
            raise first_session_error(errors) from None
        run.transfer_s = time.monotonic() - start
        run.prepared = True

    async def _commit(self, name: str, updating: asyncio.Semaphore) -> None:
        """Commit on ``name``; the commit is never interrupted once sent (see the module doc)."""
        run = self.runs[name]
        async with updating:
            start = time.monotonic()
            run.commit = detached(
                self.fleet.call(
                    name,
                    "commit",
                    self.id,
                    timeout_s=None,
                    what="commit",
                    session=self.tag,
                    cancel_remote=False,
                )
            )
            version = await asyncio.shield(run.commit)
        run.commit_s = time.monotonic() - start
        run.outcome, run.version = COMMITTED, int(version)
        self.fleet.committed(name, int(version))

    def _updating(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.plan.max_updating or max(1, len(self.runs)))

    async def _fleet_policy(self) -> None:
        live = self._live()
        # Phase one: every engine prepared, or the whole session fails.
        try:
            async with asyncio.TaskGroup() as group:
                for name in live:
                    group.create_task(self._until_removed(name, self._stream(name)))
        except BaseExceptionGroup as errors:
            error = first_session_error(errors)
            if isinstance(error, SessionError) and error.target in self.runs:
                self.fleet.mark(error.target, Health.QUARANTINED, last_line(error))
                self.runs[error.target].outcome = QUARANTINED
                self.runs[error.target].error = last_line(error)
            raise error from None
        # Phase two: commit everywhere; an engine failing now is quarantined.
        updating = self._updating()
        live = self._live()

        async def commit(name: str) -> None:
            try:
                await self._commit(name, updating)
            except SessionError as exc:
                await self._drop(name, exc)

        await asyncio.gather(*(commit(n) for n in live))
        committed = [n for n in live if self.runs[n].outcome == COMMITTED]
        if live and not committed:
            first = self.runs[live[0]]
            raise self.error(f"no engine could commit; {live[0]!r}: {first.error}", target=live[0])

    async def _per_engine_policy(self, end: float | None) -> None:
        """``end``: the session's deadline (loop time; ``None``: none)."""
        loop = asyncio.get_running_loop()
        updating = self._updating()
        live = self._live()
        quorum = self.plan.quorum(len(self.runs))
        start = time.monotonic()

        async def engine(name: str) -> None:
            try:
                await self._until_removed(name, self._stream(name))
                if self.runs[name].outcome != REMOVED:
                    await self._commit(name, updating)
            except SessionError as exc:
                await self._drop(name, exc)

        tasks = {asyncio.ensure_future(engine(n)): n for n in live}
        pending = set(tasks)
        try:
            deadline: float | None = None  # for stragglers, once the quorum committed
            while pending:
                bounds = [t for t in (deadline, end) if t is not None]
                timeout = max(0.0, min(bounds) - loop.time()) if bounds else None
                done, pending = await asyncio.wait(
                    pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    task.result()  # engine() handles its own failures
                self._check_quorum()
                if deadline is None and self._committed() >= quorum:
                    took = time.monotonic() - start
                    grace = self.plan.straggler_grace_s
                    deadline = loop.time() + (took if grace is None else grace)
                if deadline is not None and loop.time() >= deadline:
                    break
                if end is not None and loop.time() >= end and pending:
                    if deadline is None:
                        raise self._timed_out()
                    # The quorum committed; the rest ran out of the session's time.
                    late = [tasks[t] for t in pending]
                    for task in pending:
                        task.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    for name in late:
                        await self._drop(
                            name, self.error(f"engine {name!r} ran past {self.plan.timeout_s}s")
                        )
                    return
        except BaseException:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        for task in pending:
            name = tasks[task]
            self.runs[name].outcome = CATCHING_UP
            self.fleet.mark(name, Health.CATCHING_UP, f"still receiving step {self.step}")
            self.stragglers[name] = task

    # ----------------------------------------------------------------- helpers

    def _timed_out(self) -> SessionError:
        """The error of a session past its timeout; the engines that held it up are quarantined."""
        stuck = self._stuck()
        for culprit in stuck:
            run = self.runs[culprit]
            run.outcome = QUARANTINED
            run.error = f"had not finished when the session ran past {self.plan.timeout_s}s"
            self.fleet.mark(culprit, Health.QUARANTINED, run.error)
        error: SessionError = self.error(
            f"ran past {self.plan.timeout_s}s" + (f"; not finished: {stuck}" if stuck else ""),
            SessionTimeoutError,
            target=stuck[0] if stuck else None,
        )
        return error

    def _stuck(self) -> list[str]:
        """At a timeout: the engines that held the session up, to name and quarantine.

        Those still streaming or still applying their commit, when others got
        further (or when they are the session's only engine). If every engine is
        still streaming, the timeout was too short for the session, not an
        engine's fault: nobody is named.
        """
        live = self._live()
        stuck = [
            n
            for n in live
            if self.runs[n].outcome != COMMITTED
            and (not self.runs[n].prepared or self.runs[n].applying)
        ]
        return stuck if len(stuck) < len(live) or len(live) == 1 else []

    def _live(self) -> list[str]:
        """Engines still in the session (not dropped, not removed)."""
        return [n for n, r in self.runs.items() if r.outcome in (ABORTED, COMMITTED)]

    def _committed(self) -> int:
        """Engines that serve the session's step (committed now, or already current)."""
        return sum(1 for r in self.runs.values() if r.outcome in (COMMITTED, CURRENT))

    def _check_quorum(self) -> None:
        if self.plan.policy != "per_engine":
            return
        quorum = self.plan.quorum(len(self.runs))
        possible = sum(1 for r in self.runs.values() if r.outcome in (ABORTED, COMMITTED, CURRENT))
        if possible < quorum:
            failed = {n: r.error for n, r in self.runs.items() if r.outcome == QUARANTINED}
            committed = [n for n, r in self.runs.items() if r.outcome == COMMITTED]
            first = next(iter(failed), None)
            raise self.error(
                f"only {possible} of {len(self.runs)} engines can still commit, fewer than "
                f"min_engines={self.plan.min_engines} ({quorum}); committed: {committed}; "
                f"failed: {failed}",
                QuorumError,
                target=first,
            )

    async def _until_removed(self, name: str, work: Any) -> None:
        """Run ``work`` for engine ``name`` unless it leaves the fleet first (then abort it)."""
        task = asyncio.ensure_future(work)
        if name not in self.fleet:
            task.cancel()
        removed = asyncio.ensure_future(
            self.fleet.removed(name).wait() if name in self.fleet else asyncio.sleep(0)
        )
        try:
            await asyncio.wait({task, removed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            removed.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.cancelled() or not task.done():
            run = self.runs[name]
            run.outcome, run.error = REMOVED, "removed from the fleet mid-session"
            await self._abort([name])
            await self._leave(name)
            return
        task.result()

    async def _drop(self, name: str, error: BaseException) -> None:
        """Engine ``name`` failed: abort it, quarantine it, stop waiting on it."""
        run = self.runs[name]
        run.outcome, run.error = QUARANTINED, last_line(error)
        self.fleet.mark(name, Health.QUARANTINED, run.error)
        if run.begun:
            await self._abort([name])
        await self._leave(name)

    async def _abort(self, names: list[str]) -> None:
        await self.fleet.abort({n: self.handles[n] for n in names}, self.id)

    async def _leave(self, name: str) -> None:
        puts = self.puts.get(self.runs[name].transport)
        if puts is not None:
            await puts.leave(name)

    def _report(self, snap: Snapshot, started: float, pinned: float, finished: float) -> SyncReport:
        view = self.fleet.view()
        targets = {}
        for name, run in self.runs.items():
            state = view.engines.get(name)
            version = (
                run.version
                if run.outcome in (COMMITTED, CURRENT)
                else (state.version if state else None)
            )
            targets[name] = TargetReport(
                name=name,
                transport=run.transport,
                outcome=run.outcome,
                version=version,
                begin_s=run.begin_s,
                transfer_s=run.transfer_s,
                commit_s=run.commit_s,
                error=run.error,
            )
        return SyncReport(
            session_id=self.id,
            step=snap.step,
            min_step=self.plan.min_step,
            policy=self.plan.policy,
            transport=self.plan.transport,
            nbytes=snap.nbytes,
            num_buckets=len(snap.buckets),
            pin_wait_s=pinned - started,
            seconds=finished - pinned,
            started_at=started,
            targets=targets,
            view=view,
            busy=self.busy,
        )

    # ----------------------------------------------------------------- endings

    async def _finish(self, pin: AsyncExitStack, claimed: list[str]) -> None:
        """Abort every engine not committed, finish the transports, release the pin.

        Commits still applying keep the pin and their engines: if any is in flight
        (we were cancelled or timed out while waiting for it), the other engines are
        aborted and released now, and the rest runs in the background once those
        commits end (a hung commit holds only its own engine, never the fleet).
        """
        for run in self.runs.values():
            if run.commit is not None and run.commit.done():
                self._settle_commit(run)  # ended while its waiter was being cancelled
        ok = all(r.outcome in (COMMITTED, CURRENT, REMOVED) for r in self.runs.values())
        applying = {n: r.commit for n, r in self.runs.items() if r.commit and r.applying}
        uncommitted = [
            n
            for n, r in self.runs.items()
            if r.begun and r.outcome not in (COMMITTED, CURRENT) and n not in applying
        ]

        async def end() -> None:
            try:
                if uncommitted:
                    await self._abort(uncommitted)
                if applying:
                    # Never give up on a commit in flight, even when cancelled (the train
                    # actor closing): the engine may be copying out of the pinned
                    # snapshot, and the pin is released only after this.
                    await uninterrupted(asyncio.wait(applying.values()))
                    for name in applying:
                        self._settle_commit(self.runs[name])
                    failed = [n for n in applying if self.runs[n].outcome != COMMITTED]
                    if failed:
                        await self._abort(failed)
                for puts in self.puts.values():
                    await puts.finish(ok)
            finally:
                await pin.aclose()
                self.fleet.release(claimed, self.id)

        if applying:
            self.fleet.release([n for n in claimed if n not in applying], self.id)
            self._adopt(end())
            return
        await shielded(end())

    def _settle_commit(self, run: _Run) -> None:
        """Record the outcome of a commit that ended after its waiter was cancelled."""
        commit = run.commit
        assert commit is not None
        if run.outcome == COMMITTED or commit.cancelled():
            return
        error = commit.exception()
        if error is None:
            run.outcome, run.version = COMMITTED, int(commit.result())
            self.fleet.committed(run.name, run.version)
        elif isinstance(error.__cause__, ray_cancelled()):
            # Cancelled with the session: the engine may have committed; ask it again.
            self.fleet.mark(run.name, Health.CATCHING_UP, "commit outcome unknown (cancelled)")
        else:
            self.fleet.mark(run.name, Health.QUARANTINED, last_line(error))

    def _hand_off(self, pin: AsyncExitStack, claimed: list[str]) -> None:
        """Let the stragglers finish in the background, holding the pin and their claims."""
        tasks = self.stragglers
        remaining = self.plan.timeout_s - (time.monotonic() - self.pinned_at)

        async def finish_stragglers() -> None:
            late = set(tasks.values())
            try:
                _, late = await asyncio.wait(tasks.values(), timeout=max(0.0, remaining))
                why = f"ran past {self.plan.timeout_s}s"
            except asyncio.CancelledError:
                why = "the train actor closed"  # stop them too, then clean up
                raise
            finally:
                for task in late:
                    task.cancel()
                await uninterrupted(asyncio.gather(*late, return_exceptions=True))
                for name, task in tasks.items():
                    if task in late:
                        await self._drop(name, self.error(f"engine {name!r}: {why}"))
                await self._finish(pin, claimed)

        self.fleet.release([n for n in claimed if n not in tasks], self.id)
        self._adopt(finish_stragglers())

    def _adopt(self, work: Any) -> None:
        task: asyncio.Task[None] = detached(work)  # type: ignore[assignment]
        self.background.add(task)
        task.add_done_callback(self.background.discard)


def ray_cancelled() -> type[BaseException]:
    """Ray's error for a cancelled remote call (imported late: Ray is optional here)."""
    from ray.exceptions import TaskCancelledError

    return TaskCancelledError


def _shareable(snap: Snapshot) -> bool:
    """Whether same-node engines can map this snapshot's memory (the shared snapshot path)."""
    return all(b.region is not None for b in snap.buckets)


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
