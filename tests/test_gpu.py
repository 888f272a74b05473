"""The GPU build path and the collective transport from GPU memory (skipped without CUDA).

* A build from CUDA tensors copies them into pinned host buffers (asynchronous
  copies, one synchronization per bucket and device) that the pool hands back to
  the next build, and the bytes equal a CPU packing of the same tensors.
* ``python tests/gpu_check.py`` passes: page-locked shared buffers,
  CUDA builds bit for bit against ``.cpu()``, the torn-snapshot guard on CUDA
  tensors (its figures are printed with ``-s``).
* A train actor with its weights on a GPU sends to CPU engines over gloo, and to a
  GPU engine over NCCL when a second GPU exists (the group picks NCCL only when
  every rank has CUDA).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gpu_check
import pytest
import ray
import torch
from test_collective import SinkEngine

from asyncsync.actor import WeightSyncActor, train_actor
from asyncsync.buckets import pack
from asyncsync.cache import BucketCache
from asyncsync.plan import SyncPlan
from asyncsync.transport.collective import CollectiveStats

pytestmark = pytest.mark.gpu


def cuda_weights(step: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """Tensors of several dtypes and layouts whose values encode ``step``."""
    base = torch.arange(1 << 18, device=device, dtype=torch.float32).mul_(step + 1)
    return [
        ("dense.fp32", base.view(512, 512)),
        ("dense.bf16", (base[: 1 << 16] / 7).to(torch.bfloat16).view(256, 256)),
        ("transposed", base[: 1 << 16].view(128, 512).t()),  # not contiguous
        ("ints", torch.arange(1000, device=device, dtype=torch.int64) * (step + 3)),
        ("empty", torch.empty(0, 16, device=device)),
    ]


async def test_build_copies_cuda_tensors_into_reused_pinned_buffers() -> None:
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # not always cuda:0
    cache = BucketCache(bucket_bytes=512 << 10)
    assert cache.pin_memory
    pointers: dict[int, set[int]] = {}
    for step in range(3):
        weights = cuda_weights(step, device)
        async with cache.build(step) as build:
            await build.add(weights)
        async with cache.read() as snap:
            want = pack([(n, t.cpu()) for n, t in weights], 512 << 10)
            assert [b.checksum for b in snap.buckets] == [b.checksum for b in want]
            for (name, got), (_, ref) in zip(snap.named_tensors(), weights, strict=True):
                assert torch.equal(got, ref.cpu()), name
            for bucket in snap.buckets:
                assert torch.from_numpy(bucket.buffer).is_pinned()
            pointers[step] = {b.buffer.ctypes.data for b in snap.buckets}
    # Step 0's buffers went back to the pool when step 1 was published; step 2 reuses them.
    assert pointers[2] == pointers[0]
    await cache.close()


def test_gpu_check_passes() -> None:
    assert gpu_check.main(["--mib", "256"]) == 0


class GpuTrainer(WeightSyncActor):
    """Weights on this actor's GPU; the cache holds pinned host copies."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(bucket_bytes=256 << 10, **kwargs)
        self.device = torch.device("cuda", torch.cuda.current_device())

    def named_weights(self, step: int) -> Iterator[tuple[str, torch.Tensor]]:
        yield from cuda_weights(step, self.device)

    async def publish(self, step: int) -> int:
        return await self.build_cpu_bucket_cache(step)

    async def collective_stats(self) -> CollectiveStats:
        return self._transport("collective").stats()


class GpuSinkEngine(SinkEngine):
    async def device_count(self) -> int:
        return torch.cuda.device_count()


async def sync_and_check(trainer: Any, engines: dict[str, Any], step: int) -> CollectiveStats:
    await trainer.publish.remote(step)
    report = await trainer.run_sync_session.remote(SyncPlan(engines, transport="collective"))
    assert report.step == step
    ready, want = await trainer.ready_snapshot_digests.remote()
    for name, engine in engines.items():
        assert await engine.state_digests.remote() == (ready, want), name
    stats: CollectiveStats = await trainer.collective_stats.remote()
    return stats


OPTIONS = {"collective": {"host": "127.0.0.1", "timeout_s": 30.0, "connect_timeout_s": 30.0}}


async def test_gpu_trainer_sends_to_cpu_engines_over_gloo(actor_factory: Any) -> None:
    trainer = actor_factory(
        train_actor(GpuTrainer, num_cpus=0, num_gpus=1), transport_options=OPTIONS
    )
    engine_cls = ray.remote(SinkEngine).options(max_concurrency=16, num_cpus=0)
    engines = {"c0": actor_factory(engine_cls), "c1": actor_factory(engine_cls)}
    for step in range(2):
        stats = await sync_and_check(trainer, engines, step)
        assert (stats.backend, stats.groups_built) == ("gloo", 1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a GPU per rank: two GPUs")
async def test_gpu_trainer_sends_to_a_gpu_engine_over_nccl(actor_factory: Any) -> None:
    trainer = actor_factory(
        train_actor(GpuTrainer, num_cpus=0, num_gpus=1), transport_options=OPTIONS
    )
    engine_cls = ray.remote(GpuSinkEngine).options(max_concurrency=16, num_cpus=0, num_gpus=1)
    engines = {"g0": actor_factory(engine_cls)}
    assert await engines["g0"].device_count.remote() == 1
    for step in range(2):
        stats = await sync_and_check(trainer, engines, step)
        assert (stats.backend, stats.groups_built) == ("nccl", 1)
