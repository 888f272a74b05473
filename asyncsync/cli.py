"""Command line: ``asyncsync demo``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

__all__ = ["main"]


async def _cache_demo(steps: int) -> int:
    import ray
    import torch

    from .cache import BucketCache

    class Holder:
        def __init__(self) -> None:
            self.cache = BucketCache(bucket_bytes=16 << 20)

        async def build(self, step: int) -> float:
            start = time.monotonic()
            async with self.cache.build(step) as build:
                await build.add((f"w{i}", torch.full((1 << 20,), float(step))) for i in range(32))
            return time.monotonic() - start

        async def read(self) -> int:
            async with self.cache.read() as snap:
                await asyncio.sleep(0.05)
                for _, t in snap.named_tensors():
                    assert bool((t == float(snap.step)).all())
                return snap.step

    actor: Any = ray.remote(Holder).options(max_concurrency=8, num_cpus=0).remote()
    await actor.build.remote(0)
    for step in range(1, steps + 1):
        build = actor.build.remote(step)
        reads = await asyncio.gather(*[actor.read.remote() for _ in range(4)])
        seconds = await build
        print(f"step {step}: built 128 MiB in {seconds * 1e3:.0f} ms; overlapping reads saw {reads}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncsync")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="builds overlapping reads in an async Ray actor")
    demo.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)

    from .testing.ray_cluster import local_ray

    with local_ray(num_cpus=2):
        return asyncio.run(_cache_demo(args.steps))


if __name__ == "__main__":
    sys.exit(main())
