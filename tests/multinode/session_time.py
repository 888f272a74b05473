"""Session time: six engines on three worker nodes against six engines on the head.

Not a test (nothing is asserted about time): a measurement to run by hand, in a
process of its own (it starts its own cluster)::

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python tests/multinode/session_time.py

The trainer runs on the head. Layout ``3 nodes``: two engines on each of three
worker nodes; layout ``1 node``: six engines on the head, beside the trainer. Each
transport that a layout allows runs ``--repeat`` timed sessions (after one
untimed warm-up) of the tiny test model and of a larger one; the table gives the
median of ``SyncReport.seconds`` (pin to last commit) and of the wall time the
driver waited.

All nodes share this machine's CPUs and memory: "another node" here costs what
Ray's object manager spends copying between two object stores on one host,
not a network. Read the numbers as what topology costs in CPU and copies, not as
a network benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from _actors import TINY_LLAMA, StepTrainer  # noqa: E402
from _fleet import start_engine  # noqa: E402

from asyncsync.actor import train_actor  # noqa: E402
from asyncsync.session import SyncPlan  # noqa: E402
from asyncsync.testing import LocalCluster, local_cluster  # noqa: E402

MEDIUM_LLAMA: dict[str, Any] = dict(
    TINY_LLAMA,
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    max_position_embeddings=128,
)
"""About 9 M parameters: 36 MB of float32 weights."""

MODELS = {"tiny": (TINY_LLAMA, 64 << 10), "medium": (MEDIUM_LLAMA, 4 << 20)}
"""name -> (config, bucket bytes): 0.4 MB in 8 buckets, 32.5 MB in 6."""


class SizedTrainer(StepTrainer):
    """The tests' step trainer with a model of the given size."""

    def __init__(self, config: dict[str, Any], bucket_bytes: int) -> None:
        super().__init__(bucket_bytes=bucket_bytes)
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **config))


async def measure(
    cluster: LocalCluster, model: str, repeat: int
) -> list[tuple[str, str, str, float, float]]:
    import ray

    config, bucket_bytes = MODELS[model]
    trainer = train_actor(SizedTrainer, num_cpus=0, **cluster.placement(0)).remote(
        config, bucket_bytes
    )
    layouts = {"3 nodes": [1, 1, 2, 2, 3, 3], "1 node": [0] * 6}
    engines = {
        layout: {
            f"e{k}@{node}": start_engine(cluster, node, seed=k, config=config)
            for k, node in enumerate(nodes)
        }
        for layout, nodes in layouts.items()
    }
    everyone = [e for by_name in engines.values() for e in by_name.values()]
    await asyncio.gather(trainer.cache_ready_step.remote(), *(e.ping.remote() for e in everyone))
    rows = []
    step = 0
    for layout, targets in engines.items():
        transports = ["auto", "object_store", "collective"]
        if layout == "1 node":
            transports.append("shm")
        for transport in transports:
            seconds, walls = [], []
            used: set[str] = set()
            for i in range(repeat + 1):
                await trainer.publish.remote(step)
                step += 1
                start = time.perf_counter()
                report = await trainer.run_sync_session.remote(
                    SyncPlan(targets=targets, transport=transport)
                )
                wall = time.perf_counter() - start
                used = {t.transport for t in report.targets.values()}
                if i:  # the first one sets up (a collective group, the engines' first copy)
                    seconds.append(report.seconds)
                    walls.append(wall)
            rows.append(
                (
                    f"{model} ({report.nbytes / 1e6:.1f} MB, {report.num_buckets} buckets)",
                    layout,
                    f"{transport} -> {','.join(sorted(used))}",
                    statistics.median(seconds),
                    statistics.median(walls),
                )
            )
    for handle in [trainer, *everyone]:
        ray.kill(handle, no_restart=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
    rows = []
    with local_cluster(
        3, object_store_memory=256 << 20, pythonpath=[str(HERE), str(HERE.parent)]
    ) as cluster:
        for model in args.models:
            rows += asyncio.run(measure(cluster, model, args.repeat))
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    print(f"{'model':<28} {'layout':<8} {'transport -> used':<32} {'session s':>9} {'wall s':>7}")
    for model, layout, transport, seconds, wall in rows:
        print(f"{model:<28} {layout:<8} {transport:<32} {seconds:>9.3f} {wall:>7.3f}")


if __name__ == "__main__":
    main()
