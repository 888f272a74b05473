"""The asyncsync side of the bench: an async train actor and a light staging engine.

:class:`BenchTrainer` is a :class:`~asyncsync.actor.WeightSyncActor` made remote
with :func:`~asyncsync.actor.train_actor` (explicit ``max_concurrency``): builds
run in worker threads and overlap sync sessions of the previous step. It measures
itself from inside: loop lag, RSS, cache residency. :class:`BenchEngine` is the
library's :class:`~asyncsync.engines.TensorEngine` (plain tensors, one copy at
commit: the same apply the baseline engine does) with per-session records.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from asyncsync.actor import WeightSyncActor, train_actor
from asyncsync.buckets import Bucket, TensorStream, checksum, fill_and_hash, fill_buffer, layout
from asyncsync.engines.tensors import TensorEngine, tensor_engine_actor, write_changed
from asyncsync.plan import SyncPlan, SyncReport
from asyncsync.protocol import ReceiverStats
from asyncsync.sharedmem import SharedBuffer

from .probes import RssSampler, UsageMeter, ValueSampler, lag_probe, lag_summary
from .records import BuildBreakdown, EngineRecord, EngineSession, TrainerRecord
from .workload import (
    ModelSpec,
    TrainCompute,
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
        self.lag = lag_probe(lag_interval_s)
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
        await self.lag.stop()
        self.resident.stop()
        spans = self.sync_span_log.snapshot()
        builds = [
            (s.start, s.end) for s in spans if s.kind == "build" and (s.step or 0) >= since_step
        ]
        since = min((a for a, _ in builds), default=0.0)
        digests = await asyncio.to_thread(weight_digests, self.weights)
        # The probe is stopped: its samples no longer change under the thread.
        build_lag = await asyncio.to_thread(lag_summary, self.lag, builds, since=since)
        other_lag = await asyncio.to_thread(
            lag_summary, self.lag, builds, inside=False, since=since
        )
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
        lag = lag_probe(self.lag.interval_s)
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
        await lag.stop()
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
            fused_s=parts["fused_s"],
            hop_s=statistics.median(hops) * n_hops,
            hops=n_hops,
            quiet_build_s=min(quiet),
            first_build_s=first_build_s,
            reps=reps,
            quiet_lag=await asyncio.to_thread(lag_summary, lag, windows),
            idle_lag=await asyncio.to_thread(lag_summary, lag, [idle_window]),
        )


def _noop() -> None:
    return None


def _profile_parts(
    named: list[tuple[str, torch.Tensor]], bucket_bytes: int, reps: int
) -> dict[str, float]:
    """Time the steps of a build one by one with the cache's own functions (blocking).

    Buckets are the cache's kind of buffer (:class:`~asyncsync.sharedmem.SharedBuffer`,
    pre-faulted as the cache's pool keeps them). Best of ``reps`` for each step,
    except the copy into fresh, never touched buffers (once).
    """
    start = time.perf_counter()
    stream = TensorStream(named, bucket_bytes)
    groups = []
    while group := stream.next_group():
        index, total = layout(group)
        groups.append((index, total, [t for _, t in group]))
    group_s = time.perf_counter() - start

    fresh = [SharedBuffer.allocate(total) for _, total, _ in groups]
    start = time.perf_counter()
    for (index, total, tensors), buffer in zip(groups, fresh, strict=True):
        fill_buffer(buffer.array[:total], index, tensors)
    fresh_copy_s = time.perf_counter() - start
    for buffer in fresh:
        buffer.release()

    touched = [SharedBuffer.allocate(total, prefault=True) for _, total, _ in groups]
    arrays = [b.array[:total] for b, (_, total, _) in zip(touched, groups, strict=True)]
    nbytes = sum(total for _, total, _ in groups)
    chunk = max(1, min(bucket_bytes, nbytes))
    flat_src = torch.empty(chunk, dtype=torch.uint8).fill_(1)
    flat_dst = torch.empty(chunk, dtype=torch.uint8).fill_(0)
    copy_s = checksum_s = fused_s = flat_s = float("inf")
    try:
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(-(-nbytes // chunk)):
                flat_dst.copy_(flat_src)
            took = time.perf_counter() - start
            flat_s = min(flat_s, took * nbytes / (-(-nbytes // chunk) * chunk))

            start = time.perf_counter()
            for (index, _, tensors), array in zip(groups, arrays, strict=True):
                fill_buffer(array, index, tensors)
            copy_s = min(copy_s, time.perf_counter() - start)

            start = time.perf_counter()
            for array in arrays:
                checksum(array)
            checksum_s = min(checksum_s, time.perf_counter() - start)

            start = time.perf_counter()
            for (index, _, tensors), array in zip(groups, arrays, strict=True):
                fill_and_hash(array, index, tensors)
            fused_s = min(fused_s, time.perf_counter() - start)
    finally:
        for buffer in touched:
            buffer.release()
    return {
        "buckets": float(len(groups)),
        "group_s": group_s,
        "fresh_copy_s": fresh_copy_s,
        "flat_copy_s": flat_s,
        "copy_s": copy_s,
        "checksum_s": checksum_s,
        "fused_s": fused_s,
    }


class BenchEngine(TensorEngine):
    """A light engine: a :class:`~asyncsync.engines.TensorEngine` holding the model's weights.

    It records, per session, where its time went (the receiver's own counters:
    load, verify, apply) and can be slowed down (:meth:`set_slowdown`) to play
    an engine that is ``factor`` times slower at receiving and applying.
    :meth:`reset` makes it a fresh engine (initial weights version, no records),
    so one set of engine actors serves many configurations.
    """

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(preallocate(spec))
        torch.set_num_threads(1)
        self.rss = RssSampler()
        self.slowdown = 1.0
        self.sessions: list[EngineSession] = []
        self._counted: tuple[float, ...] = (0.0,) * 5

    async def receive(self, session_id: str, index: int, payload: Any) -> int:
        start = time.perf_counter()
        nbytes = await super().receive(session_id, index, payload)
        await self._slow_down(time.perf_counter() - start)
        return nbytes

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        start = time.perf_counter()
        await super().apply(buckets, version)
        await self._slow_down(time.perf_counter() - start)

    async def apply_changes(
        self, buckets: Sequence[Bucket], changes: Sequence[Any], version: int
    ) -> None:
        # Only the changed words, as TensorEngine's (which defers to an overridden apply).
        start = time.perf_counter()
        await asyncio.to_thread(write_changed, self.params, buckets, changes)
        await self._slow_down(time.perf_counter() - start)

    async def commit(self, session_id: str) -> int:
        version = await super().commit(session_id)
        # The receiver's counters since the last commit are this session's work (the
        # bench drives one session at a time per engine, and none aborts).
        now = _totals(await self.receiver_stats())
        delta = [a - b for a, b in zip(now, self._counted, strict=True)]
        self._counted = now
        self.sessions.append(
            EngineSession(version, int(delta[0]), delta[1], delta[2], int(delta[3]), delta[4])
        )
        return version

    async def _slow_down(self, took_s: float) -> None:
        if self.slowdown > 1.0:
            await asyncio.sleep((self.slowdown - 1.0) * took_s)

    async def set_slowdown(self, factor: float) -> None:
        """Take ``factor`` times as long to receive each bucket and to apply (1: normal speed)."""
        self.slowdown = factor

    async def reset(self) -> None:
        """Become a fresh engine: initial weights version, normal speed, nothing recorded.

        The weights keep their bytes; the first session writes every one of them.
        """
        self.version = None
        self.slowdown = 1.0
        self.sessions = []
        self._counted = _totals(await self.receiver_stats())
        self.rss.reset()

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
            sessions=list(self.sessions),
        )


def _totals(stats: ReceiverStats) -> tuple[float, ...]:
    """The receiver's running totals, in :class:`EngineSession`'s order after ``step``."""
    return (
        stats.received_bytes,
        stats.load_s,
        stats.verify_s,
        stats.applied_bytes,
        stats.apply_s,
    )


def bench_trainer_actor(**ray_options: Any) -> Any:
    """The remote :class:`BenchTrainer` class (async, ``max_concurrency=16``, no CPU reserved)."""
    return train_actor(BenchTrainer, max_concurrency=16, num_cpus=0, **ray_options)


def bench_engine_actor(**ray_options: Any) -> Any:
    """The remote :class:`BenchEngine` class (async, ``max_concurrency=16``, no CPU reserved)."""
    return tensor_engine_actor(BenchEngine, num_cpus=0, **ray_options)
