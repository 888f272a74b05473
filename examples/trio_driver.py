"""Drive a train actor and two engines from a trio program, through ``asyncsync.aio``.

``await ref`` does not work under trio (Ray's ObjectRef yields an asyncio future);
``aio.get`` and ``aio.gather`` do, without a thread per call. The loop below trains,
builds a snapshot of each step, and syncs it to both engines while the next step
trains: the session for step N runs in the nursery while step N+1 trains and
builds. Sessions run one at a time, each sending the newest step built by
then. Each session has a deadline; cancelling it (the deadline, Ctrl-C) cancels
the remote session too, which then aborts on every engine.

Run: ``python examples/trio_driver.py [--steps N] [--address A]``. Exits non-zero
if an engine ends on weights that differ from the trainer's last step. It starts a
private local Ray for the run (another cluster on the machine is left alone) unless
``--address`` or ``RAY_ADDRESS`` names one to join.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import ray
import torch
import trio

from asyncsync import SyncPlan, WeightSyncActor, aio, train_actor
from asyncsync.buckets import Bucket
from asyncsync.receiver import StagingReceiver
from asyncsync.testing import connect_or_start_ray

ADDRESS_HELP = (
    "join the Ray cluster at this address (default: $RAY_ADDRESS if set, else a private "
    "local Ray started for this run and stopped at its end)"
)

SHAPES = {"embed.weight": (512, 64), "layer0.weight": (64, 64), "head.weight": (512, 64)}


class Trainer(WeightSyncActor):
    """A stand-in for a real train actor: a few tensors that a 'step' changes."""

    def __init__(self) -> None:
        super().__init__(bucket_bytes=64 << 10)
        self.weights = {name: torch.zeros(shape) for name, shape in SHAPES.items()}

    def named_weights(self, step: int) -> Iterator[tuple[str, torch.Tensor]]:
        # Iterated in a worker thread by the cache, never on the event loop.
        yield from self.weights.items()

    async def train_step(self, step: int) -> None:
        def update() -> None:
            for w in self.weights.values():
                w.fill_(float(step))

        await asyncio.to_thread(update)  # compute runs off the actor's loop


class Engine(StagingReceiver):
    """A rollout engine that keeps its weights as a dict; commit swaps it atomically."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[str, torch.Tensor] = {}

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        def load() -> dict[str, torch.Tensor]:
            return {name: t.clone() for b in buckets for name, t in b.named_tensors()}

        self.weights = await asyncio.to_thread(load)

    async def weights_step(self) -> float | None:
        """The step every weight encodes (``None`` if the weights mix steps)."""
        values = {float(t.flatten()[0]) for t in self.weights.values()}
        uniform = all(bool((t == t.flatten()[0]).all()) for t in self.weights.values())
        return values.pop() if len(values) == 1 and uniform else None


async def drive(steps: int, session_deadline_s: float = 60.0) -> int:
    trainer: Any = train_actor(Trainer, num_cpus=0).remote()
    engines: dict[str, Any] = {
        f"engine{i}": ray.remote(Engine).options(num_cpus=0, max_concurrency=8).remote()
        for i in range(2)
    }
    reports = []
    # One session at a time (FIFO): two sessions committing out of order would make
    # the engines refuse the older one as stale.
    one_session = trio.Lock()

    async def sync(step: int) -> None:
        async with one_session:
            with trio.fail_after(session_deadline_s):
                plan = SyncPlan(engines=engines, min_step=step)
                report = await aio.get(trainer.run_sync_session.remote(plan))
        reports.append(report)
        print(
            f"  synced step {report.step}: {report.nbytes >> 10} KiB "
            f"in {report.seconds * 1e3:.0f} ms"
        )

    async with trio.open_nursery() as nursery:
        for step in range(steps):
            await aio.get(trainer.train_step.remote(step))
            # The build copies the weights before the next train step changes them.
            await aio.get(trainer.build_cpu_bucket_cache.remote(step))
            print(f"step {step}: trained and built")
            nursery.start_soon(sync, step)  # overlaps the next step's training and build

    versions = await aio.gather(*[e.weights_step.remote() for e in engines.values()])
    print(f"engines serve step {versions}; {len(reports)} sessions")
    ok = all(v == float(steps - 1) for v in versions)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="training steps (default: 4)")
    parser.add_argument("--address", default=None, help=ADDRESS_HELP)
    args = parser.parse_args(argv)
    # A private local Ray unless the user named a cluster (--address or RAY_ADDRESS).
    with connect_or_start_ray(args.address, num_cpus=2):
        return trio.run(drive, args.steps)


if __name__ == "__main__":
    sys.exit(main())
