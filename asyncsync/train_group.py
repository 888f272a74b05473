"""A group of Ray train actors that together host one megatron-core training job.

Each :class:`MegatronTrainRank` actor is one rank: it joins the job's
``torch.distributed`` process group, initializes megatron's parallel state, builds
its part of the model with a user-supplied builder, and publishes snapshots from a
:class:`~asyncsync.convert.MegatronWeightSource`. A build is collective, so
:class:`TrainGroup` calls ``build_cpu_bucket_cache`` on every rank at once from
the async driver; the single cache owner's snapshot holds the HF weights, the
others publish empty snapshots of the same step. Sync sessions run on
:attr:`TrainGroup.owner`:

```python
group = await TrainGroup.start(2, family="qwen3", vocab_size=151936, build_model=build)
await group.build(step)                       # every rank, concurrently
await group.owner.run_sync_session.remote(plan)
await group.shutdown()
```
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._checks import is_int
from .actor import DEFAULT_MAX_CONCURRENCY, WeightSyncActor, train_actor
from .cache import DEFAULT_BUCKET_BYTES
from .convert._registry import conversion_table
from .convert.megatron_source import MegatronWeightSource
from .errors import ConfigError, TrainGroupError, TrainGroupTimeoutError

__all__ = ["MegatronTrainRank", "TrainGroup"]


def _check_positive(name: str, value: object) -> int:
    if not is_int(value) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_job(
    world_size: int, *, family: str, vocab_size: int, build_model: object, tp: int, pp: int
) -> None:
    """Raise ConfigError naming the first option a job cannot run with."""
    for name, value in (("world_size", world_size), ("tp", tp), ("pp", pp)):
        _check_positive(name, value)
    _check_positive("vocab_size", vocab_size)
    if world_size % (tp * pp):
        raise ConfigError(
            f"world_size={world_size} is not a multiple of tp*pp={tp}*{pp}: the ranks left "
            "over after tensor and pipeline parallelism must form whole data-parallel replicas"
        )
    conversion_table(family)
    if not callable(build_model):
        raise ConfigError(f"build_model must be callable, got {build_model!r:.80}")


class MegatronTrainRank(WeightSyncActor):
    """One rank of a megatron-core job, as a train actor.

    Args:
        rank: this actor's global rank; ``world_size`` ranks in all.
        family: conversion family (see :func:`asyncsync.convert.conversion_table`).
        rank: this actor's global rank in ``range(world_size)``.
        vocab_size: the true (unpadded) vocabulary size.
        build_model: called once after the parallel state is initialized, in a
            worker thread of this actor; returns this rank's ``GPTModel`` (or its
            virtual-pipeline chunks). It must be picklable (a module-level
            function or a ``functools.partial`` of one).
        tp, pp: tensor- and pipeline-parallel sizes; the rest of the world is data parallel.
        backend: ``torch.distributed`` backend. With ``"nccl"`` give each actor one
            GPU (``num_gpus=1``): Ray makes it the actor's device 0.

    Nothing collective happens in the constructor: :meth:`setup` joins the
    process group once every rank exists (see :meth:`TrainGroup.start`).
    Subclasses add the training step and whatever else the job needs.

    Raises :class:`~asyncsync.errors.ConfigError` naming the option for a size
    that is not a positive int, a ``world_size`` that ``tp * pp`` does not
    divide, a ``rank`` outside the world, an unknown family or a ``build_model``
    that is not callable.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        *,
        family: str,
        vocab_size: int,
        build_model: Callable[[], torch.nn.Module | Sequence[torch.nn.Module]],
        tp: int = 1,
        pp: int = 1,
        backend: str = "gloo",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        max_resident_bytes: int | None = None,
    ) -> None:
        _check_job(
            world_size, family=family, vocab_size=vocab_size, build_model=build_model, tp=tp, pp=pp
        )
        if not is_int(rank) or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank!r} is not in range(world_size={world_size})")
        super().__init__(bucket_bytes=bucket_bytes, max_resident_bytes=max_resident_bytes)
        self.rank = rank
        self.world_size = world_size
        self.family = family
        self.vocab_size = vocab_size
        self.tp = tp
        self.pp = pp
        self.backend = backend
        self._build_model = build_model
        self.model: torch.nn.Module | Sequence[torch.nn.Module] | None = None
        self.source: MegatronWeightSource | None = None

    async def rendezvous_address(self) -> tuple[str, int]:
        """An address of this actor's node and a port free on it, for the process group."""
        import ray

        address = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]  # untyped in Ray
        return str(address), _free_port()

    async def setup(self, master_addr: str, master_port: int) -> bool:
        """Join the process group, build the model; returns :meth:`is_cache_owner`.

        Collective: every rank of the group must call it (a rendezvous). The
        blocking work runs in a worker thread, so the actor keeps answering.
        Raises :class:`~asyncsync.errors.TrainGroupError` if this rank is set up already.
        """
        await asyncio.to_thread(self._setup, master_addr, master_port)
        return self.is_cache_owner()

    def _setup(self, master_addr: str, master_port: int) -> None:
        from megatron.core import parallel_state as ps

        if self.source is not None:
            raise TrainGroupError(f"rank {self.rank} is already set up")
        if self.backend == "nccl":
            torch.cuda.set_device(0)
        dist.init_process_group(
            self.backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
        )
        ps.initialize_model_parallel(
            tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp
        )
        self.model = self._build_model()
        self.source = MegatronWeightSource(self.model, self.family, vocab_size=self.vocab_size)

    def named_weights(self, step: int) -> MegatronWeightSource:
        """This rank's weight source; raises :class:`~asyncsync.TrainGroupError` before setup."""
        if self.source is None:
            raise TrainGroupError(
                f"rank {self.rank}: setup() has not run, so there are no weights to build "
                f"step {step}"
            )
        return self.source

    def is_cache_owner(self) -> bool:
        return self.source is not None and self.source.is_cache_owner()

    async def cache_owner(self) -> bool:
        """:meth:`is_cache_owner`, callable remotely."""
        return self.is_cache_owner()

    async def teardown(self) -> None:
        """Leave megatron's parallel state and the process group (collective)."""
        await asyncio.to_thread(self._teardown)

    def _teardown(self) -> None:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class TrainGroup:
    """Handles of the rank actors of one job, in rank order, and the owner among them.

    Create it with :meth:`start`. ``owner_rank`` is the single rank whose
    snapshots hold the weights.
    """

    def __init__(self, actors: Sequence[Any], owner_rank: int) -> None:
        self.actors = list(actors)
        self.owner_rank = owner_rank

    def __repr__(self) -> str:
        return f"<TrainGroup ranks={len(self.actors)} owner={self.owner_rank}>"

    @property
    def owner(self) -> Any:
        """Handle of the cache owner: run sync sessions and read snapshots here."""
        return self.actors[self.owner_rank]

    @classmethod
    async def start(
        cls,
        world_size: int,
        *,
        family: str,
        vocab_size: int,
        build_model: Callable[[], torch.nn.Module | Sequence[torch.nn.Module]],
        pp: int = 1,
        tp: int | None = None,
        actor_class: type[MegatronTrainRank] = MegatronTrainRank,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        setup_timeout_s: float = 300.0,
        actor_kwargs: dict[str, Any] | None = None,
        **ray_options: Any,
    ) -> TrainGroup:
        """Start ``world_size`` rank actors, set them up together, check the owner.

        ``tp`` defaults to ``world_size // pp`` (no data parallelism).
        ``actor_kwargs`` go to every actor's constructor (``backend``,
        ``bucket_bytes``, a subclass's own arguments), ``ray_options`` to
        :func:`~asyncsync.actor.train_actor` (``num_cpus``, ``num_gpus``, ...).

        Raises :class:`~asyncsync.errors.ConfigError` naming the option before
        any actor starts (see :class:`MegatronTrainRank`; also a non-positive
        ``setup_timeout_s`` or an ``actor_class`` that is not a
        :class:`MegatronTrainRank`). Once actors run, it raises
        :class:`~asyncsync.errors.TrainGroupError` unless exactly one rank
        reports itself the cache owner,
        :class:`~asyncsync.errors.TrainGroupTimeoutError` naming the ranks whose
        setup has not finished within ``setup_timeout_s``, or a rank's own setup
        error (noted with the rank); the actors are killed in each case.
        """
        _check_positive("pp", pp)
        if tp is None:
            if not isinstance(world_size, int) or world_size % pp:
                raise ConfigError(
                    f"tp=None takes tp from world_size // pp, but pp={pp} does not divide "
                    f"world_size={world_size!r}"
                )
            tp = world_size // pp
        _check_job(
            world_size, family=family, vocab_size=vocab_size, build_model=build_model, tp=tp, pp=pp
        )
        if not isinstance(actor_class, type) or not issubclass(actor_class, MegatronTrainRank):
            raise ConfigError(
                f"actor_class must be a MegatronTrainRank subclass, got {actor_class!r}"
            )
        if not isinstance(setup_timeout_s, int | float) or not setup_timeout_s > 0:
            raise ConfigError(f"setup_timeout_s must be a number > 0, got {setup_timeout_s!r}")
        remote_class = train_actor(actor_class, max_concurrency=max_concurrency, **ray_options)
        actors = [
            remote_class.remote(
                rank,
                world_size,
                family=family,
                vocab_size=vocab_size,
                build_model=build_model,
                tp=tp,
                pp=pp,
                **(actor_kwargs or {}),
            )
            for rank in range(world_size)
        ]
        try:
            addr, port = await actors[0].rendezvous_address.remote()
            owners = await _on_every_rank(
                "setup", [a.setup.remote(addr, port) for a in actors], setup_timeout_s
            )
            ranks = [rank for rank, owner in enumerate(owners) if owner]
            if len(ranks) != 1:
                raise TrainGroupError(
                    f"exactly one rank must own the cache; ranks reporting ownership: {ranks}"
                )
        except BaseException:
            _kill(actors)
            raise
        return cls(actors, owner_rank=ranks[0])

    async def build(self, step: int, *, timeout_s: float | None = None) -> int:
        """Build and publish ``step`` on every rank at once; returns the step.

        The build is collective: if a rank fails or the timeout passes, the
        others may stay blocked in a gather; :meth:`kill` the group then.
        Raises the first failing rank's error (noted with the rank),
        :class:`~asyncsync.errors.TrainGroupTimeoutError` naming the ranks not
        done within ``timeout_s``, or :class:`~asyncsync.errors.TrainGroupError`
        naming ranks that published another step.
        """
        steps = await _on_every_rank(
            f"build of step {step}",
            [a.build_cpu_bucket_cache.remote(step) for a in self.actors],
            timeout_s,
        )
        wrong = {rank: s for rank, s in enumerate(steps) if s != step}
        if wrong:
            raise TrainGroupError(f"ranks published other steps than {step}: {wrong}")
        return step

    async def shutdown(self, *, timeout_s: float = 30.0) -> None:
        """Leave the process group on every rank, then kill the actors (also on failure)."""
        try:
            await _on_every_rank("teardown", [a.teardown.remote() for a in self.actors], timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        """Kill every rank actor at once (after a failed collective, for example)."""
        _kill(self.actors)


async def _on_every_rank(
    what: str, calls: Sequence[Awaitable[Any]], timeout_s: float | None
) -> list[Any]:
    """Await one call per rank; their results in rank order.

    Returns as soon as a rank fails (the others may be blocked in a collective
    that will never complete) and raises that rank's error with a note naming
    it; raises TrainGroupTimeoutError naming the ranks still running after
    ``timeout_s``. Either way it stops waiting for the others, which keep running.
    """
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        done, pending = await asyncio.wait(
            tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION
        )
    finally:
        for task in tasks:
            task.cancel()
    failed = [
        (rank, exc)
        for rank, t in enumerate(tasks)
        if t in done and (exc := t.exception()) is not None
    ]
    if failed:
        rank, exc = failed[0]
        exc.add_note(f"raised by rank {rank} during {what}")
        raise exc
    if pending:
        late = [rank for rank, t in enumerate(tasks) if t in pending]
        raise TrainGroupTimeoutError(
            f"{what}: ranks {late} of {len(tasks)} did not finish within {timeout_s} s"
        )
    return [t.result() for t in tasks]


def _kill(actors: Sequence[Any]) -> None:
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)
