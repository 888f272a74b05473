"""What a routed call costs over a direct actor call, in the same run.

One train actor with a fleet of ``--engines`` TensorEngine actors (a tiny model:
the call measured is the engine's ``served_digests``, which takes the serving
lease and hashes 64 KiB, so the figure is the router's own cost on top of a real,
cheap engine method). Calls alternate in rounds of ``--calls``: direct
(``await handle.served_digests.remote()`` to the engines in turn) and routed
(``FleetRouter.call("served_digests")``, rule newest). Prints p50 and p99 of each
and the load average first and last.

    python -m benchmarks.router_overhead [--engines 2] [--calls 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import torch

from asyncsync import FleetRouter, SyncPlan, WeightSyncActor, train_actor
from asyncsync.engines import tensor_engine_actor
from asyncsync.testing import connect_or_start_ray

SHAPES = {"w0": (64, 128), "w1": (64, 128)}


class _Trainer(WeightSyncActor):
    def named_weights(self, step: int) -> Any:
        return [(n, torch.full(s, float(step))) for n, s in SHAPES.items()]


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return statistics.median(ordered) * 1e6, p99 * 1e6


async def _measure(engines: int, calls: int, rounds: int) -> None:
    trainer = train_actor(_Trainer, num_cpus=0).remote()
    handles = {
        f"e{i}": tensor_engine_actor(num_cpus=0).remote(
            {n: torch.zeros(s) for n, s in SHAPES.items()}
        )
        for i in range(engines)
    }
    for name, handle in handles.items():
        await trainer.fleet_add.remote(name, handle)
    await trainer.build_cpu_bucket_cache.remote(0)
    await trainer.run_sync_session.remote(SyncPlan())
    direct: list[float] = []
    routed: list[float] = []
    order = list(handles.values())
    async with FleetRouter(trainer) as router:
        for _ in range(rounds):
            for i in range(calls):
                start = time.perf_counter()
                await order[i % len(order)].served_digests.remote()
                direct.append(time.perf_counter() - start)
            for _ in range(calls):
                start = time.perf_counter()
                await router.call("served_digests")
                routed.append(time.perf_counter() - start)
    await trainer.close.remote()
    d50, d99 = _percentiles(direct)
    r50, r99 = _percentiles(routed)
    print(f"{len(direct)} calls each way, {engines} engines")
    print(f"direct: p50 {d50:.0f} us, p99 {d99:.0f} us")
    print(f"routed: p50 {r50:.0f} us, p99 {r99:.0f} us")
    print(f"router overhead: p50 +{r50 - d50:.0f} us ({r50 / d50:.2f}x), p99 {r99 / d99:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=2, help="engines (default: 2)")
    parser.add_argument("--calls", type=int, default=300, help="calls per round (default: 300)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default: 3)")
    parser.add_argument("--address", default=None, help="a Ray cluster to join")
    args = parser.parse_args(argv)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with connect_or_start_ray(args.address, num_cpus=2):
        asyncio.run(_measure(args.engines, args.calls, args.rounds))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
