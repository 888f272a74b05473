"""What the train actor's metrics cost: ``python -m benchmarks.metrics_cost``.

One private local Ray; a train actor and two engines (plain tensors, one node)
with metrics on, and the same with metrics off, run the same steps in
alternating rounds so both see the same machine. Per step it measures the
trainer's stall (``build_cpu_bucket_cache``, what the training loop waits for)
and the session (``run_sync_session`` after its pin). Metrics on uses a 1 s
sampling interval, five times the default's rate, so the sampler's cost shows.
Prints medians and the machine's load average.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from typing import Any

import torch

from asyncsync import StagingReceiver, SyncPlan, WeightSyncActor, train_actor
from asyncsync.buckets import Bucket

ROOT = Path(__file__).resolve().parent.parent


class CostTrainer(WeightSyncActor):
    def __init__(self, mib: int, **kwargs: Any) -> None:
        super().__init__(bucket_bytes=16 << 20, **kwargs)
        torch.set_num_threads(1)
        n = (mib << 20) // 4 // 8
        self.weights = {f"w{i}": torch.full((n,), float(i)) for i in range(8)}

    def named_weights(self, step: int) -> Any:
        return list(self.weights.items())

    async def timed_build(self, step: int) -> float:
        start = time.perf_counter()
        await self.build_cpu_bucket_cache(step)
        return time.perf_counter() - start

    async def record_cost_us(self, n: int) -> float:
        """Microseconds per recorded session (8 engines), Ray metrics included."""
        from asyncsync.metrics import SessionRecord
        from asyncsync.plan import Outcome

        outcomes = {f"e{i}": Outcome.COMMITTED for i in range(8)}
        phases = {"begin": 0.01, "transfer": 0.1, "commit": 0.05}
        record = SessionRecord("session", "ok", 1, 1 << 20, 0.0, 0.2, outcomes, phases, 0.0)
        start = time.perf_counter()
        for _ in range(n):
            self.metrics.session(record)
        return (time.perf_counter() - start) / n * 1e6


class CostEngine(StagingReceiver):
    async def apply(self, buckets: Any, version: int) -> None:
        def copy(bs: list[Bucket]) -> None:
            for b in bs:
                for _, t in b.named_tensors():
                    t.clone()

        await asyncio.to_thread(copy, list(buckets))


async def one_round(trainer: Any, steps: range) -> tuple[list[float], list[float]]:
    stalls, sessions = [], []
    for step in steps:
        stalls.append(await trainer.timed_build.remote(step))
        report = await trainer.run_sync_session.remote(SyncPlan())
        sessions.append(report.seconds)
    return stalls, sessions


async def measure(mib: int, rounds: int, steps_per_round: int) -> dict[str, Any]:
    import ray

    fleets = {}
    for metrics in (False, True):
        trainer = train_actor(CostTrainer, num_cpus=0).remote(
            mib, metrics=metrics, metrics_interval_s=1.0
        )
        engines = {f"e{i}": ray.remote(CostEngine).options(num_cpus=0).remote() for i in range(2)}
        for name, engine in engines.items():
            await trainer.fleet_add.remote(name, engine)
        await trainer.timed_build.remote(-1)
        await trainer.run_sync_session.remote(SyncPlan())  # warm up: mappings, pools
        fleets[metrics] = trainer
    out: dict[bool, tuple[list[float], list[float]]] = {False: ([], []), True: ([], [])}
    step = 0
    for r in range(rounds):
        # Alternate which goes first, so neither always runs on a warmer machine.
        for metrics in (False, True) if r % 2 == 0 else (True, False):
            stalls, sessions = await one_round(fleets[metrics], range(step, step + steps_per_round))
            out[metrics][0].extend(stalls)
            out[metrics][1].extend(sessions)
        step += steps_per_round
    per_session = await fleets[True].record_cost_us.remote(2000)
    return {"off": out[False], "on": out[True], "record_us": per_session}


def _ms(values: list[float], pct: int) -> str:
    ordered = sorted(values)
    value = ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]
    return f"{value * 1e3:6.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics_cost")
    parser.add_argument("--mib", type=int, default=64, help="snapshot size (default: 64)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default: 6)")
    parser.add_argument("--steps", type=int, default=5, help="steps per round (default: 5)")
    args = parser.parse_args()
    from asyncsync.testing import local_ray

    with local_ray(num_cpus=2, pythonpath=[str(ROOT)]):
        result = asyncio.run(measure(args.mib, args.rounds, args.steps))
    load = os.getloadavg()
    print(f"snapshot {args.mib} MiB, 2 engines, {args.rounds * args.steps} steps each")
    for label in ("off", "on"):
        stalls, sessions = result[label]
        print(
            f"metrics {label:3}: stall median {_ms(stalls, 50)}, p90 {_ms(stalls, 90)}; "
            f"session median {_ms(sessions, 50)}, p90 {_ms(sessions, 90)} (n={len(stalls)})"
        )
    print(f"recording one session of 8 engines: {result['record_us']:.1f} us on the actor's loop")
    print(f"load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
