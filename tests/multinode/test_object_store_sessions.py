"""Sync sessions across nodes: a train actor on the head, engines on the worker nodes,
buckets through the object store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import ray
from _actors import TINY_LLAMA, assert_engines_hold, engine_class, trainer_class

from asyncsync.session import SyncPlan
from asyncsync.testing import LocalCluster

ENGINES_PER_NODE = 2


class Fleet:
    """A train actor on the head and two engines on every worker node."""

    def __init__(self, trainer: Any, engines: dict[str, Any], node_of: dict[str, int]) -> None:
        self.trainer = trainer
        self.engines = engines
        self.node_of = node_of  # engine name -> the node index it was placed on


@pytest.fixture(scope="module")
async def fleet(ray_cluster: LocalCluster) -> AsyncIterator[Fleet]:
    trainer = trainer_class(**ray_cluster.placement(0)).remote()
    engines: dict[str, Any] = {}
    node_of: dict[str, int] = {}
    for node in range(1, len(ray_cluster.nodes)):
        for k in range(ENGINES_PER_NODE):
            name = f"node{node}-e{k}"
            options = ray_cluster.placement(node)
            engines[name] = engine_class(**options).remote(
                "llama", TINY_LLAMA, seed=10 * node + k, num_threads=1
            )
            node_of[name] = node
    await asyncio.gather(
        trainer.cache_ready_step.remote(), *(e.ping.remote() for e in engines.values())
    )
    yield Fleet(trainer, engines, node_of)
    for handle in [trainer, *engines.values()]:
        ray.kill(handle, no_restart=True)


async def test_the_fleet_sits_where_it_was_placed(ray_cluster: LocalCluster, fleet: Fleet) -> None:
    assert ray_cluster.node_of(fleet.trainer) == 0
    assert {name: ray_cluster.node_of(e) for name, e in fleet.engines.items()} == fleet.node_of
    assert sorted(set(fleet.node_of.values())) == [1, 2, 3]


async def test_object_store_session_reaches_engines_on_three_nodes_bit_identical(
    ray_cluster: LocalCluster, fleet: Fleet
) -> None:
    for step in (0, 1):
        assert await fleet.trainer.publish.remote(step) == step
        report = await fleet.trainer.run_sync_session.remote(
            SyncPlan(targets=fleet.engines, transport="object_store")
        )
        assert report.step == step
        assert report.num_buckets > 4  # 64 KiB buckets: the model spans many
        assert set(report.targets) == set(fleet.engines)
        assert all(t.version == step for t in report.targets.values())
        await assert_engines_hold(fleet.trainer, fleet.engines, step)
