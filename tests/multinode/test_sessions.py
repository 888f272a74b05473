"""Sync sessions across nodes: the trainer and ``head-e0`` on the head, two engines on
each worker node; every transport delivers bit-identical weights, routing follows the
nodes, and a same-node-only transport for an engine elsewhere is refused up front."""

from __future__ import annotations

import pytest
from _actors import assert_engines_hold
from _fleet import Fleet, receiver_stats, within

from asyncsync import TopologyError
from asyncsync.plan import SyncPlan
from asyncsync.testing import LocalCluster

CROSS_NODE = ("object_store", "collective")


async def test_the_fleet_sits_where_it_was_placed(ray_cluster: LocalCluster, fleet: Fleet) -> None:
    assert ray_cluster.node_of(fleet.trainer) == 0
    nodes = ray_cluster.nodes
    assert fleet.node_id[Fleet.HEAD_ENGINE] == nodes[0]
    on_workers = {name: nodes.index(fleet.node_id[name]) for name in fleet.on_workers()}
    assert sorted(on_workers.values()) == [1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("cross_node", CROSS_NODE)
async def test_auto_routes_each_engine_by_its_node_and_delivers_bit_identical(
    ray_cluster: LocalCluster, fleet: Fleet, cross_node: str
) -> None:
    step = await fleet.publish()
    report = await within(
        fleet.trainer.run_sync_session.remote(
            SyncPlan(engines=fleet.engines, transport="auto", cross_node=cross_node)
        )
    )
    assert report.step == step and report.transport == "auto"
    assert report.committed == tuple(fleet.engines)
    await assert_engines_hold(fleet.trainer, fleet.engines, step)
    # What routing went by: the node each engine reported (never a guess).
    assert {n: s.node_id for n, s in report.view.engines.items()} == fleet.node_id
    # Every engine on a worker node went through the cross-node transport.
    assert {n: report.engines[n].transport for n in fleet.on_workers()} == dict.fromkeys(
        fleet.on_workers(), cross_node
    )
    # head-e0 shares the cache owner's node: auto maps it the shared snapshot. One
    # session mixes both paths.
    assert report.engines[Fleet.HEAD_ENGINE].transport == "shm"


@pytest.mark.parametrize("transport", CROSS_NODE)
async def test_cross_node_transport_delivers_bit_identical_to_every_node(
    fleet: Fleet, transport: str
) -> None:
    for _ in range(2):  # the second session reuses what the first set up (a group)
        step = await fleet.publish()
        report = await within(
            fleet.trainer.run_sync_session.remote(
                SyncPlan(engines=fleet.engines, transport=transport)
            )
        )
        assert report.step == step
        assert report.num_buckets > 4  # 64 KiB buckets: the model spans many
        assert report.committed == tuple(fleet.engines)
        assert {t.transport for t in report.engines.values()} == {transport}
        assert all(t.version == step for t in report.engines.values())
        await assert_engines_hold(fleet.trainer, fleet.engines, step)


async def test_shm_for_an_engine_on_another_node_is_refused_before_anything_moves(
    ray_cluster: LocalCluster, fleet: Fleet
) -> None:
    step = await fleet.publish()
    before = await receiver_stats(fleet.engines)
    # head-e0 first: it may use "shm" (same node), so the refusal must name the
    # first engine that may not, node1-e0.
    assert list(fleet.engines)[:2] == [Fleet.HEAD_ENGINE, "node1-e0"]
    with ray_cluster.watch_store() as store:
        with pytest.raises(TopologyError) as refused:
            await within(
                fleet.trainer.run_sync_session.remote(
                    SyncPlan(engines=fleet.engines, transport="shm")
                )
            )
    error = refused.value
    assert (error.engine, error.transport, error.step) == ("node1-e0", "shm", step)
    message = str(error)
    for part in ("'node1-e0'", fleet.node_id["node1-e0"], ray_cluster.nodes[0]):
        assert part in message, message
    # Before anything moved: no engine saw a begin (nothing opened, nothing aborted,
    # nothing committed), no byte entered any object store, the pin was released.
    assert await receiver_stats(fleet.engines) == before
    assert all(not s.open_sessions for s in before.values())
    assert store.grown == (0,) * len(ray_cluster.nodes), store
    stats = await within(fleet.trainer.cache_stats.remote())
    assert stats.pins == {}


async def test_default_plan_sends_deltas_across_nodes_only_and_full_when_much_changed(
    ray_cluster: LocalCluster, fleet: Fleet
) -> None:
    plan = SyncPlan(engines=fleet.engines)  # delta="auto": the default
    # The first sparse sessions start the trainer's delta store and make each engine
    # keep a base; from then on a sparse step reaches the worker nodes as a delta.
    for _ in range(4):
        step = await fleet.publish_nudged()
        report = await within(fleet.trainer.run_sync_session.remote(plan))
        assert report.committed == tuple(fleet.engines)
        if all(report.engines[n].delta for n in fleet.on_workers()):
            break
    assert {n: report.engines[n].delta for n in fleet.on_workers()} == dict.fromkeys(
        fleet.on_workers(), True
    ), report.engines
    await assert_engines_hold(fleet.trainer, fleet.engines, step)

    # One more sparse step, watched: each worker node pulls the delta, not the snapshot.
    step = await fleet.publish_nudged()
    with ray_cluster.watch_store() as store:
        report = await within(fleet.trainer.run_sync_session.remote(plan))
    assert all(report.engines[n].delta for n in fleet.on_workers()), report.engines
    # The engine beside the trainer maps the shared snapshot: never a delta.
    assert not report.engines[Fleet.HEAD_ENGINE].delta
    sent = {report.engines[n].sent_bytes for n in fleet.on_workers()}
    assert len(sent) == 1 and 0 < sent.pop() < report.nbytes * 0.1, report.engines
    # 1 word in 64 changed: the delta is ~10% of the bytes (6 per changed word), plus
    # per-bucket framing; a full pull per node would be >= report.nbytes.
    for node in (1, 2, 3):
        assert store.grown[node] < report.nbytes * 0.2, store
    await assert_engines_hold(fleet.trainer, fleet.engines, step)
    stats = await within(fleet.trainer.delta_stats.remote())
    assert stats.step == step and 0 < stats.changed_fraction < 0.05, stats

    # A step that rewrites every weight: its delta is over the plan's ratio (and the
    # store's cap): every engine gets the full snapshot, bit for bit.
    step = await fleet.publish()
    report = await within(fleet.trainer.run_sync_session.remote(plan))
    assert report.committed == tuple(fleet.engines)
    assert not any(e.delta for e in report.engines.values()), report.engines
    await assert_engines_hold(fleet.trainer, fleet.engines, step)
    dropped = await within(fleet.trainer.delta_stats.remote())
    assert dropped.dropped >= 1 and dropped.last_ratio > 0.5, dropped

    # Another: the session goes full at once, without waiting for that step's delta.
    step = await fleet.publish()
    report = await within(fleet.trainer.run_sync_session.remote(plan))
    assert not any(e.delta for e in report.engines.values()), report.engines
    await assert_engines_hold(fleet.trainer, fleet.engines, step)
    skipped = await within(fleet.trainer.delta_stats.remote())
    assert skipped.skipped == dropped.skipped + 1, skipped

    # Sparse steps again: deltas come back once the store has made a small one.
    for _ in range(3):
        step = await fleet.publish_nudged()
        report = await within(fleet.trainer.run_sync_session.remote(plan))
        if all(report.engines[n].delta for n in fleet.on_workers()):
            break
    assert all(report.engines[n].delta for n in fleet.on_workers()), report.engines
    await assert_engines_hold(fleet.trainer, fleet.engines, step)
