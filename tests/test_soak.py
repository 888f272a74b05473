"""Load and soak: many concurrent readers and sessions against continuous builds.

Two parts, each running for ``ASYNCSYNC_SOAK_SECONDS`` (default 8; ``make soak``
sets 600):

* in-process: one :class:`~asyncsync.BucketCache` on the test's loop, a builder
  publishing new steps back to back, 192 reader tasks pinning and checking
  snapshots, and 8 tasks running real sync sessions (shm transport) into two
  in-process :class:`~asyncsync.engines.HFEngine` while generations run on them;
* on a real local Ray: a train actor building continuously, 8 concurrent session
  loops to two engine actors (object store with deltas, and shm), and readers of
  its snapshot.

Checked: zero torn reads (every read is whole and of one step), no deadlock (every
wait is bounded and the work keeps progressing), flat memory (growth after warm-up
under a stated bound; resident cache bytes back to the ready snapshot plus at most
one snapshot of pool), and every session accounted for: it committed on every
target, or failed with a typed error and was aborted everywhere, and the engines'
counters agree.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
import ray
import torch
from _actors import TINY_LLAMA, assert_no_stale_mappings, engine_class, trainer_class

from asyncsync import BucketCache, SessionError, Snapshot, pack
from asyncsync.buckets import checksum, tensor_digest
from asyncsync.engines import HFEngine
from asyncsync.fleet import EngineFleet, Health
from asyncsync.plan import SyncPlan, SyncReport
from asyncsync.session import run_session
from asyncsync.transport import backend

SOAK_S = float(os.environ.get("ASYNCSYNC_SOAK_SECONDS", "8"))
pytestmark = pytest.mark.timeout(int(SOAK_S) * 2 + 180)

MIB = 1 << 20
RSS_BOUND = 32 * MIB
"""Allowed growth of anonymous resident memory from the second quarter of the run to
the last quarter (both under full load; the first quarter is warm-up).

A leaked snapshot per build would exceed it many times over (the in-process model
is 3.1 MiB and builds run back to back); allocator noise stays well below it."""

BUCKET_BYTES = 256 << 10
READERS, SESSIONS = 192, 8
"""Concurrent tasks of the in-process part: 200 in all. Sessions share the loop's worker
threads with the builder (as in a train actor), so a few keep it busy enough."""

MEDIUM_LLAMA: dict[str, Any] = dict(
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def shm_files() -> list[str]:
    """Anything of asyncsync in /dev/shm (the shared snapshot never creates a file there)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith("asyncsync-")]


def fill_value(step: int, position: int) -> float:
    return float(torch.tensor(step + position / 1000, dtype=torch.float32))


class LocalHandle:
    """An in-process engine behind the ``handle.method.remote(...)`` shape a session calls."""

    class _Method:
        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def remote(self, *args: Any) -> Any:
            return self.fn(*args)

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        for name in ("engine_info", "begin", "receive", "commit", "abort"):
            setattr(self, name, self._Method(getattr(engine, name)))


@dataclass
class Tally:
    reads: int = 0
    torn: list[str] = field(default_factory=list)
    steps_read: set[int] = field(default_factory=set)
    sessions: Counter[str] = field(default_factory=Counter)
    committed: dict[str, int] = field(default_factory=Counter)
    generations: int = 0
    errors: list[str] = field(default_factory=list)


class RssProbe:
    """Samples a process's anonymous resident memory (psutil ``rss - shared``).

    Shared pages are left out: they are the shm bucket files and object-store
    objects mapped while sessions run, which come and go with the sessions in flight.
    """

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []

    def sample(self) -> int:
        info = self.process.memory_info()
        value = int(info.rss - info.shared)
        self.samples.append((time.monotonic(), value))
        return value

    async def run(self, stop: asyncio.Event, every_s: float = 0.2) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(every_s)

    def growth(self) -> tuple[int, int, int]:
        """(median of the run's second quarter, median of its last quarter, their difference).

        Both windows are under full load; the first quarter is warm-up.
        """
        values = [v for _, v in self.samples]
        n = len(values)
        assert n >= 8, f"only {n} memory samples"
        early = statistics.median(values[n // 4 : n // 2])
        late = statistics.median(values[3 * n // 4 :])
        return int(early), int(late), int(late - early)


# ===================================================================== in-process


async def test_soak_in_process_readers_sessions_and_builds() -> None:
    cache = BucketCache(bucket_bytes=BUCKET_BYTES)
    engines = {f"e{i}": HFEngine("llama", MEDIUM_LLAMA, seed=i) for i in range(2)}
    targets = {name: LocalHandle(e) for name, e in engines.items()}
    transport = backend("shm").make()

    def transports(name: str) -> Any:
        return transport

    def fleet() -> EngineFleet:
        # In-process engines: each session gets its own ad-hoc fleet of them.
        return EngineFleet(targets, initial=Health.SERVING)

    source = [(n, torch.empty_like(t)) for n, t in engines["e0"].model.state_dict().items()]
    tally = Tally()
    stop = asyncio.Event()
    probe = RssProbe(os.getpid())
    rng = random.Random(0)

    # Bucket checksums of every step, computed apart from the cache (same layout), so
    # a reader can tell bit for bit that what it pinned is that step and nothing else.
    expected: dict[int, list[int]] = {}

    async def builder() -> int:
        step = -1
        while not stop.is_set():
            step += 1
            expected[step] = await asyncio.to_thread(_fill_source, source, step)
            async with cache.build(step) as build:
                await build.add(source)
            await asyncio.sleep(0.005)
        return step

    async def reader() -> None:
        while not stop.is_set():
            async with cache.read(timeout=30) as snap:
                tally.reads += 1
                tally.steps_read.add(snap.step)
                await asyncio.sleep(rng.random() * 0.01)  # hold the pin while builds go on
                # At the end of the hold: builds went on meanwhile, and must not have
                # touched a pinned buffer.
                torn = _torn(snap, expected[snap.step])
                if torn:
                    tally.torn.append(f"step {snap.step}: {torn}")
            await asyncio.sleep(0.05 + rng.random() * 0.1)  # think time: 192 readers share one loop

    async def sessions() -> None:
        while not stop.is_set():
            plan = SyncPlan(targets, transport="shm", timeout_s=60)
            try:
                report = await run_session(cache, plan, fleet(), transports)
            except SessionError as exc:
                # Concurrent sessions race: one carrying an older step is refused (at
                # begin or at commit) by an engine already serving a newer one.
                # Nothing else may fail.
                tally.sessions[_refusal(exc)] += 1
            else:
                tally.sessions["committed"] += 1
                for name, target in report.engines.items():
                    # "current": the engine served the step already; nothing was sent.
                    tally.committed[name] += target.outcome == "committed"
                    assert target.version == report.step
            await asyncio.sleep(rng.random() * 0.05)

    async def generator(engine: HFEngine) -> None:
        last = -1
        while not stop.is_set():
            gen = await engine.generate([[1, 2, 3, 4]], max_new_tokens=2)
            version = -1 if gen.version is None else gen.version
            if version < last:
                tally.errors.append(f"generation went back from version {last} to {version}")
            last = version
            tally.generations += 1

    async with asyncio.timeout(SOAK_S + 120):
        build_task = asyncio.create_task(builder())
        await cache_ready(cache)
        probing = asyncio.create_task(probe.run(stop))
        workers = [asyncio.create_task(reader()) for _ in range(READERS)]
        workers += [asyncio.create_task(sessions()) for _ in range(SESSIONS)]
        workers += [asyncio.create_task(generator(e)) for e in engines.values()]
        await asyncio.sleep(SOAK_S)
        stop.set()
        # Everything stops on its own: nothing deadlocked.
        await asyncio.gather(*workers)
        last_step = await build_task
        await probing

        # A final quiet session brings both engines to the newest step, bit for bit.
        report = await run_session(cache, SyncPlan(targets, transport="shm"), fleet(), transports)
    assert report.step == last_step == cache.ready_step
    async with cache.read() as snap:
        want = {n: tensor_digest(t) for n, t in snap.named_tensors()}
        largest_bucket, num_buckets = max(b.nbytes for b in snap.buckets), len(snap.buckets)
    for engine in engines.values():
        version, have = await engine.state_digests()
        assert version == last_step and have == want

    baseline, last, growth = probe.growth()
    stats = cache.stats()
    print(
        f"\nin-process soak {SOAK_S:.0f}s: {last_step + 1} builds, {tally.reads} reads of "
        f"{len(tally.steps_read)} steps, sessions {dict(tally.sessions)}, "
        f"{tally.generations} generations; anon RSS {baseline / MIB:.1f} -> {last / MIB:.1f} MiB "
        f"(growth {growth / MIB:+.1f} MiB, bound {RSS_BOUND / MIB:.0f} MiB)"
    )
    assert tally.torn == []
    assert tally.errors == []
    assert set(tally.sessions) <= {"committed", "refused: stale"}, tally.sessions
    # Work really happened, concurrently.
    assert last_step >= 5 and tally.reads >= 500 and len(tally.steps_read) >= 3
    assert tally.sessions["committed"] >= 3 and tally.generations >= 4
    # Every session accounted for: each ended committed or refused (counted above, and
    # every task returned); each engine committed every committed session (plus the
    # final one, unless it already served that step: outcome "current"), and at most
    # the refused ones besides: a session refused by one engine may have committed on
    # the other first. None is left open.
    refused = tally.sessions["refused: stale"]
    for name, engine in engines.items():
        stats_e = await engine.receiver_stats()
        assert stats_e.open_sessions == ()
        ours = tally.committed[name] + (report.engines[name].outcome == "committed")
        assert ours <= stats_e.commits <= ours + refused, (name, report.engines[name])
    # Memory: nothing pinned, the cache back to ready + at most one snapshot of pool,
    # no bucket file left, process memory flat.
    assert stats.pins == {} and stats.building_step is None
    # (A bucket may sit in a larger pooled buffer than it needs: the bound is in buffers.)
    ready_capacity = stats.resident_bytes - stats.pooled_bytes
    assert ready_capacity <= num_buckets * largest_bucket
    assert stats.pooled_bytes <= ready_capacity
    assert shm_files() == []
    assert growth < RSS_BOUND, f"anonymous RSS grew {growth / MIB:.1f} MiB"


def _refusal(exc: SessionError) -> str:
    """How a session failed: "refused: stale" is the one expected way under concurrency."""
    text = str(exc)
    if "StaleStepError" in text and any(
        f" in {what}" in text for what in ("begin:", "commit:", "receive of bucket")
    ):
        return "refused: stale"
    return f"unexpected: {text}"


def _fill_source(source: list[tuple[str, torch.Tensor]], step: int) -> list[int]:
    """Set the weights of ``step``; return the checksums their buckets must have."""
    with torch.no_grad():
        for i, (_, t) in enumerate(source):
            t.fill_(step + i / 1000)
    return [b.checksum for b in pack(source, BUCKET_BYTES)]


def _torn(snap: Snapshot, want: list[int]) -> str:
    """'' if ``snap`` is bit for bit the snapshot of its step, else what differs."""
    have = [checksum(b.buffer) for b in snap.buckets]
    if have != want:
        return f"bucket checksums {have} != {want}"
    named = list(snap.named_tensors())
    for i in (0, len(named) - 1):  # and the values say which step it is
        name, t = named[i]
        if float(t.reshape(-1)[-1]) != fill_value(snap.step, i):
            return f"{name} holds {float(t.reshape(-1)[-1])}"
    return ""


async def cache_ready(cache: BucketCache) -> None:
    # min_step=-1: wait for the first publish (the builder task may not have
    # claimed the build slot yet, and read() of the newest would refuse at once).
    async with cache.read(min_step=-1, timeout=30):
        pass


# ===================================================================== on Ray


@dataclass
class RayRig:
    trainer: Any
    engines: dict[str, Any]
    pid: int


@pytest.fixture(scope="module")
async def ray_rig(ray_local: Any) -> AsyncIterator[RayRig]:
    trainer = trainer_class().remote()
    engines = {
        f"e{i}": engine_class().remote("llama", TINY_LLAMA, seed=i, num_threads=1) for i in range(2)
    }
    async with asyncio.timeout(120):
        pid, *_ = await asyncio.gather(
            trainer.pid.remote(), *(e.ping.remote() for e in engines.values())
        )
    yield RayRig(trainer, engines, pid)
    await trainer.close.remote()
    for handle in [trainer, *engines.values()]:
        ray.kill(handle, no_restart=True)


async def test_soak_on_ray_sessions_and_builds(ray_rig: RayRig) -> None:
    trainer, engines = ray_rig.trainer, ray_rig.engines
    stop = asyncio.Event()
    probe = RssProbe(ray_rig.pid)
    outcomes: Counter[str] = Counter()
    committed: Counter[str] = Counter()
    reports: list[SyncReport] = []
    digests: dict[int, dict[str, int]] = {}
    torn: list[str] = []

    async def builder() -> int:
        step = -1
        while not stop.is_set():
            step += 1
            await trainer.publish.remote(step)
        return step

    async def session_loop(transport: str) -> None:
        while not stop.is_set():
            try:
                report = await trainer.run_sync_session.remote(
                    # Deltas over the object store (one node: "auto" would send none):
                    # sessions at once also race a delta's commit against a full one
                    # of the same step.
                    SyncPlan(
                        engines,
                        transport=transport,
                        timeout_s=60,
                        delta="always" if transport == "object_store" else "never",
                    )
                )
            except SessionError as exc:
                outcomes[_refusal(exc)] += 1
            else:
                outcomes["committed"] += 1
                reports.append(report)
                for name, target in report.engines.items():
                    committed[name] += target.outcome == "committed"

    async def reader() -> None:
        while not stop.is_set():
            step, by_name = await trainer.ready_snapshot_digests.remote()
            seen = digests.setdefault(step, by_name)
            if seen != by_name:
                torn.append(f"two reads of step {step} differ")

    async def engine_watch(name: str, engine: Any) -> None:
        # What an engine serves is always one whole step: its digests equal the
        # snapshot digests of the version it reports (when a reader saw that step).
        while not stop.is_set():
            version, have = await engine.state_digests.remote()
            want = digests.get(version) if version is not None else None
            if want is not None and want != have:
                torn.append(f"{name} serves a mix under version {version}")
            await asyncio.sleep(0.05)

    async with asyncio.timeout(SOAK_S + 120):
        await trainer.publish.remote(-1)
        probing = asyncio.create_task(probe.run(stop))
        build_task = asyncio.create_task(builder())
        workers = [asyncio.create_task(session_loop(t)) for t in ("object_store", "shm") * 4]
        workers += [asyncio.create_task(reader()) for _ in range(4)]
        workers += [asyncio.create_task(engine_watch(n, e)) for n, e in engines.items()]
        await asyncio.sleep(SOAK_S)
        stop.set()
        await asyncio.gather(*workers)
        last_step = await build_task
        await probing
        final = await trainer.run_sync_session.remote(SyncPlan(engines))

    assert final.step == last_step
    ready, want = await trainer.ready_snapshot_digests.remote()
    for engine in engines.values():
        assert await engine.state_digests.remote() == (ready, want)
    baseline, last, growth = probe.growth()
    stats = await trainer.cache_stats.remote()
    print(
        f"\nRay soak {SOAK_S:.0f}s: {last_step + 2} builds, sessions {dict(outcomes)}; "
        "trainer anon RSS "
        f"{baseline / MIB:.1f} -> {last / MIB:.1f} MiB (growth {growth / MIB:+.1f} MiB, bound "
        f"{RSS_BOUND / MIB:.0f} MiB)"
    )
    assert torn == []
    assert outcomes["committed"] >= 5 and last_step >= 5
    assert set(outcomes) <= {"committed", "refused: stale"}, outcomes
    refused = outcomes["refused: stale"]
    for name, engine in engines.items():
        receiver = await engine.receiver_stats.remote()
        assert receiver.open_sessions == ()
        # Committed sessions (+ the final one, unless the engine already served its
        # step: outcome "current"), and at most the refused ones besides.
        ours = committed[name] + (final.engines[name].outcome == "committed")
        assert ours <= receiver.commits <= ours + refused, (name, final.engines[name])
        assert await engine.running_receives.remote() == 0
    assert stats.pins == {} and stats.building_step is None
    ready_capacity = stats.resident_bytes - stats.pooled_bytes
    assert ready_capacity <= final.num_buckets * (64 << 10)  # StepTrainer's bucket_bytes
    assert stats.pooled_bytes <= ready_capacity
    assert shm_files() == []
    await assert_no_stale_mappings(ray_rig.engines)
    assert growth < RSS_BOUND, f"the train actor's anonymous RSS grew {growth / MIB:.1f} MiB"
