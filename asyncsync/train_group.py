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
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .actor import DEFAULT_MAX_CONCURRENCY, WeightSyncActor, train_actor
from .cache import DEFAULT_BUCKET_BYTES
from .convert.megatron_source import MegatronWeightSource

__all__ = ["MegatronTrainRank", "TrainGroup"]


class MegatronTrainRank(WeightSyncActor):
    """One rank of a megatron-core job, as a train actor.

    Args:
        rank: this actor's global rank; ``world_size`` ranks in all.
        family: conversion family (see :func:`asyncsync.convert.conversion_table`).
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
        super().__init__(bucket_bytes=bucket_bytes, max_resident_bytes=max_resident_bytes)
        if world_size % (tp * pp):
            raise ValueError(f"world_size={world_size} is not a multiple of tp*pp={tp * pp}")
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
        """
        await asyncio.to_thread(self._setup, master_addr, master_port)
        return self.is_cache_owner()

    def _setup(self, master_addr: str, master_port: int) -> None:
        from megatron.core import parallel_state as ps

        if self.source is not None:
            raise RuntimeError(f"rank {self.rank} is already set up")
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
        if self.source is None:
            raise RuntimeError(f"rank {self.rank}: setup() has not run")
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
        Raises ``RuntimeError`` unless exactly one rank reports itself the cache
        owner, and ``TimeoutError`` if setup takes longer than ``setup_timeout_s``;
        the actors are killed in both cases.
        """
        tp = world_size // pp if tp is None else tp
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
            owners = await asyncio.wait_for(
                asyncio.gather(*(a.setup.remote(addr, port) for a in actors)), setup_timeout_s
            )
            ranks = [rank for rank, owner in enumerate(owners) if owner]
            if len(ranks) != 1:
                raise RuntimeError(
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
        """
        steps = await asyncio.wait_for(
            asyncio.gather(*(a.build_cpu_bucket_cache.remote(step) for a in self.actors)),
            timeout_s,
        )
        if any(s != step for s in steps):
            raise RuntimeError(f"ranks published steps {steps}, expected {step}")
        return step

    async def shutdown(self, *, timeout_s: float = 30.0) -> None:
        """Leave the process group on every rank, then kill the actors."""
        try:
            await asyncio.wait_for(
                asyncio.gather(*(a.teardown.remote() for a in self.actors)), timeout_s
            )
        finally:
            self.kill()

    def kill(self) -> None:
        """Kill every rank actor at once (after a failed collective, for example)."""
        _kill(self.actors)


def _kill(actors: Sequence[Any]) -> None:
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)
