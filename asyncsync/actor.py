"""The train-actor side: an async Ray actor that builds snapshots and runs sync sessions.

Subclass :class:`WeightSyncActor`, implement :meth:`WeightSyncActor.named_weights`,
and create the actor with :func:`train_actor`, which applies ``ray.remote`` with an
explicit ``max_concurrency`` so that a build of step N+1 and a session streaming
step N run at the same time on the actor's one event loop::

    class Trainer(WeightSyncActor):
        def __init__(self) -> None:
            super().__init__(bucket_bytes=256 << 20)
            self.model = ...

        def named_weights(self, step):            # runs in a worker thread
            return self.model.state_dict().items()

    TrainerActor = train_actor(Trainer, max_concurrency=16, num_cpus=1)
    trainer = TrainerActor.remote()
    await trainer.build_cpu_bucket_cache.remote(0)
    report = await trainer.run_sync_session.remote(SyncPlan(targets={"e0": engine}))

Every method that touches the cache must be ``async def`` and stay in the default
concurrency group: Ray gives each group its own loop and thread, and the cache's
one lock only guards one loop. :func:`train_actor` refuses classes that break this.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

from .buckets import tensor_digest
from .cache import DEFAULT_BUCKET_BYTES, BucketCache, CacheStats
from .errors import ActorDefinitionError
from .session import SyncPlan, SyncReport, run_session
from .spans import Span, SpanLog
from .transport import Transport, make_transport

__all__ = [
    "CACHE_METHODS",
    "DEFAULT_MAX_CONCURRENCY",
    "WeightSyncActor",
    "cache_method",
    "train_actor",
]

DEFAULT_MAX_CONCURRENCY = 16
"""Default ``max_concurrency`` of a train actor: room for a build, several sessions,
the user's own calls (a train step, stats) and readers, without unbounded fan-in."""

CACHE_METHODS = (
    "build_cpu_bucket_cache",
    "run_sync_session",
    "cache_ready_step",
    "cache_stats",
    "ready_snapshot_digests",
    "sync_spans",
)

_MARK = "__asyncsync_cache_method__"
F = TypeVar("F", bound=Callable[..., Any])


def cache_method(fn: F) -> F:
    """Mark a user method that touches the cache, so :func:`train_actor` checks it too."""
    setattr(fn, _MARK, True)
    return fn


class WeightSyncActor:
    """Base class of train actors: owns the bucket cache and the weight-sync methods.

    Args:
        bucket_bytes: payload budget per bucket (see :class:`~asyncsync.BucketCache`).
        max_resident_bytes: bound on the cache's host memory (``None``: unbounded).
        transport_options: per-transport keyword arguments, e.g.
            ``{"shm": {"directory": "/dev/shm"}}``.
    """

    def __init__(
        self,
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        max_resident_bytes: int | None = None,
        transport_options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.weight_cache = BucketCache(bucket_bytes, max_resident_bytes)
        self.sync_span_log = SpanLog()
        self._transport_options = dict(transport_options or {})
        self._transports: dict[str, Transport] = {}

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
        with self.sync_span_log.span("build", step):
            async with self.weight_cache.build(step) as build:
                await build.add(_Deferred(self.named_weights, step))
        return step

    async def run_sync_session(self, plan: SyncPlan) -> SyncReport:
        """Stream the newest ready snapshot >= ``plan.version`` to ``plan.targets``.

        All or nothing (see :mod:`asyncsync.session`); the report's ``step`` is the
        step actually sent.
        """
        return await run_session(
            self.weight_cache, plan, self._transport(plan.transport), spans=self.sync_span_log
        )

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

    # ------------------------------------------------------------ helpers

    def _transport(self, name: str) -> Transport:
        transport = self._transports.get(name)
        if transport is None:
            transport = make_transport(name, **self._transport_options.get(name, {}))
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
    **ray_options: Any,
) -> Any:
    """``ray.remote(cls)`` with an explicit ``max_concurrency``, after checking ``cls``.

    Raises :class:`~asyncsync.ActorDefinitionError` if ``cls`` is not a
    :class:`WeightSyncActor`, if ``max_concurrency < 2`` (a build could never overlap
    a session), or if a cache method (the built-in ones and those marked with
    :func:`cache_method`) is not ``async def`` or is put in a concurrency group:
    each group runs on its own loop and thread, where the cache's lock cannot guard it.
    ``ray_options`` go to ``.options()`` (``num_cpus``, ``concurrency_groups``, ...).
    """
    if not (isinstance(cls, type) and issubclass(cls, WeightSyncActor)):
        raise ActorDefinitionError(f"{cls!r} is not a subclass of WeightSyncActor")
    if not isinstance(max_concurrency, int) or max_concurrency < 2:
        raise ActorDefinitionError(
            f"max_concurrency={max_concurrency!r}: a train actor needs >= 2 so a build "
            "can overlap a sync session"
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

    # Ray takes concurrency groups only at decoration time, not in .options().
    groups = ray_options.pop("concurrency_groups", None)
    remote_class = (
        ray.remote(concurrency_groups=groups)(cls)  # type: ignore[call-overload]
        if groups
        else ray.remote(cls)
    )
    return remote_class.options(max_concurrency=max_concurrency, **ray_options)
