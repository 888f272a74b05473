"""Actor classes shared by the Ray tests (importable by Ray workers as ``_actors``).

The trainer holds a real tiny transformers Llama whose every parameter is filled
with values that encode the step, so a torn or mixed-version delivery shows up as
a wrong value, and digests compare bit for bit.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import torch
from _memfd import held_buffers, mapped_buffers

from asyncsync import SessionError
from asyncsync.actor import WeightSyncActor, train_actor
from asyncsync.engines import HFEngine

TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


class StepTrainer(WeightSyncActor):
    """A train actor whose weights encode the step they were set for."""

    def __init__(self, bucket_bytes: int = 64 << 10, **kwargs: Any) -> None:
        super().__init__(bucket_bytes=bucket_bytes, **kwargs)
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **TINY_LLAMA))
        self.fail_after: int | None = None
        self.tensor_delay_s = 0.0

    def named_weights(self, step: int) -> Any:
        for i, (name, tensor) in enumerate(self.model.state_dict().items()):
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError(f"weight source failed at tensor {i} ({name})")
            if self.tensor_delay_s:
                time.sleep(self.tensor_delay_s)  # iterated in a worker thread: a slow source
            yield name, tensor

    async def set_step(self, step: int) -> None:
        """Fill every parameter with values unique to (step, parameter)."""
        with torch.no_grad():
            for i, p in enumerate(self.model.parameters()):
                p.fill_(step + i / 1000)

    async def publish_nudged(self, step: int, every: int = 64) -> int:
        """Build ``step`` after flipping the lowest bit of one 2-byte word in ``every`` of
        each parameter (a sparse step, as RL's small learning rates make)."""
        with torch.no_grad():
            for p in self.model.parameters():
                words = p.data.view(-1).view(torch.int16)
                words[step % every :: every] ^= 1
        return await self.build_cpu_bucket_cache(step)

    async def set_fail_after(self, n: int | None) -> None:
        self.fail_after = n

    async def set_tensor_delay(self, seconds: float) -> None:
        self.tensor_delay_s = seconds

    async def pid(self) -> int:
        return os.getpid()

    async def cache_lock_free(self) -> bool:
        """Whether the cache's lock is free (no task left it held)."""
        lock = self.weight_cache._lock
        return lock is None or not lock.locked()

    async def publish(self, step: int) -> int:
        await self.set_step(step)
        return await self.build_cpu_bucket_cache(step)


class FaultyEngine(HFEngine):
    """A real HFEngine with injectable faults: a delay per bucket, a raise, a hang."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receive_delay_s = 0.0
        self.fail_on_bucket: int | None = None
        self.hang_on_bucket: int | None = None
        self.received = 0
        self.receives_running = 0

    async def set_faults(
        self,
        receive_delay_s: float = 0.0,
        fail_on_bucket: int | None = None,
        hang_on_bucket: int | None = None,
    ) -> None:
        self.receive_delay_s = receive_delay_s
        self.fail_on_bucket = fail_on_bucket
        self.hang_on_bucket = hang_on_bucket

    async def receive(self, session_id: str, index: int, payload: Any) -> int:
        self.received += 1
        self.receives_running += 1
        try:
            if self.receive_delay_s:
                await asyncio.sleep(self.receive_delay_s)
            if index == self.fail_on_bucket:
                raise RuntimeError(f"injected fault on bucket {index}")
            if index == self.hang_on_bucket:
                await asyncio.Event().wait()
            return await super().receive(session_id, index, payload)
        finally:
            self.receives_running -= 1

    async def running_receives(self) -> int:
        """``receive`` calls still running (a hung one that nobody cancelled stays here)."""
        return self.receives_running


async def engine_mappings(engines: dict[str, Any]) -> dict[str, list[str]]:
    """Per engine, the snapshot buffers (tokens) it maps now (only engines that map some).

    An engine keeps the train actor's buffers mapped between sessions (no memory
    of its own: the pages are the owner's), but none that no process holds any
    more: see :func:`stale_mappings`.
    """
    out = {}
    for name, engine in engines.items():
        info = await engine.engine_info.remote()
        mapped = sorted(mapped_buffers(info.pid))
        if mapped:
            out[name] = mapped
    return out


async def stale_mappings(engines: dict[str, Any]) -> dict[str, list[str]]:
    """Per engine, the snapshot buffers it maps that no owner holds any more.

    Such a map would be all that keeps the buffer's memory alive (an owner that
    released it or died): the engine must drop it within about a second.
    """
    mapped = await engine_mappings(engines)
    held = held_buffers()
    stale = {name: [b for b in buffers if b not in held] for name, buffers in mapped.items()}
    return {name: buffers for name, buffers in stale.items() if buffers}


async def assert_no_stale_mappings(engines: dict[str, Any]) -> None:
    """Soon, no engine maps a snapshot buffer that its owner let go of."""
    from _waits import eventually

    async def none_stale() -> bool:
        return await stale_mappings(engines) == {}

    await eventually(none_stale, "an engine still maps a buffer its owner let go of")


def trainer_class(**options: Any) -> Any:
    return train_actor(StepTrainer, max_concurrency=16, num_cpus=0, **options)


def engine_class(**options: Any) -> Any:
    import ray

    return ray.remote(FaultyEngine).options(max_concurrency=16, num_cpus=0, **options)


def make_engine(actor_factory: Any, seed: int = 1) -> Any:
    return actor_factory(engine_class(), "llama", TINY_LLAMA, seed=seed, num_threads=1)


async def assert_engines_hold(trainer: Any, engines: dict[str, Any], step: int) -> None:
    """Every engine serves ``step`` and its weights equal the trainer's snapshot bit for bit."""
    ready, want = await trainer.ready_snapshot_digests.remote()
    assert ready == step, f"trainer's ready step is {ready}, expected {step}"
    for name, engine in engines.items():
        version, have = await engine.state_digests.remote()
        assert version == step, f"{name} serves {version}, expected {step}"
        differ = [n for n in want if have[n] != want[n]]
        assert not differ, f"{name}: {differ[:3]} differ from the trainer's snapshot"


__all__ = [
    "TINY_LLAMA",
    "FaultyEngine",
    "SessionError",
    "StepTrainer",
    "assert_engines_hold",
    "engine_class",
    "engine_mappings",
    "make_engine",
    "trainer_class",
]
