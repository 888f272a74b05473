"""Light train and engine actors for the fleet suites (importable by Ray workers).

A fleet test needs eight or more engines on a two-core machine, so these actors
hold plain tensors instead of a transformers model: each imports torch (about
280 MiB per process) and nothing heavier.

:class:`LightTrainer` publishes weights that encode the step (every element of
every tensor differs between steps), and keeps the digests of each snapshot it
published, so an engine's weights can be compared bit for bit with the
trainer's snapshot of the version the engine serves, even after newer steps.

:class:`LightEngine` is a :class:`~asyncsync.StagingReceiver` whose faults are
injected at runtime: a delay per ``receive`` or ``apply``, a hang, a raise, or the
process dying (``os._exit``) in either. It records the wall-clock span of every
``apply`` so a test can check how many engines applied at once. A restart by Ray
(``max_restarts``) runs ``__init__`` again: the new incarnation has no faults and
serves its initial (empty) weights.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from asyncsync.actor import WeightSyncActor, train_actor
from asyncsync.buckets import Bucket, tensor_digest
from asyncsync.protocol import Stamp
from asyncsync.receiver import StagingReceiver

T = TypeVar("T")

NUM_TENSORS = 6
NUMEL = 16 << 10
"""Six float32 tensors of 64 KiB: with 64 KiB buckets, six buckets per snapshot."""
BUCKET_BYTES = 64 << 10


def step_weights(step: int) -> dict[str, torch.Tensor]:
    """Weights whose every element depends on (step, tensor, position)."""
    base = torch.arange(NUMEL, dtype=torch.float32)
    return {f"layer{i}.w": base * 1e-3 + (step * 10 + i) for i in range(NUM_TENSORS)}


def sparse_step_weights(step: int) -> dict[str, torch.Tensor]:
    """bf16 weights of which about 1% of the elements change from one step to the next
    (as served weights do in RL post-training): the delta suites' weights."""
    out = {}
    position = torch.arange(NUMEL)
    for i in range(NUM_TENSORS):
        t = (position * 1e-3 + i).to(torch.bfloat16)
        for s in range(step + 1):
            hit = (position * 31 + s * 7 + i) % 101 == 0
            t = torch.where(hit, t + (s + 1) * 0.25, t)
        out[f"layer{i}.w"] = t
    return out


class LightTrainer(WeightSyncActor):
    """A train actor with plain tensors; remembers the digests of every published step.

    ``sparse=True``: bf16 weights of which ~1% change per step (see
    :func:`sparse_step_weights`), else float32 weights that change everywhere.
    """

    def __init__(self, sparse: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("bucket_bytes", BUCKET_BYTES)
        super().__init__(**kwargs)
        torch.set_num_threads(1)
        self.weights_of = sparse_step_weights if sparse else step_weights
        self.weights = self.weights_of(-1)
        self.digests: dict[int, dict[str, int]] = {}

    def named_weights(self, step: int) -> Any:
        return list(self.weights.items())

    async def publish(self, step: int) -> int:
        """Set the weights for ``step``, build its snapshot, record the snapshot's digests."""
        self.weights = self.weights_of(step)
        await self.build_cpu_bucket_cache(step)
        ready, digests = await self.ready_snapshot_digests()
        self.digests[ready] = digests
        return step

    async def snapshot_digests(self, step: int) -> dict[str, int]:
        return self.digests[step]

    async def pid(self) -> int:
        return os.getpid()


@dataclass(frozen=True)
class Faults:
    """What a :class:`LightEngine` does wrong (defaults: nothing)."""

    receive_delay_s: float = 0.0
    apply_delay_s: float = 0.0
    begin_delay_s: float = 0.0
    die_in_begin: bool = False
    hang_answer: bool = False
    fail_on_bucket: int | None = None
    hang_on_bucket: int | None = None
    die_on_bucket: int | None = None
    fail_apply: bool = False
    hang_apply: bool = False
    die_apply: bool = False


@dataclass(frozen=True)
class Answer:
    """A rollout's stand-in: the stamp it was served with and the weights it read."""

    stamp: Stamp
    digests: dict[str, int]
    engine: str


@dataclass(frozen=True)
class ApplySpan:
    version: int
    start: float
    end: float


class LightEngine(StagingReceiver):
    """An engine holding plain tensors, with injectable faults (see the module docstring)."""

    def __init__(self, name: str, **faults: Any) -> None:
        """``faults``: what every incarnation starts with (a restart keeps them)."""
        super().__init__()
        torch.set_num_threads(1)
        self.name = name
        self.weights: dict[str, torch.Tensor] = {}
        self.faults = replace(Faults(), **faults)
        self.spans: list[ApplySpan] = []
        self.applies_started: list[int] = []
        self.receives_running = 0
        self.most_receives = 0  # the most receive calls ever running at once

    async def set_faults(self, **faults: Any) -> None:
        """Replace every fault (none given: a healthy engine again)."""
        self.faults = replace(Faults(), **faults)

    async def begin(
        self, session_id: str, step: int, manifest: Sequence[Any], ttl_s: float | None = None
    ) -> Any:
        faults = self.faults
        if faults.die_in_begin:
            os._exit(1)
        if faults.begin_delay_s:
            await asyncio.sleep(faults.begin_delay_s)
        return await super().begin(session_id, step, manifest, ttl_s)

    async def receive(self, session_id: str, index: int, payload: Any) -> int:
        faults = self.faults
        self.receives_running += 1
        self.most_receives = max(self.most_receives, self.receives_running)
        try:
            if faults.receive_delay_s:
                await asyncio.sleep(faults.receive_delay_s)
            if index == faults.fail_on_bucket:
                raise RuntimeError(f"{self.name}: injected fault on bucket {index}")
            if index == faults.die_on_bucket:
                os._exit(1)
            if index == faults.hang_on_bucket:
                await asyncio.Event().wait()
            return await super().receive(session_id, index, payload)
        finally:
            self.receives_running -= 1

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        faults = self.faults
        start = time.time()
        self.applies_started.append(version)
        if faults.apply_delay_s:
            await asyncio.sleep(faults.apply_delay_s)
        if faults.fail_apply:
            raise RuntimeError(f"{self.name}: injected fault in apply of step {version}")
        if faults.die_apply:
            os._exit(1)
        if faults.hang_apply:
            await asyncio.Event().wait()
        # The buckets may map the trainer's memory: copy out before returning.
        self.weights = await asyncio.to_thread(
            lambda: {n: t.clone() for b in buckets for n, t in b.named_tensors()}
        )
        self.spans.append(ApplySpan(version, start, time.time()))

    async def answer(self) -> Answer:
        """Read the served weights under the serving lease, as a generation would."""
        if self.faults.hang_answer:
            await asyncio.Event().wait()
        async with self.serving() as stamp:
            digests = {n: tensor_digest(t) for n, t in self.weights.items()}
        return Answer(stamp, digests, self.name)

    async def state_digests(self) -> tuple[int | None, dict[str, int]]:
        """The served version and the xxh3 digest of each weight tensor."""
        return self.version, {n: tensor_digest(t) for n, t in self.weights.items()}

    async def apply_spans(self) -> list[ApplySpan]:
        return list(self.spans)

    async def started_applies(self) -> list[int]:
        """The version of every ``apply`` begun by this incarnation, finished or not."""
        return list(self.applies_started)

    async def running_receives(self) -> int:
        return self.receives_running

    async def take_most_receives(self) -> int:
        """The most receives that ran at once since the last call (then reset)."""
        most, self.most_receives = self.most_receives, 0
        return most

    async def pid(self) -> int:
        return os.getpid()


def trainer_class(max_concurrency: int = 16, **options: Any) -> Any:
    return train_actor(LightTrainer, max_concurrency=max_concurrency, num_cpus=0, **options)


def engine_class(**options: Any) -> Any:
    import ray

    return ray.remote(LightEngine).options(max_concurrency=32, num_cpus=0, **options)


def max_overlap(spans: Sequence[ApplySpan]) -> int:
    """The largest number of spans open at one instant (an end before a start at a tie)."""
    events = sorted([(s.start, 1) for s in spans] + [(s.end, -1) for s in spans])
    most = now = 0
    for _, delta in events:
        now += delta
        most = max(most, now)
    return most
