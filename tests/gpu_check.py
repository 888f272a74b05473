"""One standalone check of the cache's GPU path, for a bare GPU machine (no Ray needed).

    python tests/gpu_check.py [--cpu] [--mib 512]      # from the repository root

A tool of this repository's test suite, not part of the wheel (tests/test_gpu.py
runs it on a GPU machine, tests/test_gpu_check.py on CPU tensors).

Checks, printing what it measured:

1. shared buffers: a page-locked (CUDA host-registered) shared buffer reports as
   pinned and a read-only mapping of its region (:func:`~asyncsync.sharedmem.map_region`)
   sees the bytes written;
2. builds: a cache build of CUDA tensors (several dtypes, non-contiguous,
   empty, larger than a device chunk, several buckets; and a small transformers
   Llama's ``state_dict`` when transformers is installed), with non-blocking
   device-to-host copies, equals ``.cpu()`` of every tensor bit for bit, its
   checksums equal those of :func:`~asyncsync.buckets.pack` of the CPU copies,
   and later builds reuse the pooled buffers;
3. the torn-snapshot guard: a build whose CUDA weights are written in place
   after being copied is refused, a write through ``.data`` is caught by the
   build's ``guard``, and an undisturbed build publishes;
4. bandwidth: a device-to-host build of ``--mib`` MiB against a plain pinned
   ``copy_`` of the same bytes, and against xxh3-64 over host memory, measured
   in the same run (printed, not judged: a shared machine only ever slows it).

Exits 1 on any mismatch. Without CUDA it says so and exits 0, unless ``--cpu``
is given: then it runs the same checks on CPU tensors (unpinned buffers), which
is how the logic is tested on machines without a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from asyncsync.buckets import DEVICE_CHUNK, checksum, pack
from asyncsync.cache import BucketCache
from asyncsync.errors import TornSnapshotError
from asyncsync.sharedmem import SharedBuffer, map_region

__all__ = ["main"]

MIB = 1 << 20


class Failed(Exception):
    """A check did not hold."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes in row-major order (NaN payloads and -0.0 compare too)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def weights(step: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """Tensors of several dtypes and layouts whose values encode ``step``."""
    big = (DEVICE_CHUNK * 2 + 3 * MIB) // 2  # bf16 elements: three device chunks
    base = torch.arange(1 << 18, device=device, dtype=torch.float32).mul_(step + 1)
    return [
        ("dense.fp32", base.view(512, 512)),
        ("dense.bf16", (base[: 1 << 16] / 7).to(torch.bfloat16).view(256, 256)),
        ("transposed", base[: 1 << 16].view(128, 512).t()),  # not contiguous
        ("strided", base[::3]),
        ("ints", torch.arange(1000, device=device, dtype=torch.int64) * (step + 3)),
        ("fp8", (base[:4096] / 1000).to(torch.float8_e4m3fn)),
        ("scalar", torch.tensor(float(step), device=device)),
        ("empty", torch.empty(0, 16, device=device)),
        ("large.bf16", torch.full((big,), step + 0.5, device=device, dtype=torch.bfloat16)),
    ]


def llama_state_dict(device: torch.device) -> list[tuple[str, torch.Tensor]] | None:
    """A small randomly initialised transformers Llama's state dict (no download), or None."""
    try:
        import transformers
    except ImportError:
        return None
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=2048,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.to(device=device, dtype=torch.bfloat16)  # type: ignore[call-arg]
    return list(model.state_dict().items())


async def build_and_compare(
    cache: BucketCache, step: int, named: list[tuple[str, torch.Tensor]], pinned: bool
) -> set[int]:
    """Build ``named`` as ``step``; compare with ``.cpu()`` and ``pack``; return the addresses."""
    async with cache.build(step) as build:
        await build.add(named)
    want = pack([(n, t.cpu()) for n, t in named], cache.bucket_bytes)
    async with cache.read(min_step=step) as snap:
        check(snap.step == step, f"read step {snap.step}, built {step}")
        got = list(snap.named_tensors())
        check([n for n, _ in got] == [n for n, _ in named], f"step {step}: names differ")
        for (name, have), (_, ref) in zip(got, named, strict=True):
            check(have.dtype == ref.dtype and have.shape == ref.shape, f"{name}: dtype or shape")
            check(torch.equal(raw(have), raw(ref)), f"step {step}: {name} differs from .cpu()")
        check(
            [b.checksum for b in snap.buckets] == [b.checksum for b in want],
            f"step {step}: checksums differ from pack() of the CPU tensors",
        )
        for bucket in snap.buckets:
            bucket.verify()
            check(bucket.region is not None, "a cache bucket has no shared region")
            if pinned and bucket.nbytes:
                check(torch.from_numpy(bucket.buffer).is_pinned(), "a bucket is not pinned")
        return {b.buffer.ctypes.data for b in snap.buckets}


def check_shared_buffer(pin: bool) -> str:
    buffer = SharedBuffer.allocate(8 * MIB, pin_memory=pin, prefault=True)
    try:
        buffer.array[:] = np.arange(buffer.nbytes, dtype=np.uint64).view(np.uint8)[: buffer.nbytes]
        if pin:
            check(torch.from_numpy(buffer.array).is_pinned(), "registered buffer is not pinned")
        region = buffer.region(4096, 4 * MIB)
        mapped = map_region(region)
        check(not mapped.flags.writeable, "a mapped region is writable")
        check(
            checksum(mapped) == checksum(buffer.array[4096 : 4096 + 4 * MIB]),
            "a mapped region differs from the buffer",
        )
        return f"{region.name}: {'pinned, ' if pin else ''}mapped read-only, bytes equal"
    finally:
        buffer.release()


async def check_builds(device: torch.device, pin: bool) -> list[str]:
    cache = BucketCache(bucket_bytes=4 * MIB, pin_memory=pin)
    check(cache.pin_memory == pin, "cache.pin_memory")
    lines = []
    addresses = {}
    for step in range(3):
        addresses[step] = await build_and_compare(cache, step, weights(step, device), pin)
    # Step 0's buffers went back to the pool when step 1 was published; step 2 reuses them.
    check(addresses[2] == addresses[0], "step 2 did not reuse step 0's pooled buffers")
    lines.append(f"3 builds of {len(weights(0, device))} tensors: equal to .cpu(), pool reused")
    llama = llama_state_dict(device)
    if llama is None:
        lines.append("transformers not installed: Llama state_dict build skipped")
    else:
        await build_and_compare(cache, 3, llama, pin)
        lines.append(f"Llama state_dict build ({len(llama)} tensors): equal to .cpu()")
    await cache.close()
    return lines


async def check_torn_guard(device: torch.device, pin: bool) -> list[str]:
    cache = BucketCache(bucket_bytes=MIB, pin_memory=pin)
    first = torch.zeros(MIB // 4, device=device)  # exactly one bucket
    second = torch.ones(1024, device=device)
    counter = [0]

    def source(write: Callable[[], None] | None) -> Iterator[tuple[str, torch.Tensor]]:
        yield "first", first
        if write is not None:
            write()  # runs after "first" was copied, before "second" is
        yield "second", second

    def in_place() -> None:
        first.add_(1)

    def through_data() -> None:
        first.data.add_(1)
        counter[0] += 1

    async with cache.build(0) as build:
        await build.add(source(None))
    try:
        async with cache.build(1) as build:
            await build.add(source(in_place))
        raise Failed("a build whose weights were written in place published")
    except TornSnapshotError as exc:
        check("'first'" in str(exc) and "step 1" in str(exc), f"torn error names: {exc}")
    async with cache.build(2) as build:  # .data writes slip past the version counter...
        await build.add(source(through_data))
    check(cache.ready_step == 2, "a build without a guard refused a .data write")
    try:
        async with cache.build(3, guard=lambda: counter[0]) as build:  # ...not past a guard
            await build.add(source(through_data))
        raise Failed("a build with a changed guard published")
    except TornSnapshotError as exc:
        check("guard" in str(exc), f"guard error names: {exc}")
    async with cache.build(4, guard=lambda: counter[0]) as build:
        await build.add(source(None))
    check(cache.ready_step == 4, f"ready step {cache.ready_step}, want 4")
    await cache.close()
    return ["in-place write refused, .data write caught by the guard, quiet build published"]


def bandwidth(device: torch.device, pin: bool, nbytes: int, reps: int) -> list[str]:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1.5)
    host = torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=pin).fill_(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def best(work: Callable[[], object]) -> float:
        out = float("inf")
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            work()
            sync()
            out = min(out, time.perf_counter() - start)
        return out

    # The build copies in one thread: so does the limit it is compared with.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        copy_s = best(lambda: host.copy_(src, non_blocking=device.type == "cuda"))
    finally:
        torch.set_num_threads(threads)
    array = host.view(torch.uint8).numpy()
    hash_s = best(lambda: checksum(array))
    # A build of the same bytes in 64 MiB tensors, 256 MiB buckets, into pooled buffers.
    pieces = [(f"w{i}", p) for i, p in enumerate(torch.split(src, 32 * MIB))]

    async def builds() -> float:
        cache = BucketCache(bucket_bytes=256 * MIB, pin_memory=pin)
        out = float("inf")
        for step in range(reps + 1):
            if cache._top_up_task is not None:
                await cache._top_up_task  # the pool is pre-faulted between builds
            start = time.perf_counter()
            async with cache.build(step) as build:
                await build.add(pieces)
            if step:  # the first build pays for fresh buffers
                out = min(out, time.perf_counter() - start)
        await cache.close()
        return out

    build_s = asyncio.run(builds())
    gb = nbytes / 1e9
    kind = "device-to-host" if device.type == "cuda" else "host"
    limit = max(copy_s, hash_s)  # the slower of the two bounds a one-pass build
    return [
        f"plain {'pinned ' if pin else ''}{kind} copy_: {gb / copy_s:7.2f} GB/s",
        f"xxh3-64 over host memory:  {gb / hash_s:7.2f} GB/s",
        f"cache build (copy + hash): {gb / build_s:7.2f} GB/s = {copy_s / build_s:.2f} of copy_, "
        f"{limit / build_s:.2f} of the slower of the two",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tests/gpu_check.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cpu", action="store_true", help="run the checks on CPU tensors")
    parser.add_argument("--mib", type=int, default=512, help="bytes for the bandwidth figures")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.cpu:
        device, pin = torch.device("cpu"), False
    elif torch.cuda.is_available():
        device, pin = torch.device("cuda", torch.cuda.current_device()), True
    else:
        print("CUDA is not available: nothing to check (--cpu runs the checks on CPU tensors)")
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU tensors"
    print(f"gpu_check on {name}, torch {torch.__version__}")
    steps: list[tuple[str, Callable[[], list[str]]]] = [
        ("shared buffer", lambda: [check_shared_buffer(pin)]),
        ("builds", lambda: asyncio.run(check_builds(device, pin))),
        ("torn guard", lambda: asyncio.run(check_torn_guard(device, pin))),
        ("bandwidth", lambda: bandwidth(device, pin, args.mib * MIB, args.reps)),
    ]
    failed = 0
    for title, run in steps:
        try:
            lines = run()
        except Failed as exc:
            failed += 1
            print(f"FAIL {title}: {exc}")
            continue
        for line in lines:
            print(f"ok   {title}: {line}")
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
