"""The fleet of the multi-node sessions: a trainer, engines by node, and waiting helpers.

Importable by Ray workers as ``_fleet`` (the engines' class lives here). Every wait
is bounded: a test on a shared 2-core machine must fail with a message, not hang.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, TypeVar

import _waits
import ray
from _actors import TINY_LLAMA, FaultyEngine, trainer_class
from _waits import eventually, within

from asyncsync.client import Deadlines
from asyncsync.protocol import ReceiverStats
from asyncsync.testing import LocalCluster

T = TypeVar("T")

WAIT_S = _waits.WAIT_S = 60.0  # a cluster of four nodes on two cores: every wait is slower

ENGINES_PER_NODE = 2

FLEET_PROBE_INTERVAL_S = 0.5
"""The trainer's fleet keeper probes this often: joins and catch-ups within a second."""

COLLECTIVE_TIMEOUT_S = 5.0
"""The trainer's bound on one collective broadcast (the tiny model's take milliseconds).
An engine whose broadcast stopped because a peer's node went waits this long (plus
2 s) before it gives up, instead of the default 120 s."""


class NodeEngine(FaultyEngine):
    """A :class:`FaultyEngine` whose commit can be held back.

    While ``apply`` waits, the session's staged buckets stay mapped (for the object
    store: the node's copy of every bucket), long enough for the raylets' object-store
    reports (every ~100 ms) to show them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.apply_delay_s = 0.0

    async def set_apply_delay(self, seconds: float) -> None:
        self.apply_delay_s = seconds

    async def apply(self, buckets: Any, version: int) -> None:
        if self.apply_delay_s:
            await asyncio.sleep(self.apply_delay_s)
        await super().apply(buckets, version)


def start_engine(
    cluster: LocalCluster, node: int, seed: int, config: Mapping[str, Any] = TINY_LLAMA
) -> Any:
    """A :class:`NodeEngine` of a Llama ``config`` pinned to node ``node``.

    Not awaited: call ``ping`` to wait until it runs.
    """
    options = cluster.placement(node)
    return (
        ray.remote(NodeEngine)
        .options(max_concurrency=16, num_cpus=0, **options)
        .remote("llama", dict(config), seed=seed, num_threads=1)
    )


def start_trainer(cluster: LocalCluster) -> Any:
    """The train actor (the cache owner) on the head node."""
    return trainer_class(**cluster.placement(0)).remote(
        deadlines=Deadlines(probe_interval_s=FLEET_PROBE_INTERVAL_S),
        transport_options={"collective": {"timeout_s": COLLECTIVE_TIMEOUT_S}},
    )


class Fleet:
    """The train actor on the head, ``head-e0`` beside it, two engines on every worker node.

    ``engines`` maps a name to its handle, head engine first, then by node;
    ``node_id`` maps a name to the Ray node id it was placed on. Steps only move
    forward (several modules share this fleet): :meth:`publish` builds the next one.
    """

    HEAD_ENGINE = "head-e0"

    def __init__(self, trainer: Any, engines: dict[str, Any], node_id: dict[str, str]) -> None:
        self.trainer = trainer
        self.engines = engines
        self.node_id = node_id

    def on_workers(self) -> dict[str, Any]:
        """The engines on worker nodes (every engine but ``head-e0``)."""
        return {n: e for n, e in self.engines.items() if n != self.HEAD_ENGINE}

    async def publish(self) -> int:
        """Build and publish the step after the trainer's ready step; return it."""
        ready = await within(self.trainer.cache_ready_step.remote())
        step = 0 if ready is None else ready + 1
        assert await within(self.trainer.publish.remote(step)) == step
        return step

    async def publish_nudged(self) -> int:
        """Like :meth:`publish`, but the step changes one word in 64 of every weight."""
        ready = await within(self.trainer.cache_ready_step.remote())
        step = 0 if ready is None else ready + 1
        assert await within(self.trainer.publish_nudged.remote(step)) == step
        return step


async def start_fleet(cluster: LocalCluster) -> Fleet:
    trainer = start_trainer(cluster)
    engines: dict[str, Any] = {Fleet.HEAD_ENGINE: start_engine(cluster, 0, seed=0)}
    for node in range(1, len(cluster.nodes)):
        for k in range(ENGINES_PER_NODE):
            engines[f"node{node}-e{k}"] = start_engine(cluster, node, seed=10 * node + k)
    await within(
        asyncio.gather(
            trainer.cache_ready_step.remote(), *(e.ping.remote() for e in engines.values())
        ),
        seconds=180,  # seven torch actors start on a 2-core machine
    )
    node_id = {name: cluster.nodes[cluster.node_of(e)] for name, e in engines.items()}
    return Fleet(trainer, engines, node_id)


async def receiver_stats(engines: Mapping[str, Any]) -> dict[str, ReceiverStats]:
    stats = await within(asyncio.gather(*(e.receiver_stats.remote() for e in engines.values())))
    return dict(zip(engines, stats, strict=True))


async def digests(engines: Mapping[str, Any]) -> dict[str, tuple[int | None, dict[str, int]]]:
    """``name -> (served version, {parameter: digest})`` of every engine."""
    held = await within(asyncio.gather(*(e.state_digests.remote() for e in engines.values())))
    return dict(zip(engines, held, strict=True))


async def wait_until_receiving(engine: Any, what: str) -> None:
    """Until ``engine`` runs a ``receive`` (a session has begun on it and is streaming)."""

    async def receiving() -> bool:
        return int(await engine.running_receives.remote()) > 0

    await eventually(receiving, what)
