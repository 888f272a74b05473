"""The asyncsync side of the bench: an async train actor and a light staging engine.

:class:`BenchTrainer` is a :class:`~asyncsync.actor.WeightSyncActor` made remote
with :func:`~asyncsync.actor.train_actor` (explicit ``max_concurrency``): builds
run in worker threads and overlap sync sessions of the previous step. It measures
itself from inside: loop lag, RSS, cache residency. :class:`BenchEngine` is a
:class:`~asyncsync.receiver.StagingReceiver` that applies into preallocated
tensors with :func:`~asyncsync.bench.workload.apply_named`, the same apply work the
baseline engine does.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ..actor import WeightSyncActor, train_actor
from ..buckets import (
    Bucket,
    BucketManifest,
    TensorMeta,
    TensorStream,
    checksum,
    dtype_name,
    fill_buffer,
    layout,
)
from ..errors import ManifestMismatchError
from ..receiver import EngineInfo, StagingReceiver
from ..session import SyncPlan, SyncReport
from .probes import LagSampler, RssSampler, UsageMeter, ValueSampler
from .records import BuildBreakdown, EngineRecord, TrainerRecord
from .workload import (
    ModelSpec,
    TrainCompute,
    apply_named,
    combined_digest,
    materialize,
    preallocate,
    update_weights,
    weight_digests,
)

__all__ = ["BenchEngine", "BenchTrainer", "bench_engine_actor", "bench_trainer_actor"]


class BenchTrainer(WeightSyncActor):
    """One train rank running the bench workload.

    Args:
        spec: the model; weights are ``materialize(spec, seed)``.
        seed: weight and compute seed (the same in every design).
        bucket_bytes: payload budget per bucket.
        train_gflop: fixed matmul work of one training step.
        lag_interval_s: sleep interval of the loop-lag sampler.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        seed: int,
        bucket_bytes: int,
        train_gflop: float,
        lag_interval_s: float = 0.002,
    ) -> None:
        super().__init__(bucket_bytes=bucket_bytes)
        torch.set_num_threads(1)
        self.spec = spec
        self.weights = materialize(spec, seed)
        self.compute = TrainCompute(train_gflop, seed)
        self.rss = RssSampler()
        self.lag = LagSampler(lag_interval_s)
        self.resident = ValueSampler(self._resident_bytes)
        self.usage = UsageMeter()

    def named_weights(self, step: int) -> list[tuple[str, torch.Tensor]]:
        # Worker thread. The driver awaits the build before the next train step,
        # so these tensors do not change while they are copied.
        return list(self.weights.items())

    def _resident_bytes(self) -> int:
        return self.weight_cache.stats().resident_bytes

    async def start_probes(self) -> None:
        """Start the loop-lag and residency samplers on this actor's loop; reset the RSS peak."""
        self.lag.start()
        self.resident.start()
        self.rss.reset()

    async def build_cpu_bucket_cache(self, step: int) -> int:
        """The inherited build, with its resource use recorded."""
        pooled = self.weight_cache.stats().pooled_bytes
        with self.usage.measure("build", step, pooled):
            return await super().build_cpu_bucket_cache(step)

    async def run_sync_session(self, plan: SyncPlan) -> SyncReport:
        """The inherited session, with its resource use recorded (step: the one asked for)."""
        with self.usage.measure("session", -1 if plan.min_step is None else plan.min_step):
            return await super().run_sync_session(plan)

    async def train_step(self, step: int) -> float:
        """The fixed compute plus the weight update of ``step``, off the event loop."""
        with self.sync_span_log.span("train", step):
            return await asyncio.to_thread(self._train, step)

    def _train(self, step: int) -> float:
        loss = self.compute.run()
        update_weights(self.weights, step)
        return loss

    async def ping(self) -> float:
        """Answer at once (measures how responsive the actor is)."""
        return time.time()

    async def record(self, since_step: int = 0) -> TrainerRecord:
        """Stop the samplers and return what they saw, with a digest of the live weights.

        Loop lag is summarized over the builds of steps >= ``since_step`` (the
        measured ones), and over every other wake-up after the first of them began.
        """
        self.lag.stop()
        self.resident.stop()
        spans = self.sync_span_log.snapshot()
        builds = [
            (s.start, s.end) for s in spans if s.kind == "build" and (s.step or 0) >= since_step
        ]
        since = min((a for a, _ in builds), default=0.0)
        digests = await asyncio.to_thread(weight_digests, self.weights)
        # The sampler is stopped: its samples no longer change under the thread.
        build_lag = await asyncio.to_thread(self.lag.summary, builds, since=since)
        other_lag = await asyncio.to_thread(self.lag.summary, builds, inside=False, since=since)
        return TrainerRecord(
            spans=spans,
            rss_peak=self.rss.peak(),
            private_peak=self.rss.peak_private(),
            max_lock_hold_s=self.weight_cache.stats().max_lock_hold_s,
            resident=list(self.resident.samples),
            digest=combined_digest(digests),
            usage=list(self.usage.records),
            build_lag=build_lag,
            other_lag=other_lag,
        )

    async def profile_build(self, step: int, first_build_s: float, reps: int = 3) -> BuildBreakdown:
        """Measure where a build's time goes, with nothing else running on this actor.

        Call after :meth:`record` and after every session ended; steps ``step`` to
        ``step + reps - 1`` must be newer than every step built so far (real
        builds of them are timed).
        """
        hops = []
        for _ in range(50):
            start = time.perf_counter()
            await asyncio.to_thread(_noop)
            hops.append(time.perf_counter() - start)
        lag = LagSampler(self.lag.interval_s)
        lag.start()
        idle = time.time()
        await asyncio.sleep(0.3)
        idle_window = (idle, time.time())
        quiet, windows = [], []
        for i in range(reps):
            wall, start = time.time(), time.perf_counter()
            await self.build_cpu_bucket_cache(step + i)
            quiet.append(time.perf_counter() - start)
            windows.append((wall, time.time()))
        lag.stop()
        parts = await asyncio.to_thread(
            _profile_parts, list(self.weights.items()), self.weight_cache.bucket_bytes, reps
        )
        buckets = int(parts["buckets"])
        # One hop per bucket to group it, one to fill it, one to find the stream ended.
        n_hops = 2 * buckets + 1
        return BuildBreakdown(
            nbytes=self.spec.nbytes,
            buckets=buckets,
            group_s=parts["group_s"],
            alloc_fault_s=max(0.0, parts["fresh_copy_s"] - parts["copy_s"]),
            flat_copy_s=parts["flat_copy_s"],
            copy_s=parts["copy_s"],
            checksum_s=parts["checksum_s"],
            fill_s=parts["fill_s"],
            pipelined_s=parts["pipelined_s"],
            hop_s=statistics.median(hops) * n_hops,
            hops=n_hops,
            quiet_build_s=min(quiet),
            first_build_s=first_build_s,
            reps=reps,
            quiet_lag=await asyncio.to_thread(lag.summary, windows),
            idle_lag=await asyncio.to_thread(lag.summary, [idle_window]),
        )


def _noop() -> None:
    return None


def _copy_only(
    payload: np.ndarray, index: tuple[TensorMeta, ...], tensors: list[torch.Tensor]
) -> None:
    # fill_buffer's copy loop without the padding and the checksum.
    flat = torch.from_numpy(payload)
    for meta, src in zip(index, tensors, strict=True):
        flat[meta.offset : meta.offset + meta.nbytes].view(src.dtype).view(src.shape).copy_(src)


def _profile_parts(
    named: list[tuple[str, torch.Tensor]], bucket_bytes: int, reps: int
) -> dict[str, float]:
    """Time the steps of a build one by one with the cache's own functions (blocking).

    Best of ``reps`` for each step, except the copy into fresh buffers (once).
    """
    start = time.perf_counter()
    stream = TensorStream(named, bucket_bytes)
    groups = []
    while group := stream.next_group():
        index, total = layout(group)
        groups.append((index, total, [t for _, t in group]))
    group_s = time.perf_counter() - start

    start = time.perf_counter()
    arrays = []
    for index, total, tensors in groups:
        array = np.empty(total, dtype=np.uint8)
        _copy_only(array, index, tensors)
        arrays.append(array)
    fresh_copy_s = time.perf_counter() - start

    nbytes = sum(total for _, total, _ in groups)
    chunk = max(1, min(bucket_bytes, nbytes))
    flat_src = torch.empty(chunk, dtype=torch.uint8).fill_(1)
    flat_dst = torch.empty(chunk, dtype=torch.uint8).fill_(0)
    copy_s = checksum_s = fill_s = pipelined_s = flat_s = float("inf")
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bench-checksum")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(-(-nbytes // chunk)):
            flat_dst.copy_(flat_src)
        flat_s = min(flat_s, (time.perf_counter() - start) * nbytes / (-(-nbytes // chunk) * chunk))

        start = time.perf_counter()
        for (index, _, tensors), array in zip(groups, arrays, strict=True):
            _copy_only(array, index, tensors)
        copy_s = min(copy_s, time.perf_counter() - start)

        start = time.perf_counter()
        for array in arrays:
            checksum(array)
        checksum_s = min(checksum_s, time.perf_counter() - start)

        start = time.perf_counter()
        for (index, _, tensors), array in zip(groups, arrays, strict=True):
            fill_buffer(array, index, tensors)
        fill_s = min(fill_s, time.perf_counter() - start)

        start = time.perf_counter()
        hashing = []
        for (index, _, tensors), array in zip(groups, arrays, strict=True):
            fill_buffer(array, index, tensors)
            hashing.append(pool.submit(checksum, array))
        for future in hashing:
            future.result()
        pipelined_s = min(pipelined_s, time.perf_counter() - start)
    pool.shutdown()
    return {
        "buckets": float(len(groups)),
        "group_s": group_s,
        "fresh_copy_s": fresh_copy_s,
        "flat_copy_s": flat_s,
        "copy_s": copy_s,
        "checksum_s": checksum_s,
        "fill_s": fill_s,
        "pipelined_s": pipelined_s,
    }


class BenchEngine(StagingReceiver):
    """A light engine: stages checked buckets, applies them into preallocated weights at commit."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        torch.set_num_threads(1)
        self.params = preallocate(spec)
        self.rss = RssSampler()
        self.receive_s: list[tuple[int, float]] = []
        self.apply_s: list[tuple[int, float]] = []
        self._steps: dict[str, int] = {}

    def check_manifest(self, manifest: Sequence[BucketManifest]) -> None:
        for bucket in manifest:
            for meta in bucket.index:
                param = self.params.get(meta.name)
                if param is None:
                    raise ManifestMismatchError(
                        f"tensor {meta.name!r} is not a weight of this engine"
                    )
                if tuple(param.shape) != meta.shape or dtype_name(param.dtype) != meta.dtype:
                    raise ManifestMismatchError(
                        f"tensor {meta.name!r}: {meta.dtype}{list(meta.shape)} does not fit "
                        f"{dtype_name(param.dtype)}{list(param.shape)}"
                    )

    async def begin(
        self,
        session_id: str,
        step: int,
        manifest: Sequence[BucketManifest],
        ttl_s: float | None = None,
    ) -> EngineInfo:
        info = await super().begin(session_id, step, manifest, ttl_s)
        self._steps[session_id] = step
        return info

    async def receive(self, session_id: str, index: int, payload: Any) -> int:
        start = time.perf_counter()
        try:
            return await super().receive(session_id, index, payload)
        finally:
            self.receive_s.append((self._steps.get(session_id, -1), time.perf_counter() - start))

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        start = time.perf_counter()
        await asyncio.to_thread(self._copy_in, buckets)
        self.apply_s.append((version, time.perf_counter() - start))

    def _copy_in(self, buckets: Sequence[Bucket]) -> None:
        for bucket in buckets:
            apply_named(self.params, bucket.named_tensors())

    async def ping(self) -> None:
        return None

    async def reset_probes(self) -> None:
        self.rss.reset()

    async def record(self) -> EngineRecord:
        digests = await asyncio.to_thread(weight_digests, self.params)
        return EngineRecord(
            version=self.version,
            digest=combined_digest(digests),
            rss_peak=self.rss.peak(),
            private_peak=self.rss.peak_private(),
            receive_s=list(self.receive_s),
            apply_s=list(self.apply_s),
        )


def bench_trainer_actor() -> Any:
    """The remote :class:`BenchTrainer` class (async, ``max_concurrency=16``, no CPU reserved)."""
    return train_actor(BenchTrainer, max_concurrency=16, num_cpus=0)


def bench_engine_actor() -> Any:
    """The remote :class:`BenchEngine` class (async, ``max_concurrency=16``, no CPU reserved)."""
    import ray

    return ray.remote(BenchEngine).options(max_concurrency=16, num_cpus=0)
