"""What an object-store session moves between nodes, measured in the object stores.

The claim (asyncsync.transport): each bucket is put once; each node pulls it once
and every engine on that node maps the node's copy. If each engine pulled its
own, a worker node with two engines would hold two copies of the snapshot; if
the trainer put a bucket per engine, the head would hold one copy per engine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _fleet import Fleet, eventually, within

from asyncsync.plan import SyncPlan
from asyncsync.testing import LocalCluster

RECEIVE_DELAY_S = 0.5
"""Each engine holds every bucket's object ref this long before loading it, so every
primary copy on the head is resident at the same time for several raylet reports."""
APPLY_DELAY_S = 1.0
"""Each engine holds its staged buckets (mapping its node's copies) this long before
it applies them: every worker node shows its whole copy of the snapshot."""


async def set_delays(engines: dict[str, Any], receive_s: float, apply_s: float) -> None:
    await within(
        asyncio.gather(
            *(e.set_faults.remote(receive_delay_s=receive_s) for e in engines.values()),
            *(e.set_apply_delay.remote(apply_s) for e in engines.values()),
        )
    )


async def test_each_bucket_is_put_once_and_each_node_holds_one_copy(
    ray_cluster: LocalCluster, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    engines = fleet.on_workers()  # two on each worker node, none on the head
    step = await fleet.publish()
    await set_delays(engines, RECEIVE_DELAY_S, APPLY_DELAY_S)
    try:
        with ray_cluster.watch_store() as store:
            report = await within(
                fleet.trainer.run_sync_session.remote(
                    SyncPlan(
                        engines=engines,
                        transport="object_store",
                        # Every bucket is requested at once: if the trainer put one
                        # object per engine, the head would show them all together.
                        max_inflight_buckets=64,
                    )
                )
            )
    finally:
        await set_delays(engines, 0.0, 0.0)
    assert report.step == step and report.committed == tuple(engines)
    assert report.num_buckets < 64
    one_copy = report.nbytes
    grown = store.grown
    moved = sum(grown[1:])
    with capsys.disabled():
        print(
            f"\nobject-store session, {len(engines)} engines on 3 worker nodes: snapshot "
            f"{one_copy:,} B in {report.num_buckets} buckets; peak growth per node: head "
            f"(puts) {grown[0]:,} B, "
            + ", ".join(
                f"node{i} {g:,} B ({g / one_copy:.3f}x)" for i, g in enumerate(grown[1:], 1)
            )
            + f"; pulled across nodes: {moved:,} B ({moved / one_copy:.2f} snapshots) "
            f"for {len(engines)} engines"
        )
    # Each object carries its data plus a little metadata; one copy per node, never
    # one per engine (two engines per worker node would make 2x).
    for node, g in enumerate(grown):
        assert one_copy <= g < 1.5 * one_copy, (node, g, one_copy, store)
    # Nothing is left behind. The head's copies go as soon as every engine has
    # loaded its bucket (the trainer keeps no reference past that).
    assert store.delta[0] == 0, store

    # A worker node's copy goes once its engines let go of it at commit; Ray deletes
    # such a copy (still mapped when the trainer freed it) within a few seconds.
    async def all_freed() -> bool:
        return await asyncio.to_thread(ray_cluster.store_bytes) == store.baseline

    await eventually(all_freed, f"the session's buckets stay in the object stores: {store}", 20)
