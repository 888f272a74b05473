"""Nodes joining and leaving the train actor's fleet.

The trainer's own fleet holds the six engines of the worker nodes. Two nodes are
added with two engines each; their engines join (``fleet_add``) and the fleet's
keeper catches them up. Then each added node is removed in the middle of a
session, once under each commit policy:

* ``per_engine``: the survivors commit; the lost engines are quarantined, then
  ``gone`` once the keeper's probe finds them dead;
* ``fleet``: the session fails; every survivor keeps its version bit for bit and
  holds no staging; the lost engines are ``gone``.

The tests run in file order (the joins first, then each loss takes one of the
joined nodes); the shared engines' nodes stay up, and the cluster ends with the
nodes it started with.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from _actors import assert_engines_hold
from _fleet import (
    ENGINES_PER_NODE,
    WAIT_S,
    Fleet,
    digests,
    eventually,
    receiver_stats,
    start_engine,
    wait_until_receiving,
    within,
)

from asyncsync import QuorumError, SessionError
from asyncsync.fleet import FleetView, Health
from asyncsync.plan import SyncPlan
from asyncsync.testing import LocalCluster

ADDED = ("A", "B")


@dataclass
class Joined:
    """The nodes this module added (label -> node id) and the engines placed on each."""

    cluster: LocalCluster
    node_id: dict[str, str]
    engines: dict[str, dict[str, Any]]

    def handles(self, base: dict[str, Any]) -> dict[str, Any]:
        """Name -> handle of ``base`` and of every engine placed on an added node."""
        return {**base, **{n: e for on_node in self.engines.values() for n, e in on_node.items()}}

    def remove(self, label: str) -> None:
        """Stop node ``label``; blocks the driver's loop a second or two, not the session,
        which runs in the train actor."""
        self.cluster.remove_node(self.cluster.node_index(self.node_id[label]))


async def view_of(fleet: Fleet) -> FleetView:
    view: FleetView = await within(fleet.trainer.fleet_view.remote())
    return view


async def wait_serving(fleet: Fleet, names: Any, step: int, what: str) -> None:
    async def serving() -> bool:
        view = await view_of(fleet)
        return all(view.serving().get(n, "absent") == step for n in names)

    await eventually(serving, what)


async def wait_gone(fleet: Fleet, names: Any) -> None:
    async def gone() -> bool:
        engines = (await view_of(fleet)).engines
        return all(engines[n].health is Health.GONE for n in names)

    await eventually(gone, f"the keeper never marked {sorted(names)} gone")


@pytest.fixture(scope="module")
async def members(fleet: Fleet) -> AsyncIterator[dict[str, Any]]:
    """The worker nodes' engines in the trainer's fleet, serving its newest step."""
    base = fleet.on_workers()
    step = await fleet.publish()
    for name, engine in base.items():
        await within(fleet.trainer.fleet_add.remote(name, engine))
    await wait_serving(fleet, base, step, "the keeper never caught the worker engines up")
    yield base
    for name in (await view_of(fleet)).engines:
        await within(fleet.trainer.fleet_remove.remote(name))


@pytest.fixture(scope="module")
async def joined(
    ray_cluster: LocalCluster, fleet: Fleet, members: dict[str, Any]
) -> AsyncIterator[Joined]:
    """Nodes A and B, added now, two engines each, every one of them ``fleet_add``-ed."""
    added = Joined(ray_cluster, {}, {})
    try:
        for label in ADDED:
            # Blocking, and on the main thread: Ray's Node installs signal handlers.
            index = ray_cluster.add_node()
            added.node_id[label] = ray_cluster.nodes[index]
            added.engines[label] = {
                f"node{label}-e{k}": start_engine(ray_cluster, index, seed=100 + k)
                for k in range(ENGINES_PER_NODE)
            }
        everyone = [e for on_node in added.engines.values() for e in on_node.values()]
        await within(asyncio.gather(*(e.ping.remote() for e in everyone)), seconds=180)
        for on_node in added.engines.values():
            for name, engine in on_node.items():
                state = await within(fleet.trainer.fleet_add.remote(name, engine))
                assert state.health is Health.CATCHING_UP
        yield added
    finally:
        for node_id in added.node_id.values():
            if node_id in ray_cluster.nodes:
                ray_cluster.remove_node(ray_cluster.node_index(node_id))


async def test_engines_of_an_added_node_join_and_the_keeper_catches_them_up(
    ray_cluster: LocalCluster, fleet: Fleet, joined: Joined
) -> None:
    newcomers = {n: e for on_node in joined.engines.values() for n, e in on_node.items()}
    step = await within(fleet.trainer.cache_ready_step.remote())
    # Nobody sends a session here: the keeper alone brings them to the newest step.
    await wait_serving(fleet, newcomers, step, "the keeper never caught the new engines up")
    await assert_engines_hold(fleet.trainer, newcomers, step)
    view = await view_of(fleet)
    for label, on_node in joined.engines.items():
        for name in on_node:
            assert view.engines[name].node_id == joined.node_id[label]
            assert ray_cluster.node_index(joined.node_id[label]) >= 4  # not a shared node


async def test_per_engine_a_node_lost_mid_session_survivors_commit_its_engines_leave(
    fleet: Fleet, members: dict[str, Any], joined: Joined
) -> None:
    lost = joined.engines["A"]
    handles = joined.handles(members)
    survivors = {n: handles[n] for n in (await view_of(fleet)).serving() if n not in lost}
    step = await fleet.publish()
    for engine in lost.values():
        await within(engine.set_faults.remote(hang_on_bucket=0))
    session = fleet.trainer.run_sync_session.remote(
        # The quorum is one engine; a long grace keeps the session waiting for the
        # lost node's engines, so the loss, not the grace, decides their outcome.
        SyncPlan(policy="per_engine", straggler_grace_s=WAIT_S, timeout_s=2 * WAIT_S)
    )
    for name, engine in lost.items():
        await wait_until_receiving(engine, f"{name} never started receiving")
    joined.remove("A")
    report = await within(session)
    assert report.step == step
    assert sorted(report.committed) == sorted(survivors)
    for name in lost:
        target = report.engines[name]
        assert target.outcome == "quarantined", target
        assert target.error and "receive of bucket" in target.error, target
        assert report.view.engines[name].health in (Health.QUARANTINED, Health.GONE)
    await assert_engines_hold(fleet.trainer, survivors, step)
    assert all(not s.open_sessions for s in (await receiver_stats(survivors)).values())
    # Out of routing for good: the keeper's probe finds them dead.
    await wait_gone(fleet, lost)
    assert set((await view_of(fleet)).serving()) == set(survivors)


async def test_fleet_a_node_lost_mid_session_fails_it_and_survivors_keep_their_version(
    fleet: Fleet, members: dict[str, Any], joined: Joined
) -> None:
    lost = joined.engines["B"]
    handles = joined.handles(members)
    view = await view_of(fleet)
    survivors = {n: handles[n] for n in view.serving() if n not in lost}
    old = await within(fleet.trainer.cache_ready_step.remote())
    assert set(view.serving().values()) == {old}
    before = await digests(survivors)
    stats_before = await receiver_stats(survivors)
    new = await fleet.publish()
    for engine in lost.values():
        await within(engine.set_faults.remote(hang_on_bucket=0))
    session = fleet.trainer.run_sync_session.remote(
        SyncPlan(policy="all_or_nothing", timeout_s=2 * WAIT_S)
    )
    for name, engine in lost.items():
        await wait_until_receiving(engine, f"{name} never started receiving")
    joined.remove("B")
    with pytest.raises(SessionError) as failed:
        await within(session)
    assert failed.value.engine in lost and failed.value.step == new, failed.value
    # Every survivor keeps the version it had, bit for bit: nothing torn, and nothing
    # staged left behind (each saw the session begin and then its abort).
    assert await digests(survivors) == before
    assert all(version == old for version, _ in before.values())
    stats = await receiver_stats(survivors)
    for name, after in stats.items():
        assert (after.version, after.open_sessions, after.staged_bytes) == (old, (), 0), after
        assert after.commits == stats_before[name].commits
        assert after.aborts == stats_before[name].aborts + 1
    view = await view_of(fleet)
    assert {n: view.serving().get(n) for n in survivors} == dict.fromkeys(survivors, old)
    await wait_gone(fleet, lost)
    assert (await within(fleet.trainer.cache_stats.remote())).pins == {}


async def test_collective_a_node_lost_mid_session_per_engine_nobody_is_torn(
    ray_cluster: LocalCluster, fleet: Fleet
) -> None:
    # One gloo group carries every engine of the session: when a member's node goes,
    # the broadcast running stops part-way (engines that have the bucket keep it;
    # those still waiting for it give up after the trainer's collective timeout_s)
    # and every later one fails. Under per_engine the outcome is the policy's:
    # each engine that received every bucket commits, each that could not is
    # quarantined, and the session returns its report, or QuorumError if none
    # could commit; never a transport error escaping from the engines that left.
    # No engine is torn, none keeps staging, and the next session forms a new
    # group with the engines left. (An ad-hoc session: the trainer's fleet is left
    # alone.)
    index = ray_cluster.add_node()
    node_id = ray_cluster.nodes[index]
    others = fleet.on_workers()
    try:
        # One engine there is enough to break the group (and saves starting another).
        lost = {"nodeC-e0": start_engine(ray_cluster, index, seed=200)}
        await within(lost["nodeC-e0"].ping.remote(), seconds=180)
        targets = {**others, **lost}
        step = await fleet.publish()
        plan = SyncPlan(engines=targets, transport="collective")
        assert (await within(fleet.trainer.run_sync_session.remote(plan))).step == step
        before = await digests(others)
        new = await fleet.publish()
        for engine in lost.values():
            await within(engine.set_faults.remote(hang_on_bucket=0))
        session = fleet.trainer.run_sync_session.remote(
            SyncPlan(
                engines=targets,
                transport="collective",
                policy="per_engine",
                straggler_grace_s=WAIT_S,
                timeout_s=2 * WAIT_S,
            )
        )
        # As soon as the session streams: broadcasts are likely still running.
        await wait_until_receiving(lost["nodeC-e0"], "nodeC-e0 never started receiving")
        ray_cluster.remove_node(ray_cluster.node_index(node_id))
        committed: tuple[str, ...] = ()
        try:
            report = await within(session)
        except QuorumError as exc:
            assert "only 0 of 7 engines can still commit" in str(exc), exc
        else:
            assert report.step == new
            for name in lost:
                assert report.engines[name].outcome == "quarantined", report.engines[name]
            committed = report.committed
            outcomes = {report.engines[n].outcome for n in others if n not in committed}
            assert outcomes <= {"quarantined"}, report.engines
        await assert_engines_hold(fleet.trainer, {n: others[n] for n in committed}, new)
        kept = [n for n in others if n not in committed]
        assert await digests({n: others[n] for n in kept}) == {n: before[n] for n in kept}
        assert all(not s.open_sessions for s in (await receiver_stats(others)).values())
        step = await fleet.publish()
        plan = SyncPlan(engines=others, transport="collective")
        assert (await within(fleet.trainer.run_sync_session.remote(plan))).committed == tuple(
            others
        )
        await assert_engines_hold(fleet.trainer, others, step)
    finally:
        if node_id in ray_cluster.nodes:
            ray_cluster.remove_node(ray_cluster.node_index(node_id))
