"""The train-actor side: an async Ray actor that builds snapshots and runs sync sessions.

Subclass :class:`WeightSyncActor`, implement :meth:`WeightSyncActor.named_weights`,
and create the actor with :func:`train_actor`, which applies ``ray.remote`` with an
explicit ``max_concurrency`` so that a build of step N+1 and a session streaming
step N run at the same time on the actor's one event loop:

```python
class Trainer(WeightSyncActor):
    def __init__(self) -> None:
        super().__init__(bucket_bytes=256 << 20)
        self.model = ...

    def named_weights(self, step):            # runs in a worker thread
        return self.model.state_dict().items()

TrainerActor = train_actor(Trainer, max_concurrency=16, num_cpus=1)
trainer = TrainerActor.remote()
await trainer.build_cpu_bucket_cache.remote(0)
await trainer.fleet_add.remote("e0", engine)
report = await trainer.run_sync_session.remote(SyncPlan())   # the fleet, all or nothing
```

Every method that touches the cache must be ``async def`` and stay in the default
concurrency group: Ray gives each group its own loop and thread, and the cache's
one lock only guards one loop. :func:`train_actor` refuses classes that break this.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from ._checks import check_int, check_number, is_number
from .buckets import tensor_digest
from .cache import DEFAULT_BUCKET_BYTES, BucketCache, CacheStats
from .client import Deadlines
from .delta import DeltaStats, DeltaStore
from .errors import (
    ActorDefinitionError,
    AdmissionError,
    ClosedError,
    ConfigError,
    InvalidStepError,
    NothingBuiltError,
)
from .fleet import EngineFleet, EngineState, FleetView, Health
from .keeper import FleetKeeper
from .metrics import FleetStatus, MetricsRecorder
from .plan import PER_ENGINE, SyncPlan, SyncReport, fleet_plan
from .protocol import weights_identity
from .receiver import current_node
from .session import run_session
from .spans import Span, SpanLog
from .transport import Transport, backend

__all__ = [
    "CACHE_METHODS",
    "DEFAULT_MAX_CONCURRENCY",
    "RESERVED_SLOTS",
    "ActorSlots",
    "FleetUpdate",
    "WeightSyncActor",
    "cache_method",
    "train_actor",
]

DEFAULT_MAX_CONCURRENCY = 16
"""Default ``max_concurrency`` of a train actor: room for a build, several sessions,
the user's own calls (a train step, stats) and readers, without unbounded fan-in."""

RESERVED_SLOTS = 2
"""Slots of ``max_concurrency`` that sessions never take: one for a build, one for a
control call (ready step, stats, fleet changes, the user's train step)."""

CACHE_METHODS = (
    "build_cpu_bucket_cache",
    "run_sync_session",
    "cache_ready_step",
    "cache_stats",
    "delta_stats",
    "ready_snapshot_digests",
    "sync_spans",
    "fleet_status",
    "fleet_add",
    "fleet_remove",
    "fleet_view",
    "fleet_refresh",
    "fleet_watch",
    "snapshot_identity",
    "coordinator_claim",
    "coordinator_release",
    "close",
)

_IDENTITIES_KEPT = 4096
"""How many built steps' weights identities a train actor remembers."""


@dataclass(frozen=True)
class FleetUpdate:
    """What :meth:`WeightSyncActor.fleet_watch` answers: the fleet at ``epoch``.

    ``handles`` are the engines' actor handles by name (a router calls them
    directly); ``ready_step`` the newest published step (``None``: none yet).
    """

    epoch: int
    view: FleetView
    ready_step: int | None
    handles: Mapping[str, Any]
    changed_at: float | None = None
    """When the fleet changed to this epoch (wall clock on the train actor)."""


_MARK = "__asyncsync_cache_method__"
F = TypeVar("F", bound=Callable[..., Any])


def cache_method(fn: F) -> F:
    """Mark a user method that touches the cache, so :func:`train_actor` checks it too."""
    setattr(fn, _MARK, True)
    return fn


@dataclass(frozen=True)
class ActorSlots:
    """How a train actor's ``max_concurrency`` slots are shared.

    Every call in flight holds a slot, a session waiting for its step included. At
    most :attr:`sessions` sessions are admitted at once; the ``reserved`` slots
    stay free for builds and control calls, so however many sessions are sent, a
    build always gets to run (and the step they wait for gets built).
    """

    max_concurrency: int
    reserved: int

    @property
    def sessions(self) -> int:
        return self.max_concurrency - self.reserved


class WeightSyncActor:
    """Base class of train actors: owns the bucket cache, the fleet and the weight-sync methods.

    Args:
        bucket_bytes: payload budget per bucket (see :class:`~asyncsync.BucketCache`).
        max_resident_bytes: bound on the cache's host memory (``None``: unbounded).
        transport_options: per-transport keyword arguments, e.g.
            ``{"collective": {"timeout_s": 60}}``.
        deadlines: every bound on a call to an engine (control calls, aborts,
            probes and how often the fleet probes its engines); see
            :class:`~asyncsync.client.Deadlines`.
        catch_up_plan: what the fleet's catch-up sessions do (transport,
            ``cross_node``, ``timeout_s``, ``pin_timeout_s``,
            ``max_inflight_buckets``; its ``max_updating`` bounds how many engines
            are caught up at once). It must leave ``engines`` and ``min_step``
            unset (a catch-up sends the newest ready step to one engine) and is
            run ``per_engine``. Default: ``SyncPlan(policy="per_engine")``.
        metrics: record Ray metrics (``ray.util.metrics``, served on Ray's
            Prometheus endpoint with ``asyncsync[metrics]``); ``False`` turns them
            off. ``metrics_interval_s``: how often the gauges are sampled and each
            engine is asked for its ``receiver_stats()``. See
            :mod:`asyncsync.metrics` and the "Operating asyncsync" guide.
        delta_sync: compute, after each publish, the delta of the new snapshot
            against the previous one, for engines that serve it (see
            :mod:`asyncsync.delta`). Nothing is computed until a session first
            has an engine a delta would go to (one across nodes, or
            ``SyncPlan(delta="always")``); from then on it costs a private copy of
            the newest snapshot (1x the model) and one pass over it per publish, in
            a worker thread. ``False``: full snapshots only.

    Create it with :func:`train_actor`, which sets ``max_concurrency`` and tells the
    instance how many sessions it may admit (:class:`ActorSlots`).
    """

    _asyncsync_slots: ClassVar[ActorSlots] = ActorSlots(DEFAULT_MAX_CONCURRENCY, RESERVED_SLOTS)

    def __init__(
        self,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        max_resident_bytes: int | None = None,
        transport_options: dict[str, dict[str, Any]] | None = None,
        deadlines: Deadlines | None = None,
        catch_up_plan: SyncPlan | None = None,
        metrics: bool = True,
        metrics_interval_s: float = 5.0,
        delta_sync: bool = True,
    ) -> None:
        if deadlines is not None and not isinstance(deadlines, Deadlines):
            raise ConfigError(f"deadlines must be a Deadlines, got {deadlines!r}"[:200])
        catch_up_plan = fleet_plan(
            SyncPlan(policy=PER_ENGINE) if catch_up_plan is None else catch_up_plan,
            "catch_up_plan",
            "a catch-up sends the newest ready step to the one engine that needs it",
        )
        if transport_options is not None and not (
            isinstance(transport_options, dict)
            and all(isinstance(o, dict) for o in transport_options.values())
        ):
            raise ConfigError(
                "transport_options must map a transport name to a dict of its options, got "
                f"{transport_options!r}"[:200]
            )
        self.weight_cache = BucketCache(bucket_bytes, max_resident_bytes)
        if not isinstance(delta_sync, bool):
            raise ConfigError(f"delta_sync must be True or False, got {delta_sync!r}"[:200])
        self.deltas = DeltaStore(self.weight_cache) if delta_sync else None
        self.sync_span_log = SpanLog()
        if not isinstance(metrics, bool):
            raise ConfigError(f"metrics must be True or False, got {metrics!r}"[:200])
        if not (is_number(metrics_interval_s) and metrics_interval_s > 0):
            raise ConfigError(f"metrics_interval_s must be positive, got {metrics_interval_s!r}")
        self.metrics = MetricsRecorder(enabled=metrics, interval_s=metrics_interval_s)
        self.deadlines = deadlines or Deadlines()
        self.fleet = EngineFleet(deadlines=self.deadlines)
        self.catch_up_plan = dataclasses.replace(catch_up_plan, policy=PER_ENGINE, min_engines=1)
        self.keeper = FleetKeeper(
            self.fleet,
            self._catch_up,
            lambda: self.weight_cache.ready_step,
            max_updating=self.catch_up_plan.max_updating,
        )
        self._transport_options = dict(transport_options or {})
        self._transports: dict[str, Transport] = {}
        for name, options in self._transport_options.items():
            # Made now, so an unknown transport or option fails at construction
            # (ConfigError), not in the first session that needs it.
            try:
                self._transports[name] = backend(name).make(**options)
            except TypeError as exc:
                raise ConfigError(
                    f"transport_options[{name!r}]: {sorted(options)} are not options of the "
                    f"{name!r} transport ({exc})"
                ) from exc
        self._sessions_in_flight = 0
        self._sessions_refused = 0
        # Step -> weights identity of the snapshot built as that step (bounded).
        self._identities: OrderedDict[int, str] = OrderedDict()
        # Sessions' work that outlives their call (stragglers, commits still applying).
        self._background: set[asyncio.Task[None]] = set()
        # Tasks running run_sync_session now: close() ends them before it closes
        # the transports they stream through.
        self._session_tasks: set[asyncio.Task[Any]] = set()
        # (token, description) of the one SyncCoordinator that drives the fleet, if any.
        self._coordinator: tuple[str, str] | None = None
        self._closed = False

    # ------------------------------------------------------------ for subclasses

    def named_weights(self, step: int) -> Iterable[tuple[str, torch.Tensor]]:
        """The weights to publish as ``step``, as ``(hf_name, tensor)`` pairs.

        Called and iterated in a worker thread, never on the event loop: it may
        gather shards across ranks (a collective every rank calls) or convert
        layouts. Ranks that do not own the cache yield nothing.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement named_weights(step)")

    def is_cache_owner(self) -> bool:
        """Whether this rank stores non-empty snapshots (the single owner rank)."""
        return True

    # ------------------------------------------------------------ remote methods

    async def build_cpu_bucket_cache(self, step: int) -> int:
        """Build and publish the snapshot of ``step`` from :meth:`named_weights`.

        Returns the published step. Raises :class:`~asyncsync.StaleStepError` or
        :class:`~asyncsync.BuildInProgressError` without touching the cache, and
        discards the build (ready step unchanged) if the weight source raises or
        the call is cancelled.
        """
        self._start_metrics()
        start = time.perf_counter()
        with self.sync_span_log.span("build", step):
            async with self.weight_cache.build(step) as build:
                await build.add(_Deferred(self.named_weights, step))
        self.metrics.build(time.perf_counter() - start, build.nbytes)
        # A new ready step is a new epoch: a router's `within` floor moves with it.
        self.fleet.note_published()
        if self.deltas is not None:
            self.deltas.published()  # in the background: the build returns now
        # The identity engines will stamp answers with once they serve this step.
        with contextlib.suppress(ClosedError):
            async with self.weight_cache.read(min_step=step) as snap:
                if snap.step == step:
                    # A pass over every tensor's record: off the loop for large models.
                    identity = await asyncio.to_thread(weights_identity, snap.manifest)
                    self._identities[step] = identity
                    while len(self._identities) > _IDENTITIES_KEPT:
                        self._identities.popitem(last=False)
        return step

    async def run_sync_session(self, plan: SyncPlan) -> SyncReport:
        """Stream the newest ready snapshot >= ``plan.min_step`` to the engines.

        ``plan.engines=None`` syncs this actor's fleet (see :meth:`fleet_add`);
        a mapping runs an ad-hoc session to those engines. Commit semantics follow
        ``plan.policy`` (see :mod:`asyncsync.session`); the report's ``step`` is the
        step actually sent. Raises :class:`~asyncsync.AdmissionError` at once when
        the actor already runs as many sessions as it admits (see
        :class:`ActorSlots`), and :class:`~asyncsync.ClosedError` after
        :meth:`close`.
        """
        if not isinstance(plan, SyncPlan):
            raise ConfigError(f"run_sync_session takes a SyncPlan, got {type(plan).__name__}")
        with self._admitted(), self._closable():
            self._start_metrics()
            if plan.engines is None:
                self.keeper.start()
                fleet, names = self.fleet, None
            else:
                fleet = EngineFleet(plan.engines, initial=Health.SERVING, deadlines=self.deadlines)
                names = list(plan.engines)
            return await run_session(
                self.weight_cache,
                plan,
                fleet,
                self._transport,
                names=names,
                owner_node=current_node(),
                background=self._background,
                spans=self.sync_span_log,
                metrics=self.metrics,
                deltas=self.deltas,
            )

    async def delta_stats(self) -> DeltaStats | None:
        """The delta store's state (see :class:`~asyncsync.delta.DeltaStats`);
        ``None`` when the actor was made with ``delta_sync=False``."""
        return self.deltas.stats() if self.deltas is not None else None

    async def cache_ready_step(self) -> int | None:
        """The newest published step (``None`` before the first build)."""
        return self.weight_cache.ready_step

    async def cache_stats(self) -> CacheStats:
        return self.weight_cache.stats()

    async def ready_snapshot_digests(self) -> tuple[int, dict[str, int]]:
        """``(step, {name: xxh3 of the tensor's bytes})`` of the newest ready snapshot."""
        async with self.weight_cache.read() as snap:
            digests = await asyncio.to_thread(
                lambda: {name: tensor_digest(t) for name, t in snap.named_tensors()}
            )
            return snap.step, digests

    async def sync_spans(self) -> list[Span]:
        """Recorded build and session spans (wall-clock), newest last."""
        return self.sync_span_log.snapshot()

    async def fleet_status(self) -> FleetStatus:
        """This actor and its fleet now: what ``asyncsync status`` shows (see
        :class:`~asyncsync.metrics.FleetStatus`)."""
        self._start_metrics()
        return self.metrics.status()

    async def fleet_add(self, name: str, engine: Any) -> EngineState:
        """Add an engine to this actor's fleet; it is caught up to the newest ready step
        in the background before it counts as serving (see :class:`~asyncsync.EngineFleet`).

        Raises :class:`~asyncsync.FleetError` for a name in use or an engine that
        cannot be reached or is not a receiver.
        """
        self._check_open()
        state = await self.fleet.add(name, engine)
        self.keeper.start()
        self._start_metrics()
        return state

    async def fleet_remove(self, name: str) -> EngineState:
        """Take an engine out of the fleet (sessions running on it abort it and go on)."""
        return await self.fleet.remove(name)

    async def fleet_view(self) -> FleetView:
        """Which engine serves which version, and each engine's health, now."""
        return self.fleet.view()

    async def fleet_refresh(self) -> FleetView:
        """Probe every engine now and return the view."""
        return await self.fleet.refresh()

    async def fleet_watch(self, after: int = -1, timeout_s: float = 10.0) -> FleetUpdate:
        """The fleet as soon as it changed after epoch ``after`` (long poll).

        Returns at once when the fleet's epoch is newer than ``after`` (``-1``:
        always), else when it changes, else after ``timeout_s`` (then with the same
        epoch). Every change of an engine's health, version or weights, every
        engine added or removed, and every step built, is a new epoch. A watch
        waits holding one of the actor's session slots (:class:`ActorSlots`), so
        builds and control calls always run; past the bound it raises
        :class:`~asyncsync.AdmissionError`. This is how
        :class:`~asyncsync.FleetRouter` learns of changes.
        """
        check_number(timeout_s, "fleet_watch: timeout_s", ConfigError, low=0.0)
        check_int(after, "fleet_watch: after", ConfigError, low=-1)
        with self._admitted():
            epoch = await self.fleet.watch(after, timeout_s)
        return FleetUpdate(
            epoch=epoch,
            view=self.fleet.view(),
            ready_step=self.weight_cache.ready_step,
            handles=self.fleet.handles(self.fleet.view().engines),
            changed_at=self.fleet.changed_at,
        )

    async def snapshot_identity(self, step: int) -> str:
        """The weights identity of the snapshot built as ``step`` (what engines stamp).

        Kept for the last 4096 steps built. Raises
        :class:`~asyncsync.NothingBuiltError` for a step this actor did not build.
        """
        check_int(step, "snapshot_identity: step", InvalidStepError, low=-1)
        try:
            return self._identities[step]
        except KeyError:
            raise NothingBuiltError(
                f"step {step} was not built by this train actor (or is older than the "
                f"last {_IDENTITIES_KEPT} built)"
            ) from None

    async def coordinator_claim(self, token: str, holder: str) -> str | None:
        """Make the :class:`~asyncsync.SyncCoordinator` ``token`` the one that drives the fleet.

        Returns ``None`` when it holds the claim now (also when it already did), else
        the ``holder`` description given by the coordinator that holds it: two
        coordinators would run redundant sessions on one fleet, so the caller refuses
        to run. Raises :class:`~asyncsync.ClosedError` after :meth:`close`.
        """
        self._check_open()
        if self._coordinator is not None and self._coordinator[0] != token:
            return self._coordinator[1]
        self._coordinator = (token, holder)
        return None

    async def coordinator_release(self, token: str) -> None:
        """Release the claim of coordinator ``token`` (nothing if it does not hold it)."""
        if self._coordinator is not None and self._coordinator[0] == token:
            self._coordinator = None

    async def close(self) -> None:
        """Shut the actor's weight sync down: no new session or build starts.

        Stops the fleet's keeper and catch-ups, ends the sessions in flight (each
        aborts on every engine it had begun; its caller gets
        :class:`~asyncsync.ClosedError`, as does a session waiting for its
        step), waits for sessions' background work (commits in flight finish;
        stragglers are aborted), closes every transport and the cache. Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        self.fleet.close()
        await self.keeper.close()
        await self.metrics.close()
        sessions = list(self._session_tasks)
        for task in sessions:
            task.cancel()
        if sessions:
            await asyncio.gather(*sessions, return_exceptions=True)
        background = list(self._background)
        for task in background:
            task.cancel()
        if background:
            await asyncio.gather(*background, return_exceptions=True)
        for transport in self._transports.values():
            with contextlib.suppress(Exception):
                await transport.close()
        self._transports.clear()
        if self.deltas is not None:
            await self.deltas.close()
        await self.weight_cache.close()

    # ------------------------------------------------------------ helpers

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        self._check_open()
        slots = self._asyncsync_slots
        if self._sessions_in_flight >= slots.sessions:
            self._sessions_refused += 1
            self.metrics.refused()
            raise AdmissionError(
                f"the train actor admits at most {slots.sessions} sessions at once "
                f"(max_concurrency={slots.max_concurrency} minus {slots.reserved} slots "
                f"reserved for builds and control calls); {self._sessions_in_flight} are "
                "in flight, waiting for their step or streaming. Retry later, or create the "
                "actor with a larger max_concurrency"
            )
        self._sessions_in_flight += 1
        try:
            yield
        finally:
            self._sessions_in_flight -= 1

    @contextlib.contextmanager
    def _closable(self) -> Iterator[None]:
        """Let :meth:`close` end the session running in this task; its caller then
        gets :class:`~asyncsync.ClosedError`, not a bare cancellation."""
        task = asyncio.current_task()
        assert task is not None
        self._session_tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if not self._closed:
                raise
            raise ClosedError(
                "the train actor was closed while this session ran: engines that had not "
                "committed were aborted, a commit already applying was let finish (each "
                "engine's served version is in fleet_view())"
            ) from None
        finally:
            self._session_tasks.discard(task)

    def _start_metrics(self) -> None:
        if not self._closed:
            self.metrics.start(self.weight_cache, self.fleet)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the train actor was closed; it runs no more sessions")

    async def _catch_up(self, name: str) -> None:
        """Bring one engine of the fleet to the newest ready step (run by the fleet's keeper)."""
        await run_session(
            self.weight_cache,
            self.catch_up_plan,
            self.fleet,
            self._transport,
            names=[name],
            owner_node=current_node(),
            background=self._background,
            spans=self.sync_span_log,
            kind="catch_up",
            metrics=self.metrics,
            deltas=self.deltas,
        )

    def _transport(self, name: str) -> Transport:
        transport = self._transports.get(name)
        if transport is None:
            transport = backend(name).make(**self._transport_options.get(name, {}))
            self._transports[name] = transport
        return transport


class _Deferred:
    """An iterable that calls ``fn(*args)`` only when iterated (in the worker thread)."""

    def __init__(self, fn: Callable[..., Iterable[tuple[str, torch.Tensor]]], *args: Any) -> None:
        self._fn = fn
        self._args = args

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._fn(*self._args))


def train_actor(
    cls: type[WeightSyncActor],
    *,
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    reserved_slots: int = RESERVED_SLOTS,
    **ray_options: Any,
) -> Any:
    """``ray.remote(cls)`` with an explicit ``max_concurrency``, after checking ``cls``.

    The actor admits at most ``max_concurrency - reserved_slots`` sessions at once
    (see :class:`ActorSlots`); raise ``reserved_slots`` if your own methods (a train
    step, generation requests) run beside builds and sessions.

    Raises :class:`~asyncsync.ActorDefinitionError` if ``cls`` is not a
    :class:`WeightSyncActor`, if ``max_concurrency`` leaves no slot for a session
    beside the reserved ones, or if a cache method (the built-in ones and those
    marked with :func:`cache_method`) is not ``async def`` or is put in a
    concurrency group: each group runs on its own loop and thread, where the
    cache's lock cannot guard it. ``ray_options`` go to ``.options()``
    (``num_cpus``, ``concurrency_groups``, ...).
    """
    if not (isinstance(cls, type) and issubclass(cls, WeightSyncActor)):
        raise ActorDefinitionError(f"{cls!r} is not a subclass of WeightSyncActor")
    if (
        isinstance(reserved_slots, bool)
        or not isinstance(reserved_slots, int)
        or reserved_slots < 1
    ):
        raise ActorDefinitionError(
            f"reserved_slots={reserved_slots!r}: at least one slot must stay free for builds"
        )
    if (
        isinstance(max_concurrency, bool)
        or not isinstance(max_concurrency, int)
        or max_concurrency < reserved_slots + 1
    ):
        raise ActorDefinitionError(
            f"max_concurrency={max_concurrency!r}: a train actor needs at least "
            f"reserved_slots + 1 = {reserved_slots + 1} so a session can run beside a build"
        )
    for name, fn in inspect.getmembers(cls, inspect.isfunction):
        if name not in CACHE_METHODS and not getattr(fn, _MARK, False):
            continue
        if not inspect.iscoroutinefunction(fn):
            raise ActorDefinitionError(
                f"{cls.__name__}.{name} touches the weight cache and must be `async def`: "
                "a sync method of an async actor blocks the loop that guards the cache"
            )
        group = getattr(fn, "__ray_concurrency_group__", None)
        if group is not None:
            raise ActorDefinitionError(
                f"{cls.__name__}.{name} is in concurrency group {group!r}; cache methods "
                "must stay in the default group: each group runs its own event loop, and "
                "the cache's one asyncio.Lock cannot guard two loops"
            )
    import ray

    # The instance must know how many of its slots sessions may take; Ray does not
    # tell an actor its max_concurrency, so a subclass carries it (pickled by value).
    configured = type(
        cls.__name__,
        (cls,),
        {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "_asyncsync_slots": ActorSlots(max_concurrency, reserved_slots),
        },
    )
    # Ray takes concurrency groups only at decoration time, not in .options().
    groups = ray_options.pop("concurrency_groups", None)
    remote_class = (
        ray.remote(concurrency_groups=groups)(configured)  # type: ignore[call-overload]
        if groups
        else ray.remote(configured)
    )
    try:
        return remote_class.options(max_concurrency=max_concurrency, **ray_options)
    except (TypeError, ValueError) as exc:  # Ray checks its options here
        raise ActorDefinitionError(
            f"{cls.__name__}: Ray refused the actor options {sorted(ray_options)}: {exc}"
        ) from exc
