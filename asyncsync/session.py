"""One sync session: pin the newest ready snapshot, stream it, commit by the plan's policy.

Flow (all on the train actor's loop; every blocking step inside a transport runs in
a worker thread):

1. pin the newest ready snapshot with step >= ``plan.min_step`` (one atomic step);
2. choose a transport per engine by where it runs (``"auto"``: the shared snapshot
   for an engine on the cache owner's node, ``plan.cross_node`` for the others), and
   refuse a same-node-only transport for an engine elsewhere before anything moves
   (:class:`~asyncsync.TopologyError`);
3. ``begin`` with the manifest (engines refuse what they cannot take): under
   ``"all_or_nothing"``, and for engines of a transport whose engines form one
   group (the collective), on every engine before anything streams; otherwise each
   engine begins on its own and streams as soon as it has, so one slow or dead
   engine holds up nobody else;
4. stream: every engine pulls the buckets in order with at most
   ``plan.max_inflight_buckets`` unacknowledged; each bucket is put once per
   transport (whichever engine needs it first) and released when every engine of
   that transport has it; an engine that acknowledged every bucket has staged and
   verified everything: it is *prepared*;
5. commit, by ``plan.policy``:

   ``"all_or_nothing"`` (two phases): commit starts only once every engine is
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
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from ._primitives import detached, shielded, uninterrupted
from .cache import BucketCache, Snapshot
from .client import EngineClient, SessionTag
from .delta import DeltaSnapshot, DeltaStore
from .errors import (
    NothingBuiltError,
    QuorumError,
    SessionError,
    SessionTimeoutError,
    TopologyError,
    first_session_error,
    last_line,
)
from .fleet import EngineFleet, Health
from .metrics import MetricsRecorder, SessionRecord, session_phases
from .plan import ALL_OR_NOTHING, PER_ENGINE, EngineReport, Outcome, SyncPlan, SyncReport
from .protocol import weights_identity
from .spans import SpanLog
from .transport import AUTO, SessionContext, Transport, backend
from .transport.fanout import BucketFanOut

__all__ = ["run_session"]

T = TypeVar("T")


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
    metrics: MetricsRecorder | None = None,
    deltas: DeltaStore | None = None,
) -> SyncReport:
    """Run one session as described in the module docstring.

    Args:
        fleet: the engines (the train actor's fleet, or an ad-hoc one for
            ``plan.engines``); health and versions are recorded there.
        transports: the train side of a transport by backend name (kept by the
            train actor across sessions).
        names: the engines (default: ``fleet.session_engines()``). An engine a
            catch-up drives is waited for (within ``plan.timeout_s``) and then
            included; one another session drives (a straggler) is skipped and
            reported in ``SyncReport.busy``.
        owner_node: the cache owner's Ray node (``None``: not in Ray, where every
            engine counts as on the same node).
        background: work that outlives this call (stragglers still streaming, commits
            still applying after a cancellation) is added here, so its owner can
            wait for it or cancel it at shutdown.
        kind: ``"catch_up"`` for the fleet keeper's catch-up sessions.
        metrics: told how the session ended (see :mod:`asyncsync.metrics`).
        deltas: the train actor's deltas (see :mod:`asyncsync.delta`): engines on
            the base of the pinned step's delta get it, as ``plan.delta`` says.
    """
    session = _Session(cache, plan, fleet, transports, owner_node, background, spans, kind)
    session.deltas = deltas
    engines = list(fleet.session_engines() if names is None else names)
    if metrics is None:
        return await session.run(engines)
    result = "ok"
    try:
        return await session.run(engines)
    except BaseException as exc:
        result = type(exc).__name__
        raise
    finally:
        metrics.session(session.record(result))


@dataclass(eq=False)
class _Run:
    """One engine's part of a session."""

    name: str
    transport: str
    begin_s: float = 0.0
    transfer_s: float = 0.0
    commit_s: float = 0.0
    outcome: Outcome = Outcome.ABORTED
    version: int | None = None
    error: str | None = None
    begun: bool = False
    prepared: bool = False
    commit: asyncio.Future[int] | None = None
    delta: bool = False  # streams the delta on its base (not the full snapshot)
    sent_bytes: int = 0

    @property
    def stream(self) -> tuple[str, bool]:
        """Its fan-out: the transport, and whether it carries the delta."""
        return (self.transport, self.delta)

    @property
    def applying(self) -> bool:
        """A commit was sent and has not ended (it is never interrupted)."""
        return self.commit is not None and not self.commit.done()


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
        # Handles as the session started: aborts reach engines removed mid-session too.
        self.handles: dict[str, Any] = {}
        self.kind = kind
        self.cache = cache
        self.plan = plan
        self.fleet = fleet
        # Calls go to the handles the session started with (an engine removed from the
        # fleet mid-session is still reachable for its abort); failures still reach
        # the fleet, which takes an unreachable engine out of routing at once.
        self.client = EngineClient(
            self.handles.__getitem__, fleet.deadlines, on_failure=fleet.call_failed
        )
        self.transports = transports
        self.owner_node = owner_node
        self.background = background if background is not None else set()
        self.spans = spans
        self.step = -1
        self.identity: str | None = None
        self.tag = SessionTag(self.id)
        self.runs: dict[str, _Run] = {}
        self.puts: dict[tuple[str, bool], BucketFanOut] = {}
        self.deltas: DeltaStore | None = None
        self.delta: DeltaSnapshot | None = None
        self.pin = AsyncExitStack()  # the run's: what it holds until the session ends
        self.busy: tuple[str, ...] = ()
        self.snap: Snapshot | None = None
        self.pinned_at = 0.0
        self.started_at = time.monotonic()
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

    def _settle(
        self,
        name: str,
        outcome: Outcome,
        *,
        version: int | None = None,
        error: BaseException | None = None,
        reason: str | None = None,
    ) -> None:
        """Record what became of engine ``name``: in the session and in the fleet, together.

        ``committed`` / ``current``: it serves ``version`` (as it reported);
        ``quarantined``: it failed with ``error`` (out of routing; a restart in
        progress makes it ``catching_up`` instead, see
        :meth:`~asyncsync.EngineFleet.failed`); ``catching_up``: it goes on without
        the session (``reason``); ``removed`` / ``aborted``: the session only.
        """
        run = self.runs[name]
        run.outcome = outcome
        if outcome in (Outcome.COMMITTED, Outcome.CURRENT):
            assert version is not None
            run.version = version
            self.fleet.committed(name, version, self.identity)
        elif outcome is Outcome.QUARANTINED:
            assert error is not None
            run.error = last_line(error)
            self.fleet.failed(name, error)
        elif outcome is Outcome.CATCHING_UP:
            run.error = reason
            self.fleet.mark(name, Health.CATCHING_UP, reason)
        elif reason is not None:
            run.error = reason

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
            self.pin = pin
            # A pass over every tensor's record: off the loop for large models.
            self.identity = await asyncio.to_thread(weights_identity, snap.manifest)
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
                await self._begin(self._begin_first())
                await self._start_transports()
                if self.plan.policy == ALL_OR_NOTHING:
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
            # Under all_or_nothing an engine that failed the session is taken out of routing
            # (a catch-up brings it back); a refused plan is nobody's fault.
            name = exc.engine
            if not isinstance(exc, TopologyError) and name in self.runs:
                if self.runs[name].outcome is not Outcome.QUARANTINED:
                    self._settle(name, Outcome.QUARANTINED, error=exc)
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

            async def info(name: str) -> None:
                found = await self.client.engine_info(name, session=self.tag, probe=False)
                self.fleet.observe(name, found)

            await self._on_engines(unknown, info)
        shareable = _shareable(self.snap)
        for name in self._live():
            self.runs[name].transport = self._choose(name, self.fleet.node_of(name), shareable)
        await self._choose_deltas()

    async def _choose_deltas(self) -> None:
        """Per engine, the delta or the full snapshot, by the version the fleet knows
        it serves; engines of one grouped transport share one stream (all or none)."""
        if self.plan.delta == "never" or self.deltas is None:
            return
        always = self.plan.delta == "always"
        wanted = [name for name in self._live() if always or self._across_nodes(name)]
        if not wanted:
            return
        self.deltas.want()  # computed from the next publish on, if it was not yet
        if not always and self.deltas.skip_if_larger(self.plan.delta_max_ratio):
            # The newest delta made was too large for this plan: full snapshots now,
            # without waiting for this step's computation.
            return
        # Held with the pin: the delta's buffers stay while this session streams. A
        # computation in flight (maybe of this step) is waited for, within the timeout.
        delta = await self.pin.enter_async_context(self.deltas.pinned(self.step))
        self.delta = delta
        if delta is None:
            return
        if not always and delta.ratio > self.plan.delta_max_ratio:
            # Changed too much to repay its CPU cost: full snapshots this session.
            return
        base = delta.header
        view = self.fleet.view().engines
        for name in wanted:
            run, state = self.runs[name], view.get(name)
            run.delta = (
                state is not None
                and state.version == base.base_step
                and state.weights == base.base_weights
            )
        for transport in {r.transport for r in self.runs.values()}:
            group = [self.runs[n] for n in self._live() if self.runs[n].transport == transport]
            if backend(transport).grouped and not all(r.delta for r in group):
                for run in group:
                    run.delta = False

    def _across_nodes(self, name: str) -> bool:
        """Whether ``name`` runs on another Ray node than the cache owner (its bytes
        cross the network): where ``delta="auto"`` sends deltas."""
        node = self.fleet.node_of(name)
        return (
            node is not None
            and self.owner_node is not None
            and node != self.owner_node
            and not backend(self.runs[name].transport).same_node_only
        )

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
                engine=name,
                transport=plan.transport,
            )
        return plan.transport

    # ----------------------------------------------------------------- phases

    async def _on_engines(
        self, names: list[str], call: Callable[[str], Awaitable[T]]
    ) -> dict[str, T]:
        """``call(name)`` on every engine at once. Under ``all_or_nothing`` the first
        failure fails the session; under ``per_engine`` failed engines are
        quarantined and dropped, and the quorum is checked."""
        if self.plan.policy == ALL_OR_NOTHING:
            return await self.client.fan_out(names, call)
        outcomes = await self.client.settle(names, call)
        results = {}
        for name, outcome in outcomes.items():
            if isinstance(outcome, BaseException):
                await self._drop(name, outcome)
            else:
                results[name] = outcome
        self._check_quorum()
        return results

    def _begin_first(self) -> list[str]:
        """The engines that must all have begun before any transport starts.

        Every engine under ``all_or_nothing`` (nothing streams until all took the
        manifest); under ``per_engine`` only those of a transport whose engines form
        one group (the collective: each broadcast reaches every member). The others
        begin in their own stream, so a slow or dead engine holds up no one else.
        """
        live = self._live()
        if self.plan.policy == ALL_OR_NOTHING:
            return live
        return [n for n in live if backend(self.runs[n].transport).grouped]

    async def _begin(self, names: list[str]) -> None:
        await self._on_engines(names, self._begin_one)

    async def _begin_one(self, name: str) -> None:
        """``begin`` on ``name``; an engine that serves the step already is ``current``."""
        assert self.snap is not None
        run = self.runs[name]
        ttl = self.plan.timeout_s + self.fleet.deadlines.abort_s
        run.begun = True
        start = time.monotonic()
        info = None
        if run.delta:
            assert self.delta is not None
            header = self.delta.header
            info = await self.client.begin_delta(name, self.tag, self.snap.manifest, header, ttl)
            if info is None:
                # It does not serve the delta's base after all: the full snapshot, in
                # this session (out of a grouped transport, whose members share one
                # stream, onto the object store).
                await self._restream(name)
        if info is None:
            info = await self.client.begin(name, self.tag, self.snap.manifest, ttl)
        run.begin_s = time.monotonic() - start
        self.fleet.observe(name, info)
        if info.version == self.step and info.weights == self.identity:
            # The engine itself says it serves this very snapshot already (its step
            # and the identity of its weights): send nothing.
            self._settle(name, Outcome.CURRENT, version=self.step)
            await self._abort([name])
            await self._leave(name)

    async def _start_transports(self) -> None:
        by_stream: dict[tuple[str, bool], dict[str, Any]] = {}
        for name in self._live():
            by_stream.setdefault(self.runs[name].stream, {})[name] = self.handles[name]
        for stream, engines in by_stream.items():
            self.puts[stream] = self._fan_out(stream, engines)
        for puts in self.puts.values():
            await puts.start()

    def _fan_out(self, stream: tuple[str, bool], engines: dict[str, Any]) -> BucketFanOut:
        assert self.snap is not None
        transport, delta = stream
        if delta:
            assert self.delta is not None
            # Its own id for the transport: the full snapshot's puts of the same
            # session on the same transport are other objects.
            ctx = SessionContext(
                f"{self.id}.delta", self.step, engines, self.delta.header.payload, self.client
            )
            return BucketFanOut(transport, self.transports(transport), ctx, self.delta.buckets)
        ctx = SessionContext(self.id, self.step, engines, self.snap.manifest, self.client)
        return BucketFanOut(transport, self.transports(transport), ctx, self.snap.buckets)

    async def _restream(self, name: str) -> None:
        """``name`` refused the delta: it streams the full snapshot instead."""
        run = self.runs[name]
        old = self.puts.get(run.stream)
        if old is not None:
            await old.leave(name)
        run.delta = False
        if backend(run.transport).grouped:
            run.transport = "object_store"
        if not self.puts:
            return  # transports not started yet: it joins the full stream at start
        puts = self.puts.get(run.stream)
        if puts is None:
            puts = self.puts[run.stream] = self._fan_out(run.stream, {name: self.handles[name]})
            await puts.start()
        else:
            puts.join(name)

    async def _begin_and_stream(self, name: str) -> None:
        """``per_engine``: begin (unless done with the first ones), then stream."""
        if not self.runs[name].begun:
            await self._begin_one(name)
            if self.runs[name].outcome is not Outcome.ABORTED:
                return  # current: nothing to send
        await self._stream(name)

    async def _stream(self, name: str) -> None:
        """Send every bucket to ``name``; returns once it acknowledged them all (prepared)."""
        run = self.runs[name]
        puts = self.puts[run.stream]
        assert self.snap is not None
        inflight = asyncio.Semaphore(self.plan.max_inflight_buckets)
        start = time.monotonic()

        async def receive(index: int, payload: Any) -> None:
            try:
                what = f"receive of bucket {index} ({run.transport})"
                await self.client.receive(name, self.tag, index, payload, what)
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
        run.sent_bytes = sum(b.nbytes for b in puts.buckets)
        run.transfer_s = time.monotonic() - start
        run.prepared = True

    async def _commit(self, name: str, updating: asyncio.Semaphore) -> None:
        """Commit on ``name``; the commit is never interrupted once sent (see the module doc)."""
        run = self.runs[name]
        async with updating:
            if not self._member(name):
                # Removed while it waited for its rolling-update slot: it is out of the
                # session, like an engine removed while streaming.
                self._settle(name, Outcome.REMOVED, reason="removed from the fleet mid-session")
                await self._abort([name])
                await self._leave(name)
                return
            start = time.monotonic()
            run.commit = detached(self.client.commit(name, self.tag))
            try:
                version = await asyncio.shield(run.commit)
            except SessionError:
                # Its apply may have written part of the new weights: until it reports
                # again, the fleet knows no version for it (never claims the old one).
                self.fleet.version_unknown(name)
                raise
        run.commit_s = time.monotonic() - start
        self._settle(name, Outcome.COMMITTED, version=int(version))

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
            if isinstance(error, SessionError) and error.engine in self.runs:
                self._settle(error.engine, Outcome.QUARANTINED, error=error)
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
        committed = [n for n in live if self.runs[n].outcome is Outcome.COMMITTED]
        if live and not committed:
            first = self.runs[live[0]]
            raise self.error(f"no engine could commit; {live[0]!r}: {first.error}", engine=live[0])

    async def _per_engine_policy(self, end: float | None) -> None:
        """``end``: the session's deadline (loop time; ``None``: none)."""
        loop = asyncio.get_running_loop()
        updating = self._updating()
        live = self._live()
        quorum = self.plan.quorum(len(self.runs))
        start = time.monotonic()

        async def engine(name: str) -> None:
            try:
                await self._until_removed(name, self._begin_and_stream(name))
                if self.runs[name].outcome is Outcome.ABORTED:  # still in: prepared
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
            self._settle(name, Outcome.CATCHING_UP, reason=f"still receiving step {self.step}")
            self.stragglers[name] = task

    # ----------------------------------------------------------------- helpers

    def _timed_out(self) -> SessionError:
        """The error of a session past its timeout; the engines that held it up are quarantined."""
        stuck = self._stuck()
        for culprit in stuck:
            late = self.error(
                f"engine {culprit!r} had not finished when the session ran past "
                f"{self.plan.timeout_s}s",
                SessionTimeoutError,
                engine=culprit,
            )
            self._settle(culprit, Outcome.QUARANTINED, error=late)
        error: SessionError = self.error(
            f"ran past {self.plan.timeout_s}s" + (f"; not finished: {stuck}" if stuck else ""),
            SessionTimeoutError,
            engine=stuck[0] if stuck else None,
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
            if self.runs[n].outcome is not Outcome.COMMITTED
            and (not self.runs[n].prepared or self.runs[n].applying)
        ]
        return stuck if len(stuck) < len(live) or len(live) == 1 else []

    def _live(self) -> list[str]:
        """Engines still in the session (not dropped, not removed)."""
        return [
            n for n, r in self.runs.items() if r.outcome in (Outcome.ABORTED, Outcome.COMMITTED)
        ]

    def _committed(self) -> int:
        """Engines that serve the session's step (committed now, or already current)."""
        return sum(1 for r in self.runs.values() if r.outcome in _SERVES_STEP)

    def _check_quorum(self) -> None:
        if self.plan.policy != PER_ENGINE:
            return
        quorum = self.plan.quorum(len(self.runs))
        possible = sum(
            1 for r in self.runs.values() if r.outcome in (Outcome.ABORTED, *_SERVES_STEP)
        )
        if possible < quorum:
            failed = {n: r.error for n, r in self.runs.items() if r.outcome is Outcome.QUARANTINED}
            committed = [n for n, r in self.runs.items() if r.outcome is Outcome.COMMITTED]
            first = next(iter(failed), None)
            raise self.error(
                f"only {possible} of {len(self.runs)} engines can still commit, fewer than "
                f"min_engines={self.plan.min_engines} ({quorum}); committed: {committed}; "
                f"failed: {failed}",
                QuorumError,
                engine=first,
            )

    def _member(self, name: str) -> bool:
        """Whether ``name`` is still the fleet's member that this session started with."""
        return name in self.fleet and self.fleet.handle(name) == self.handles[name]

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
            elif not task.cancelled():
                # Mark its outcome seen: when this wait itself is cancelled (a sibling
                # engine failed the session first) the error is the session's, already
                # reported; asyncio would otherwise log "exception was never retrieved".
                task.exception()
        if task.cancelled() or not task.done():
            self._settle(name, Outcome.REMOVED, reason="removed from the fleet mid-session")
            await self._abort([name])
            await self._leave(name)
            return
        task.result()

    async def _drop(self, name: str, error: BaseException) -> None:
        """Engine ``name`` failed: abort it, quarantine it, stop waiting on it."""
        run = self.runs[name]
        self._settle(name, Outcome.QUARANTINED, error=error)
        if run.begun:
            await self._abort([name])
        await self._leave(name)

    async def _abort(self, names: list[str]) -> None:
        await self.client.abort({n: self.handles[n] for n in names}, self.id)

    async def _leave(self, name: str) -> None:
        puts = self.puts.get(self.runs[name].stream)
        if puts is not None:
            await puts.leave(name)

    def record(self, result: str) -> SessionRecord:
        """What the metrics recorder keeps of this session, ended with ``result``."""
        now = time.monotonic()
        pinned = self.pinned_at or now
        snap = self.snap
        return SessionRecord(
            kind=self.kind,
            result=result,
            step=snap.step if snap is not None else None,
            nbytes=snap.nbytes if snap is not None else 0,
            pin_wait_s=pinned - self.started_at,
            seconds=now - pinned if self.pinned_at else 0.0,
            outcomes={n: r.outcome for n, r in self.runs.items()},
            phases=session_phases(
                [(r.begin_s, r.transfer_s, r.commit_s) for r in self.runs.values()]
            ),
            ended_at=time.time(),
        )

    def _report(self, snap: Snapshot, started: float, pinned: float, finished: float) -> SyncReport:
        view = self.fleet.view()
        engines = {}
        for name, run in self.runs.items():
            state = view.engines.get(name)
            version = (
                run.version if run.outcome in _SERVES_STEP else (state.version if state else None)
            )
            engines[name] = EngineReport(
                name=name,
                transport=run.transport,
                outcome=run.outcome,
                version=version,
                begin_s=run.begin_s,
                transfer_s=run.transfer_s,
                commit_s=run.commit_s,
                error=run.error,
                delta=run.delta,
                sent_bytes=run.sent_bytes,
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
            engines=engines,
            view=view,
            busy=self.busy,
            weights=self.identity,
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
        ok = all(r.outcome in (*_SERVES_STEP, Outcome.REMOVED) for r in self.runs.values())
        applying = {n: r.commit for n, r in self.runs.items() if r.commit and r.applying}
        uncommitted = [
            n
            for n, r in self.runs.items()
            if r.begun and r.outcome not in _SERVES_STEP and n not in applying
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
                    failed = [n for n in applying if self.runs[n].outcome is not Outcome.COMMITTED]
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
        if run.outcome is Outcome.COMMITTED or commit.cancelled():
            return
        error = commit.exception()
        if error is None:
            self._settle(run.name, Outcome.COMMITTED, version=int(commit.result()))
        elif isinstance(error.__cause__, ray_cancelled()):
            # Cancelled with the session: the engine may have committed; ask it again.
            reason = "commit outcome unknown (cancelled)"
            self._settle(run.name, Outcome.CATCHING_UP, reason=reason)
        else:
            self.fleet.version_unknown(run.name)
            self._settle(run.name, Outcome.QUARANTINED, error=error)

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


# Outcomes of an engine that serves the session's step.
_SERVES_STEP = (Outcome.COMMITTED, Outcome.CURRENT)
