"""The fleet's keeper: probes the engines and brings those not serving to the newest step.

One :class:`FleetKeeper` runs on the train actor's loop for the actor's fleet.
Every ``probe_interval_s`` (sooner when an engine needs it) it probes every engine
(:meth:`~asyncsync.EngineFleet.refresh`: restarts, deaths, versions) and, for each
engine that is catching up or quarantined (past its back-off) and driven by no
session, runs a catch-up session once a step is ready. At most ``max_updating``
catch-ups run at once (``None``: no bound), so a wave of restarts never updates
more engines at once than the rolling-update bound allows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from .fleet import EngineFleet

__all__ = ["FleetKeeper"]


class FleetKeeper:
    """Keeps ``fleet`` serving the newest ready step.

    Args:
        fleet: the engines.
        catch_up: brings one engine to the newest ready step and records its
            health in the fleet (a catch-up session); its failure is recorded as
            the engine's failure.
        ready_step: the newest ready step (``None``: nothing built yet).
        max_updating: catch-ups at once (``None``: no bound).
    """

    def __init__(
        self,
        fleet: EngineFleet,
        catch_up: Callable[[str], Awaitable[None]],
        ready_step: Callable[[], int | None],
        *,
        max_updating: int | None = None,
    ) -> None:
        self.fleet = fleet
        self._catch_up = catch_up
        self._ready_step = ready_step
        self.max_updating = max_updating
        self._task: asyncio.Task[None] | None = None
        self._catch_ups: dict[str, asyncio.Task[None]] = {}
        self._closed = False

    def start(self) -> None:
        """Start on the running loop (idempotent; never after :meth:`close`)."""
        if self._closed or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.get_running_loop().create_task(self._keep())

    async def _keep(self) -> None:
        fleet = self.fleet
        while not self._closed:
            fleet.wake.clear()
            await fleet.refresh()
            if self._ready_step() is not None:
                for name in fleet.due_for_catch_up():
                    if self.max_updating is not None and len(self._catch_ups) >= self.max_updating:
                        break
                    if name not in self._catch_ups:
                        self._catch_ups[name] = asyncio.get_running_loop().create_task(
                            self._run(name)
                        )
            try:
                async with asyncio.timeout(fleet.deadlines.probe_interval_s):
                    await fleet.wake.wait()
            except TimeoutError:
                pass

    async def _run(self, name: str) -> None:
        try:
            await self._catch_up(name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.fleet.failed(name, exc)
        finally:
            self._catch_ups.pop(name, None)
            self.fleet.wake.set()  # a slot is free: the next engine may go

    async def close(self) -> None:
        """Stop probing and every catch-up; wait for them to end."""
        self._closed = True
        tasks = [t for t in [self._task, *self._catch_ups.values()] if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._catch_ups.clear()
