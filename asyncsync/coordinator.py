"""Driver side: run sync sessions from any asyncio program, with a staleness bound.

An RL orchestrator calls :meth:`SyncCoordinator.after_build` after each published
step. The coordinator keeps at most one session in flight, always asking for the
newest built step, and records the version the engines committed as the step each
session *reports* (never the step it asked for). ``after_build`` returns at once
unless the engines would fall more than ``staleness`` versions behind the trainer;
only then does the train loop wait, and only until the bound holds again.

Cancellation: awaiting an ``ObjectRef`` and cancelling the awaiting task does not
stop the remote call, so the coordinator does it. When a task awaiting
:meth:`SyncCoordinator.sync` is cancelled (or :meth:`SyncCoordinator.close` cancels
the background session), the remote session is cancelled with ``ray.cancel``; it
aborts on every engine, releases its pin and removes its temporary files, and the
cancellation propagates only once the remote call has ended (bounded by
``cancel_wait_s``). So after ``close()`` returns, or after a cancelled ``sync()``
raised ``CancelledError``, no session of this coordinator is in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from . import aio
from .errors import ConfigError
from .session import SyncPlan, SyncReport

__all__ = ["SyncCoordinator"]


class SyncCoordinator:
    """Chooses targets, runs sessions on the train actor, publishes what they report.

    Args:
        trainer: handle of a train actor (see :func:`asyncsync.train_actor`).
        engines: engine name -> actor handle; every session targets all of them.
        staleness: the engines may serve a version at most this many steps older
            than the newest built step (``0``: wait for every sync).
        engine_version: the version the engines serve now (``-1``: base weights).
        cancel_wait_s: when a session is cancelled from the driver, how long to wait
            for the remote session to finish aborting before the cancellation
            propagates anyway.
        plan_options: further :class:`~asyncsync.SyncPlan` fields (``transport``,
            ``timeout_s``, ``max_inflight_buckets``, ...).

    Use from one event loop. Errors of background sessions are raised from the
    next :meth:`after_build` or :meth:`drain`.
    """

    def __init__(
        self,
        trainer: Any,
        engines: Mapping[str, Any],
        *,
        staleness: int = 1,
        engine_version: int = -1,
        cancel_wait_s: float = 30.0,
        **plan_options: Any,
    ) -> None:
        if staleness < 0:
            raise ConfigError(f"staleness must be >= 0, got {staleness}")
        SyncPlan(targets=engines, **plan_options)  # validate options early
        self.trainer = trainer
        self.engines = dict(engines)
        self.staleness = staleness
        self.engine_version = engine_version
        self.cancel_wait_s = cancel_wait_s
        self.reports: list[SyncReport] = []
        self._plan_options = plan_options
        self._latest_built: int | None = None
        self._pump: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._progress = asyncio.Event()

    async def sync(self, version: int | None = None) -> SyncReport:
        """Run one session now (newest ready step >= ``version``) and publish its step.

        Cancelling the awaiting task cancels the remote session too (see the module
        docstring); ``CancelledError`` propagates once it has ended.
        """
        plan = SyncPlan(targets=self.engines, version=version, **self._plan_options)
        ref = self.trainer.run_sync_session.remote(plan)
        report: SyncReport = await aio.get(ref, cancel_wait_s=self.cancel_wait_s)
        self.engine_version = max(self.engine_version, report.step)
        self.reports.append(report)
        return report

    async def after_build(self, step: int) -> float:
        """Note that ``step`` was published; wait only if the staleness bound requires it.

        Starts a background session if none is running. Returns the seconds spent
        waiting for the bound. Raises the error of a failed background session.
        """
        self._latest_built = step if self._latest_built is None else max(self._latest_built, step)
        self._raise_pending()
        self._ensure_pump()
        start = time.monotonic()
        while step - self.engine_version > self.staleness:
            await self._wait_progress()
        return time.monotonic() - start

    async def drain(self) -> None:
        """Wait until the engines serve the newest built step (or raise the failure)."""
        self._raise_pending()
        self._ensure_pump()
        while self._latest_built is not None and self.engine_version < self._latest_built:
            await self._wait_progress()

    async def close(self) -> None:
        """Cancel the session in flight, if any; return once it has aborted on every engine.

        Waits at most ``cancel_wait_s`` for the remote session to end.
        """
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
            try:
                await self._pump
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # close() itself was cancelled, not just the pump

    def _ensure_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._run_pump())

    async def _run_pump(self) -> None:
        try:
            while self._latest_built is not None and self.engine_version < self._latest_built:
                await self.sync(version=self._latest_built)
                self._notify()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._error = exc
        finally:
            self._notify()

    async def _wait_progress(self) -> None:
        event = self._progress
        if self._pump is None or self._pump.done():
            self._raise_pending()
            self._ensure_pump()
        await event.wait()
        self._raise_pending()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
