"""How fast the cache builds a snapshot, as fractions of limits measured in the same run.

Measures, single-threaded (``torch.set_num_threads(1)``) and best of ``--reps``:

* the limits: ``Tensor.copy_`` of one flat buffer into a touched one, and xxh3-64
  of one flat buffer (memory-bound reads);
* ``fill_and_hash`` of one flat tensor per chunk size (how ``HASH_CHUNK`` was chosen);
* for a Llama-shaped model (``llama_spec``) of each ``--sizes``: ``fill_buffer``
  (the copy alone) and ``fill_and_hash`` of its tensors outside the cache; cache
  builds: the first build (fresh buffers: page faults), the next build into the
  pool pre-faulted after the first publish, the same with the top-up switched
  off, and a steady-state build into recycled buffers; and the per-tensor
  overhead of a build (against the same bytes as one tensor per bucket).

Prints GB/s and each build as a fraction of the copy limit. The limits are
measured again between every group of measurements and the best is kept (other
processes only ever slow a measurement down; a limit is what the machine can do).
The target is a steady-state 1 GiB build at >= 0.80 of the copy limit on a quiet
machine; the load average is printed first and last.

    python -m benchmarks.build_speed [--sizes 256MiB,1GiB] [--reps 5]   # from the repository root
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable

import torch

from asyncsync import buckets
from asyncsync.buckets import fill_and_hash, fill_buffer, layout
from asyncsync.cache import BucketCache
from benchmarks.limits import LimitsProbe
from benchmarks.workload import format_bytes, llama_spec, materialize, parse_size

GB = 1e9


def best_of(reps: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def chunk_sweep(nbytes: int, reps: int) -> dict[int, float]:
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(3)
    payload = torch.zeros(nbytes, dtype=torch.uint8).numpy()  # 4 KiB pages, like the limit
    index, _ = layout([("flat", src)])
    saved = buckets.HASH_CHUNK
    out = {}
    try:
        for chunk in (64 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20, 16 << 20):
            buckets.HASH_CHUNK = chunk
            out[chunk] = nbytes / best_of(reps, lambda: fill_and_hash(payload, index, [src])) / GB
    finally:
        buckets.HASH_CHUNK = saved
    return out


async def timed_build(
    cache: BucketCache, step: int, named: list[tuple[str, torch.Tensor]]
) -> float:
    start = time.perf_counter()
    async with cache.build(step) as build:
        await build.add(named)
    return time.perf_counter() - start


async def settle(cache: BucketCache) -> None:
    """Wait until the pool's pre-fault task is done (what a trainer's step would cover)."""
    if cache._top_up_task is not None:
        await cache._top_up_task


class Limits:
    """The best copy and hash bandwidths seen so far in this run."""

    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.copy_gbps = 0.0
        self.hash_gbps = 0.0

    def measure(self) -> None:
        # The bench's own limit measurement (best of the repetitions, one thread).
        host = LimitsProbe().host(256 << 20, self.reps)
        self.copy_gbps = max(self.copy_gbps, host.copy_gbps)
        self.hash_gbps = max(self.hash_gbps, host.checksum_gbps)


def primitives(named: list[tuple[str, torch.Tensor]], reps: int) -> tuple[float, float]:
    """The model's tensors through the library's primitives, outside the cache.

    The copy alone (what any build of these tensors must do) and copy + hash.
    """
    index, size = layout(named)
    tensors = [t for _, t in named]
    # Touched like the copy limit's buffers and the cache's (numpy would ask for
    # huge pages for a large array of its own, which neither of them gets).
    payload = torch.zeros(size, dtype=torch.uint8).numpy()
    copy_s = best_of(reps, lambda: fill_buffer(payload, index, tensors))
    fused_s = best_of(reps, lambda: fill_and_hash(payload, index, tensors))
    return copy_s, fused_s


async def builds(nbytes: int, reps: int, lim: Limits) -> dict[str, float]:
    spec = llama_spec(nbytes)
    named = list(materialize(spec, seed=0).items())
    total = spec.nbytes
    out: dict[str, float] = {"tensors": float(len(named)), "bytes": float(total)}

    lim.measure()
    out["copy_only"], out["fused"] = primitives(named, reps)
    lim.measure()

    # A first build pays for fresh memory; the next one, with the pool pre-faulted
    # after the first publish (or not), is what a trainer's second step sees.
    first: list[float] = []
    prefaulted: list[float] = []
    fresh: list[float] = []
    for _ in range(min(reps, 3)):
        for prefault, times in ((True, prefaulted), (False, fresh)):
            cache = BucketCache(bucket_bytes=512 << 20, pin_memory=False, prefault_pool=prefault)
            first.append(await timed_build(cache, 0, named))
            await settle(cache)
            times.append(await timed_build(cache, 1, named))
            await cache.close()
    out["first"] = min(first)
    out["after_prefault"] = min(prefaulted)
    out["after_no_prefault"] = min(fresh)
    lim.measure()

    cache = BucketCache(bucket_bytes=512 << 20, pin_memory=False)
    steady = float("inf")
    for step in range(2 + reps):
        await settle(cache)
        took = await timed_build(cache, step, named)
        if step >= 2:  # buffers recycled from two steps back
            steady = min(steady, took)
    out["steady"] = steady
    await cache.close()
    lim.measure()

    # Per-tensor overhead: the same bytes as one tensor per bucket-sized piece.
    flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in named])
    pieces = [(f"flat{i}", p) for i, p in enumerate(torch.split(flat, 512 << 20))]
    warm = BucketCache(bucket_bytes=512 << 20, pin_memory=False)
    best = float("inf")
    for step in range(2 + reps):
        await settle(warm)
        took = await timed_build(warm, step, pieces)
        if step >= 2:
            best = min(best, took)
    out["flat_steady"] = best
    await warm.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256MiB,1GiB")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    print(
        f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores"
    )

    lim = Limits(args.reps)
    lim.measure()
    sweep = chunk_sweep(256 << 20, args.reps)
    lim.measure()
    results = []
    for nbytes in sizes:
        results.append((nbytes, asyncio.run(builds(nbytes, args.reps, lim))))

    copy_gbps, hash_gbps = lim.copy_gbps, lim.hash_gbps
    serial = 1 / (1 / copy_gbps + 1 / hash_gbps)
    print(f"copy_ limit (touched, 1 thread)   {copy_gbps:6.2f} GB/s")
    print(f"xxh3-64 limit                     {hash_gbps:6.2f} GB/s")
    print(
        f"copy then hash (two passes)       {serial:6.2f} GB/s = {serial / copy_gbps:.2f} of copy"
    )
    print(
        "fill_and_hash of one 256 MiB tensor, by HASH_CHUNK (current "
        f"{format_bytes(buckets.HASH_CHUNK)}):"
    )
    for chunk, gbps in sweep.items():
        print(f"  {format_bytes(chunk):>8}  {gbps:6.2f} GB/s = {gbps / copy_gbps:.2f} of copy")

    for nbytes, r in results:
        total = r["bytes"]

        def line(label: str, seconds: float, total: float = total) -> None:
            gbps = total / seconds / GB
            print(
                f"  {label:42} {seconds * 1e3:8.1f} ms {gbps:6.2f} GB/s = "
                f"{gbps / copy_gbps:.2f} of copy"
            )

        print(
            f"cache build of llama_spec({format_bytes(nbytes)}): {int(r['tensors'])} tensors, "
            f"{format_bytes(total)}"
        )
        line("fill_buffer (copy alone) of these tensors", r["copy_only"])
        line("fill_and_hash of these tensors", r["fused"])
        line("first build (fresh buffers)", r["first"])
        line("next build, pool pre-faulted", r["after_prefault"])
        line("next build, no pre-fault (fresh)", r["after_no_prefault"])
        line("steady state (recycled buffers)", r["steady"])
        line("steady state, one tensor per bucket", r["flat_steady"])
        per_tensor = (r["steady"] - r["flat_steady"]) / r["tensors"]
        print(f"  {'per-tensor overhead of a build':42} {per_tensor * 1e6:8.1f} us")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
