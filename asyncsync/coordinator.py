"""Driver side: keep a train actor's fleet in sync from any asyncio program, within a bound.

An RL orchestrator calls :meth:`SyncCoordinator.after_build` after each published
step. The coordinator keeps at most one session in flight, always asking for the
newest built step, and sends it to the train actor's fleet (the engines it was
given are added to that fleet first). ``after_build`` returns at once unless the
serving engines would fall more than ``staleness`` steps behind the trainer; only
then does the train loop wait, and only until the bound holds again.

What the engines serve is the fleet's view, as the engines report it
(:attr:`SyncCoordinator.view`), never what a session meant to do:
:attr:`SyncCoordinator.engine_version` is the oldest version a *serving* engine
serves. Under ``policy="per_engine"`` an engine that fails or lags is quarantined or
left catching up in the background, out of that minimum, so it never holds the
train loop back. A session that fails naming an engine it took out of serving
(under ``policy="all_or_nothing"``, any engine at fault; under ``per_engine``, a
:class:`~asyncsync.QuorumError`) is retried at once without that engine, at most
as many times in a row as the fleet has engines; other errors are raised.

Cancellation: awaiting an ``ObjectRef`` and cancelling the awaiting task does not
stop the remote call, so the coordinator does it. When a task awaiting
:meth:`SyncCoordinator.sync` is cancelled, or :meth:`SyncCoordinator.close` runs,
the remote session is cancelled with ``ray.cancel``; it aborts on every engine,
releases its pin, and the cancellation propagates only once the remote call has
ended (bounded by ``cancel_wait_s``).

Closing means closed: after :meth:`SyncCoordinator.close` returns no session of
this coordinator is in flight and none starts; a train loop waiting in
``after_build`` or ``drain`` wakes with :class:`~asyncsync.ClosedError`,
and every later call raises it.

One coordinator per train actor: a coordinator claims its train actor at its first
call that runs a session or changes the fleet, and keeps the claim until
:meth:`SyncCoordinator.close` (or until it is garbage-collected unclosed). A second
coordinator on the same train actor raises :class:`~asyncsync.ConfigError` from
those calls while the first is open; two would run redundant sessions on one fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import aio
from ._primitives import Signal
from .cache import CacheStats
from .errors import (
    ClosedError,
    ConfigError,
    InvalidStepError,
    NothingBuiltError,
    SessionError,
)
from .fleet import EngineState, FleetView, Health
from .plan import SyncPlan, SyncReport, fleet_plan
from .spans import Span, SpanLog, write_sync_trace

__all__ = ["SyncCoordinator"]

_BUSY_RETRY_S = 0.05
"""Pause before the next session when every engine was busy with another one."""


class SyncCoordinator:
    """Runs sessions on a train actor's fleet and waits only when staleness requires it.

    Args:
        trainer: handle of a train actor (see :func:`asyncsync.train_actor`).
        engines: engine name -> actor handle, added to the trainer's fleet on first
            use (``None``: the fleet as it is; add engines with :meth:`add_engine`).
        staleness: serving engines may serve a version at most this many steps older
            than the newest built step (``0``: wait for every sync).
        cancel_wait_s: when a session is cancelled from the driver, how long to wait
            for the remote session to finish aborting before the cancellation
            propagates anyway.
        plan: what every session does (``policy``, ``min_engines``,
            ``max_updating``, ``transport``, ``timeout_s``, ...); it must leave
            ``engines`` and ``min_step`` unset: the coordinator syncs the train
            actor's fleet and sends the newest built step. ``None``: ``SyncPlan()``.
        trace: a file to write, at :meth:`close`, the Chrome/Perfetto trace of the
            train actor's builds and sessions (its ``sync_spans()``) with the train
            loop's waits in :meth:`after_build` above them (open it in
            ui.perfetto.dev); ``None``: no trace.

    Use from one event loop. Errors of background sessions are raised from the
    next :meth:`after_build` or :meth:`drain`. At most one open coordinator per
    train actor (see the module docstring): the calls that run a session or change
    the fleet raise :class:`~asyncsync.ConfigError`, naming the train actor and the
    coordinator that holds it, while another one is open.
    """

    def __init__(
        self,
        trainer: Any,
        engines: Mapping[str, Any] | None = None,
        *,
        staleness: int = 1,
        cancel_wait_s: float = 30.0,
        plan: SyncPlan | None = None,
        trace: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ConfigError(f"staleness must be an int >= 0, got {staleness!r}")
        plan = fleet_plan(
            SyncPlan() if plan is None else plan,
            "SyncCoordinator plan",
            "the coordinator syncs the train actor's fleet and sends the newest built step; "
            "pass engines= to the coordinator instead",
        )
        if (
            isinstance(cancel_wait_s, bool)
            or not isinstance(cancel_wait_s, int | float)
            or not cancel_wait_s >= 0
        ):
            raise ConfigError(f"cancel_wait_s must be seconds >= 0, got {cancel_wait_s!r}")
        if engines is not None and (
            not isinstance(engines, Mapping) or not all(isinstance(n, str) and n for n in engines)
        ):
            raise ConfigError(
                "engines must be None or a mapping of non-empty name -> engine handle, got "
                f"{engines!r}"[:200]
            )
        if not hasattr(trainer, "run_sync_session"):
            raise ConfigError(
                f"trainer must be the handle of a train actor (see train_actor), got "
                f"{type(trainer).__name__} with no run_sync_session"
            )
        self.plan = plan
        self.trainer = trainer
        self.staleness = staleness
        self.cancel_wait_s = cancel_wait_s
        self.reports: list[SyncReport] = []
        self.view: FleetView = FleetView({})
        self._pending_engines = dict(engines or {})
        self._latest_built: int | None = None
        # after_build calls asking the train actor whether their step was built.
        self._checking = 0
        self._pump: asyncio.Task[None] | None = None
        # Tasks in sync() now, each with an event set once its remote call ended.
        self._calls: dict[asyncio.Task[Any], asyncio.Event] = {}
        # Callers' tasks that close() cancelled (their sync raises ClosedError).
        self._cancelled_by_close: set[asyncio.Task[Any]] = set()
        self._error: BaseException | None = None
        self._progress = Signal()
        self._joined = False
        self.trace = None if trace is None else Path(trace)
        self.waits = SpanLog()
        """The train loop's waits in :meth:`after_build` (kind ``"wait"``, the step noted)."""
        self._closed = False
        # This coordinator's claim on the train actor (see coordinator_claim).
        self._token = uuid.uuid4().hex
        self._holder = (
            f"made by pid {os.getpid()} on {socket.gethostname()} at "
            f"{time.strftime('%H:%M:%S')}, claim {self._token[:8]}"
        )
        self._claimed = False
        self._release_unclosed: weakref.finalize[Any, Any] | None = None

    @property
    def policy(self) -> str:
        return self.plan.policy

    @property
    def engine_version(self) -> int | None:
        """The oldest version the engines that count serve (``-1``: initial weights).

        The engines that count are the serving ones; while none is serving, those
        catching up (a fleet that never synced must get its first step before the
        train loop runs ahead). Quarantined and gone engines never count. ``None``:
        no engine counts.
        """
        oldest = self.view.oldest_serving()
        if oldest is None:
            catching = [self.view.engines[n].version for n in self.view.names(Health.CATCHING_UP)]
            oldest = min((-1 if v is None else v for v in catching), default=None)
        return oldest

    async def add_engine(self, name: str, handle: Any) -> EngineState:
        """Add an engine to the fleet; it is caught up before it counts as serving."""
        self._check_open()
        await self._claim()
        state: EngineState = await aio.get(self.trainer.fleet_add.remote(name, handle))
        await self.refresh()
        return state

    async def remove_engine(self, name: str) -> EngineState:
        """Take an engine out of the fleet (a session running on it drops it)."""
        self._check_open()
        await self._claim()
        state: EngineState = await aio.get(self.trainer.fleet_remove.remote(name))
        await self.refresh()
        return state

    async def refresh(self) -> FleetView:
        """Fetch the fleet's view from the train actor now."""
        self.view = await aio.get(self.trainer.fleet_view.remote())
        return self.view

    async def sync(self, min_step: int | None = None) -> SyncReport:
        """Run one session now (newest ready step >= ``min_step``) on the fleet.

        Cancelling the awaiting task cancels the remote session too (see the module
        docstring); ``CancelledError`` propagates once it has ended. Raises
        :class:`~asyncsync.ClosedError` after :meth:`close`, and
        :class:`~asyncsync.NothingBuiltError` at once when ``min_step`` is ``None``
        and the train actor never published a step and builds none.
        """
        self._check_open()
        await self._join_engines()
        plan = replace(self.plan, min_step=min_step)
        task = asyncio.current_task()
        ended = asyncio.Event()
        if task is not None:
            self._calls[task] = ended
        try:
            ref = self.trainer.run_sync_session.remote(plan)
            report: SyncReport = await aio.get(ref, cancel_wait_s=self.cancel_wait_s)
        except NothingBuiltError:
            # The session's message names SyncPlan; this caller passes sync's argument.
            raise NothingBuiltError(
                "SyncCoordinator.sync(): nothing to send: the train actor never published "
                "a step and no build is in flight; build (and publish) a step first, or "
                "call sync(min_step=...) to wait for that step (up to pin_timeout_s)"
            ) from None
        except asyncio.CancelledError:
            if task is None or task not in self._cancelled_by_close:
                raise
            # close() cancelled the caller's own task to end its session: the caller
            # was not cancelled by its owner, so it gets the typed error instead.
            self._cancelled_by_close.discard(task)
            task.uncancel()
            raise ClosedError(
                "the SyncCoordinator was closed while this sync ran; its session was "
                "cancelled and aborted on every engine"
            ) from None
        finally:
            if task is not None:
                self._calls.pop(task, None)
            ended.set()
        self.view = report.view
        self.reports.append(report)
        return report

    async def after_build(self, step: int) -> float:
        """Note that ``step`` was published; wait only if the staleness bound requires it.

        Starts a background session if none is running. Returns the seconds spent
        waiting for the bound. Raises the error of a failed background session, and
        :class:`~asyncsync.ClosedError` if the coordinator is (or gets)
        closed.

        ``step`` must be built: at most the train actor's ready step, or the step
        whose build is in flight. A step older than the ready step is accepted (the
        sessions send the ready step, which is newer). Any other step was never
        built and no build will publish it, so no session could ever send it:
        :class:`~asyncsync.NothingBuiltError` is raised at once, naming the cache's
        ready and building steps, and nothing changes (``drain`` does not wait for
        that step).
        """
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < -1:
            raise InvalidStepError(f"after_build: step must be an int >= -1, got {step!r}")
        await self._join_engines()
        self._checking += 1
        try:
            if self._latest_built is None or step > self._latest_built:
                await self._check_built(step)
            latest = self._latest_built
            self._latest_built = step if latest is None else max(latest, step)
        finally:
            self._checking -= 1
            self._progress.notify()
        self._raise_pending()
        self._ensure_pump()
        start = time.monotonic()
        if not self._behind(step - self.staleness):
            return 0.0
        with self.waits.span("wait", step):
            while self._behind(step - self.staleness):
                await self._wait_progress()
        return time.monotonic() - start

    async def drain(self) -> None:
        """Wait until every serving engine serves the newest built step (or raise the failure)."""
        self._check_open()
        await self._join_engines()
        while self._checking:  # a step noted before this call counts once it is checked
            await self._progress.waiter().wait()
            self._check_open()
        self._raise_pending()
        self._ensure_pump()
        while self._latest_built is not None and self._behind(self._latest_built):
            await self._wait_progress()

    async def close(self) -> None:
        """Cancel every session of this coordinator in flight; return once each has aborted.

        Waits at most ``cancel_wait_s`` per session for the remote side to end. Waiters
        in ``after_build``/``drain`` wake with
        :class:`~asyncsync.ClosedError`. Then releases the claim on the
        train actor, so that another coordinator can drive its fleet. Idempotent.
        """
        self._closed = True
        me = asyncio.current_task()
        calls = {t: e for t, e in self._calls.items() if t is not me and not t.done()}
        pump = self._pump if self._pump is not None and self._pump is not me else None
        for task in calls:
            if task is not pump:
                self._cancelled_by_close.add(task)
            task.cancel()
        if pump is not None:
            pump.cancel()
        try:
            # Wait for the sessions to end, not for the callers' tasks: a train loop
            # whose sync() raised ClosedError goes on running.
            waits: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(e.wait()) for e in calls.values()
            ]
            if pump is not None:
                waits.append(pump)
            if waits:
                await asyncio.gather(*waits, return_exceptions=True)
            await self._release()
        finally:
            self._progress.notify()
        await self._write_trace()

    # ----------------------------------------------------------------- internals

    async def _write_trace(self) -> None:
        """Write the trace asked for at construction (once; see ``trace``)."""
        path, self.trace = self.trace, None
        if path is None:
            return
        spans: list[Span] = []
        # A train actor that died has no spans to give; the driver's are still worth having.
        with contextlib.suppress(Exception):
            spans = await aio.get(self.trainer.sync_spans.remote(), cancel=False)
        await asyncio.to_thread(write_sync_trace, path, spans, self.waits.snapshot())

    async def _check_built(self, step: int) -> None:
        """Raise NothingBuiltError unless ``step`` is ready, older than ready, or building.

        Sound without a lock: a published step stays <= the ready step forever.
        """
        stats: CacheStats = await aio.get(self.trainer.cache_stats.remote())
        ready, building = stats.ready_step, stats.building_step
        if (ready is not None and step <= ready) or step == building:
            return
        in_flight = "no build is in flight" if building is None else f"building step {building}"
        raise NothingBuiltError(
            f"after_build({step}): the train actor never built step {step} (its cache: "
            f"ready step {ready}, {in_flight}), so no session could send it; call "
            "after_build(step) once build_cpu_bucket_cache(step) returned (or while it runs)"
        )

    async def _claim(self) -> None:
        """Become the train actor's one coordinator (once), or raise ConfigError."""
        if self._claimed:
            return
        holder = await aio.get(self.trainer.coordinator_claim.remote(self._token, self._holder))
        if holder is not None:
            raise ConfigError(
                f"train actor {self.trainer!r} already has an open SyncCoordinator "
                f"({holder}); two would run redundant sessions on one fleet. Use that one, "
                "or close it first (await coordinator.close()); one dropped unclosed "
                "releases the train actor when it is garbage-collected"
            )
        if not self._claimed:  # two first calls at once both get the claim: one finalizer
            self._claimed = True
            self._release_unclosed = weakref.finalize(
                self, _release_unclosed, self.trainer, self._token
            )
            self._release_unclosed.atexit = False
        if self._closed:  # close() ran while the claim was on its way
            await self._release()
            self._check_open()

    async def _release(self) -> None:
        if not self._claimed:
            return
        self._claimed = False
        if self._release_unclosed is not None:
            self._release_unclosed.detach()
        # A train actor that died or was closed holds no claim to release.
        with contextlib.suppress(Exception):
            await aio.get(self.trainer.coordinator_release.remote(self._token), cancel=False)

    def _behind(self, step: int) -> bool:
        oldest = self.engine_version
        return oldest is not None and oldest < step

    async def _join_engines(self) -> None:
        """Add the engines given at construction to the fleet, and learn the view (once)."""
        await self._claim()
        if self._joined:
            return
        pending, self._pending_engines = self._pending_engines, {}
        for name, handle in pending.items():
            await aio.get(self.trainer.fleet_add.remote(name, handle))
        await self.refresh()
        self._joined = True

    def _ensure_pump(self) -> None:
        if not self._closed and (self._pump is None or self._pump.done()):
            self._pump = asyncio.create_task(self._run_pump())

    async def _run_pump(self) -> None:
        failures = 0
        try:
            while self._latest_built is not None and (
                not self.reports or self._behind(self._latest_built)
            ):
                try:
                    report = await self.sync(min_step=self._latest_built)
                    failures = 0
                    if not report.engines:
                        # Every engine is driven by another session right now.
                        await asyncio.sleep(_BUSY_RETRY_S)
                except SessionError as exc:
                    # An engine that failed the session was quarantined: go on without it
                    # (a catch-up brings it back), unless nothing changes between tries.
                    view = await self.refresh()
                    state = view.engines.get(exc.engine) if exc.engine else None
                    failures += 1
                    if state is None or state.health is Health.SERVING:
                        raise
                    if failures > len(view.engines):
                        raise
                self._progress.notify()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._error = exc
        finally:
            self._progress.notify()

    async def _wait_progress(self) -> None:
        event = self._progress.waiter()
        if self._pump is None or self._pump.done():
            self._raise_pending()
            self._ensure_pump()
        await event.wait()
        self._check_open()
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the SyncCoordinator was closed; it starts no more sessions")


def _release_unclosed(trainer: Any, token: str) -> None:
    """Release the claim of a coordinator garbage-collected unclosed (a request, not a wait)."""
    with contextlib.suppress(Exception):
        trainer.coordinator_release.remote(token)
