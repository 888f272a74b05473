"""The multi-node cluster itself: placement by node, one object-store copy per node,
nodes joining and leaving."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import ray
from _actors import TINY_LLAMA, engine_class
from _probes import NodeProbe

from asyncsync.testing import LocalCluster

MIB = 1 << 20


@pytest.fixture(scope="module")
def probes(ray_cluster: LocalCluster) -> Iterator[list[list[Any]]]:
    """Two light actors on every node: ``probes[node][k]``."""
    made = [
        [NodeProbe.options(**ray_cluster.placement(node)).remote() for _ in range(2)]
        for node in range(len(ray_cluster.nodes))
    ]
    yield made
    for pair in made:
        for probe in pair:
            ray.kill(probe, no_restart=True)


async def test_actors_run_on_the_nodes_they_were_placed_on(
    ray_cluster: LocalCluster, probes: list[list[Any]]
) -> None:
    nodes = ray_cluster.nodes
    assert len(nodes) == 4 and len(set(nodes)) == 4  # a head and three workers
    assert ray.get_runtime_context().get_node_id() == nodes[0]  # the driver is on the head
    for k in range(2):
        seen = await asyncio.gather(*(pair[k].node_id.remote() for pair in probes))
        assert seen == list(nodes)
        assert [ray_cluster.node_of(pair[k]) for pair in probes] == [0, 1, 2, 3]


async def test_an_object_read_on_two_nodes_is_copied_once_to_each(
    ray_cluster: LocalCluster, probes: list[list[Any]]
) -> None:
    # Two readers on each of worker nodes 1 and 2; none on node 3.
    readers = [*probes[1], *probes[2]]
    payload = np.arange(8 * MIB, dtype=np.uint8)
    with ray_cluster.watch_store() as store:
        ref = ray.put(payload)  # the driver runs on the head: the primary copy is there
        sizes = await asyncio.gather(*(r.hold.remote([ref]) for r in readers))
    assert sizes == [payload.nbytes] * 4
    copy = store.grown[0]
    assert payload.nbytes <= copy < payload.nbytes + 4096, store  # data plus metadata
    # One copy on each node that read it, however many actors read it there.
    assert store.grown == (copy, copy, copy, 0), store
    assert store.delta == store.grown  # still held: nothing was freed before the end
    # Freed everywhere once neither the owner nor a reader holds it.
    del ref
    await asyncio.gather(*(r.drop.remote() for r in readers))
    assert ray_cluster.store_bytes() == store.baseline


async def test_a_node_joins_runs_actors_and_leaves_taking_its_engine_down(
    ray_cluster: LocalCluster, probes: list[list[Any]], actor_factory: Any
) -> None:
    before = ray_cluster.nodes
    index = ray_cluster.add_node()
    try:
        assert index == len(before)
        new = ray_cluster.nodes[index]
        assert new not in before
        probe = actor_factory(NodeProbe.options(**ray_cluster.placement(index)))
        engine = actor_factory(
            engine_class(**ray_cluster.placement(index)), "llama", TINY_LLAMA, num_threads=1
        )
        assert await probe.node_id.remote() == new
        await engine.ping.remote()
        assert ray_cluster.node_of(engine) == index
    finally:
        ray_cluster.remove_node(index)
    assert ray_cluster.nodes == before
    with pytest.raises(ray.exceptions.RayActorError):
        await engine.ping.remote()
    # The other nodes are unaffected.
    assert await probes[1][0].node_id.remote() == before[1]
