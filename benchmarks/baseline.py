"""The serialized baseline: the common weight-sync design, implemented faithfully.

* The train actor is a default synchronous Ray actor (no ``max_concurrency``):
  Ray runs its calls one at a time, so nothing overlaps a build or a sync.
* Its cache is guarded by a ``threading.Lock``, held for the whole build and the
  whole sync.
* Every build allocates fresh CPU tensors (``tensor.to("cpu", copy=True)``, what
  ``.to("cpu")`` does for an accelerator tensor) and groups them into buckets.
* Every bucket is serialized with ``torch.save`` to bytes and sent to each engine
  one after another with a blocking ``ray.get`` inside the train actor.
* The engine writes the bytes to ``/dev/shm``, ``torch.load``\\ s them and applies
  them into its preallocated weights (the same apply as the asyncsync engine).

The train loop waits for the sync to finish before its next step. Blocking calls
in this module are the design being measured, not accidents.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from asyncsync.engines.tensors import copy_named
from asyncsync.spans import SpanLog

from .probes import RssSampler, UsageMeter
from .records import EngineRecord, EngineSession, TrainerRecord
from .workload import (
    ModelSpec,
    TrainCompute,
    combined_digest,
    materialize,
    preallocate,
    update_weights,
    weight_digests,
)

__all__ = [
    "BaselineEngine",
    "BaselineTrainer",
    "LockedCache",
    "baseline_engine_actor",
    "baseline_trainer_actor",
]

SHM_PREFIX = "bench-baseline-"


class LockedCache:
    """One snapshot of fresh CPU tensors, grouped into buckets, behind a ``threading.Lock``.

    ``max_hold_s`` is the longest the lock was held; ``resident_samples`` records
    ``(wall time, bytes held)`` at every allocation (old snapshot plus the build so far).
    """

    def __init__(self, bucket_bytes: int) -> None:
        self.bucket_bytes = bucket_bytes
        self.lock = threading.Lock()
        self.step: int | None = None
        self.buckets: list[dict[str, torch.Tensor]] = []
        self.nbytes = 0
        self.max_hold_s = 0.0
        self.resident_samples: list[tuple[float, int]] = []

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self.lock:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.max_hold_s = max(self.max_hold_s, time.perf_counter() - start)

    def build(self, step: int, named: list[tuple[str, torch.Tensor]]) -> None:
        """Copy ``named`` into fresh CPU tensors, bucketed, and make them the snapshot."""
        with self.locked():
            buckets: list[dict[str, torch.Tensor]] = [{}]
            size = 0
            built = 0
            for name, tensor in named:
                n = tensor.numel() * tensor.element_size()
                if buckets[-1] and size + n > self.bucket_bytes:
                    buckets.append({})
                    size = 0
                buckets[-1][name] = tensor.detach().to("cpu", copy=True)
                size += n
                built += n
                self.resident_samples.append((time.time(), self.nbytes + built))
            self.buckets, self.step, self.nbytes = buckets, step, built


class BaselineTrainer:
    """The common design's train actor (synchronous; make it remote with no options)."""

    def __init__(
        self, spec: ModelSpec, *, seed: int, bucket_bytes: int, train_gflop: float
    ) -> None:
        torch.set_num_threads(1)
        self.spec = spec
        self.weights = materialize(spec, seed)
        self.compute = TrainCompute(train_gflop, seed)
        self.cache = LockedCache(bucket_bytes)
        self.spans = SpanLog()
        self.rss = RssSampler()
        self.usage = UsageMeter()

    def start_probes(self) -> None:
        self.rss.reset()

    def train_step(self, step: int) -> float:
        with self.spans.span("train", step):
            loss = self.compute.run()
            update_weights(self.weights, step)
            return loss

    def build_cache(self, step: int) -> int:
        with self.spans.span("build", step), self.usage.measure("build", step):
            self.cache.build(step, list(self.weights.items()))
        return step

    def sync_weights(self, engines: list[Any]) -> int:
        """Serialize each bucket and push it to each engine in turn; return the step sent."""
        import ray

        with self.cache.locked():
            step = self.cache.step
            assert step is not None, "build_cache before sync_weights"
            with self.spans.span("session", step), self.usage.measure("session", step):
                for index, bucket in enumerate(self.cache.buckets):
                    buffer = io.BytesIO()
                    torch.save(bucket, buffer)
                    data = buffer.getvalue()
                    for engine in engines:
                        ray.get(engine.receive.remote(step, index, data))
                for engine in engines:
                    ray.get(engine.commit.remote(step))
        return step

    def ping(self) -> float:
        return time.time()

    def record(self, since_step: int = 0) -> TrainerRecord:
        """What this actor measured (it has no event loop: no loop lag)."""
        return TrainerRecord(
            spans=self.spans.snapshot(),
            rss_peak=self.rss.peak(),
            private_peak=self.rss.peak_private(),
            max_lock_hold_s=self.cache.max_hold_s,
            resident=list(self.cache.resident_samples),
            digest=combined_digest(weight_digests(self.weights)),
            usage=list(self.usage.records),
        )


class BaselineEngine:
    """The common design's engine: bytes -> ``/dev/shm`` file -> ``torch.load`` -> apply."""

    def __init__(self, spec: ModelSpec, shm_dir: str = "/dev/shm") -> None:
        torch.set_num_threads(1)
        self.params = preallocate(spec)
        self.shm_dir = shm_dir
        self.version: int | None = None
        self.rss = RssSampler()
        self.sessions: list[EngineSession] = []
        # (bytes received, load s, bytes applied, apply s) per bucket of the open step.
        self._pending: list[tuple[int, float, int, float]] = []

    def receive(self, step: int, index: int, data: bytes) -> int:
        start = time.perf_counter()
        path = os.path.join(self.shm_dir, f"{SHM_PREFIX}{os.getpid()}-{step}-{index}.pt")
        try:
            with open(path, "wb") as f:
                f.write(data)
            tensors = torch.load(path, weights_only=True)
        finally:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        loaded = time.perf_counter()
        applied = copy_named(self.params, tensors.items())
        done = time.perf_counter()
        self._pending.append((len(data), loaded - start, applied, done - loaded))
        return len(data)

    def commit(self, step: int) -> int:
        self.version = step
        parts = self._pending
        self._pending = []
        self.sessions.append(
            EngineSession(
                step=step,
                received_bytes=sum(p[0] for p in parts),
                load_s=sum(p[1] for p in parts),
                verify_s=0.0,
                applied_bytes=sum(p[2] for p in parts),
                apply_s=sum(p[3] for p in parts),
            )
        )
        return step

    def ping(self) -> None:
        return None

    def reset_probes(self) -> None:
        self.rss.reset()

    def record(self) -> EngineRecord:
        return EngineRecord(
            version=self.version,
            digest=combined_digest(weight_digests(self.params)),
            rss_peak=self.rss.peak(),
            private_peak=self.rss.peak_private(),
            sessions=list(self.sessions),
        )


def baseline_trainer_actor() -> Any:
    """``ray.remote(BaselineTrainer)`` with Ray's defaults: a sync actor, one call at a time."""
    import ray

    return ray.remote(BaselineTrainer).options(num_cpus=0)


def baseline_engine_actor() -> Any:
    import ray

    return ray.remote(BaselineEngine).options(num_cpus=0)
