"""Bad input: a typed error that names the offending item, no state changed, next call works.

Every row of ``docs/failure-semantics.md``'s bad-input table is a case here. Each
case checks four things: the error is the documented type from
:mod:`asyncsync.errors` (so also an :class:`~asyncsync.AsyncSyncError`), its message
names the offending item, the state afterwards equals the state before (ready step,
pins, the build slot, an engine's served version and weights bit for bit, its open
sessions), and the next valid call succeeds.

Everything runs in-process on the test's loop: a :class:`~asyncsync.BucketCache`
and a real :class:`~asyncsync.engines.HFEngine` called directly.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import pathlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from _actors import TINY_LLAMA

import asyncsync.transport
from asyncsync import (
    AsyncSyncError,
    Bucket,
    BucketCache,
    BucketError,
    BucketManifest,
    CacheError,
    ChecksumMismatchError,
    ConfigError,
    InvalidStepError,
    ProtocolError,
    ReadTimeoutError,
    ResidentLimitError,
    StaleStepError,
    pack,
)
from asyncsync.engines import HFEngine
from asyncsync.fleet import EngineFleet, Health
from asyncsync.plan import SyncPlan
from asyncsync.transport import backend

pytestmark = pytest.mark.timeout(120)

KIB = 1024
BUCKET_BYTES = 64 * KIB


@contextmanager
def raises_typed(kind: type[AsyncSyncError], *names: str) -> Iterator[None]:
    """``pytest.raises(kind)`` whose message must contain each of ``names`` verbatim."""
    with pytest.raises(kind) as info:
        yield
    assert isinstance(info.value, AsyncSyncError), type(info.value).__mro__
    for name in names:
        assert name in str(info.value), f"{name!r} is not named in: {info.value}"


# ===================================================================== bucket and cache


def weights(step: int, n: int = 6, numel: int = 1024) -> list[tuple[str, torch.Tensor]]:
    return [(f"layer{i}.w", torch.full((numel,), float(step * 100 + i))) for i in range(n)]


async def publish(cache: BucketCache, step: int, **kw: int) -> None:
    async with cache.build(step) as build:
        await build.add(weights(step, **kw))


async def snapshot_state(cache: BucketCache) -> tuple[Any, ...]:
    """What bad input must not change: ready step, build slot, pins, the ready bytes."""
    stats = cache.stats()
    async with cache.read(timeout=5) as snap:
        content = [(n, t.clone()) for n, t in snap.named_tensors()]
    return stats.ready_step, stats.building_step, stats.pins, content


async def assert_cache_unchanged_and_usable(cache: BucketCache, before: tuple[Any, ...]) -> None:
    after = await snapshot_state(cache)
    assert after[:3] == before[:3]
    assert [n for n, _ in after[3]] == [n for n, _ in before[3]]
    assert all(a.equal(b) for (_, a), (_, b) in zip(after[3], before[3], strict=True))
    stats = cache.stats()
    # Nothing leaked: what is not the ready snapshot is pooled, at most one snapshot's worth.
    ready_bytes = sum(t.nbytes for _, t in before[3])
    assert stats.resident_bytes - stats.pooled_bytes == ready_bytes
    assert stats.pooled_bytes <= ready_bytes
    # The next valid call succeeds.
    step = before[0] + 1
    await publish(cache, step)
    async with cache.read(min_step=step, timeout=5) as snap:
        assert snap.step == step
        for i, (_, t) in enumerate(snap.named_tensors()):
            assert bool((t == float(step * 100 + i)).all())


def sparse() -> torch.Tensor:
    return torch.eye(4).to_sparse()


# (case id, items given to build.add, expected type, words the message must contain)
ADD_CASES: list[tuple[str, Callable[[], list[Any]], type[AsyncSyncError], tuple[str, ...]]] = [
    (
        "non-tensor",
        lambda: [("ok", torch.ones(4)), ("bias", [1.0, 2.0])],
        BucketError,
        ("'bias'", "list"),
    ),
    ("numpy-array", lambda: [("arr", np.ones(4))], BucketError, ("'arr'", "ndarray")),
    (
        "sparse",
        lambda: [("ok", torch.ones(4)), ("emb", sparse())],
        BucketError,
        ("'emb'", "sparse"),
    ),
    ("meta", lambda: [("lazy", torch.empty(4, device="meta"))], BucketError, ("'lazy'", "meta")),
    (
        "duplicate-name",
        lambda: [("w", torch.ones(4)), ("v", torch.ones(4)), ("w", torch.ones(2))],
        BucketError,
        ("'w'", "duplicate"),
    ),
    ("empty-name", lambda: [("", torch.ones(3, 2))], BucketError, ("''", "float32[3, 2]")),
    ("non-string-name", lambda: [(7, torch.ones(4))], BucketError, ("got 7",)),
    ("not-a-pair", lambda: [torch.ones(4)], BucketError, ("pairs", "Tensor")),
]


@pytest.mark.parametrize(
    ("items", "kind", "names"), [c[1:] for c in ADD_CASES], ids=[c[0] for c in ADD_CASES]
)
async def test_bad_tensors_in_a_build(
    items: Callable[[], list[Any]], kind: type[AsyncSyncError], names: tuple[str, ...]
) -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    before = await snapshot_state(cache)
    with raises_typed(kind, *names):
        async with cache.build(1) as build:
            # A first group that packs fine, so the bad item is met mid-build.
            await build.add(weights(1)[:2])
            await build.add(items())
    assert cache.stats().discards == 1
    await assert_cache_unchanged_and_usable(cache, before)
    # pack() refuses the same items with the same error.
    with raises_typed(kind, *names):
        pack(items(), BUCKET_BYTES)


async def test_publishing_a_build_whose_add_failed_is_refused() -> None:
    """Catching an add()'s error inside the block does not make a partial snapshot publishable."""
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    before = await snapshot_state(cache)
    with raises_typed(CacheError, "step 1", "an add() of it failed", "'bias'"):
        async with cache.build(1) as build:
            await build.add(weights(1)[:3])
            with raises_typed(BucketError, "'bias'"):
                await build.add([("bias", "not a tensor")])
            # ...and the block is left normally, as if nothing happened.
    assert cache.stats().discards == 1
    await assert_cache_unchanged_and_usable(cache, before)


STEP_CASES: list[tuple[str, Any, type[AsyncSyncError], tuple[str, ...]]] = [
    ("equal-to-ready", 3, StaleStepError, ("step 3", "ready step 3")),
    ("older-than-ready", 1, StaleStepError, ("step 1", "ready step 3")),
    ("base-after-steps", -1, StaleStepError, ("step -1", "ready step 3")),
    ("negative", -2, InvalidStepError, ("step -2",)),
    ("float", 4.0, InvalidStepError, ("4.0",)),
    ("string", "4", InvalidStepError, ("'4'",)),
    ("bool", True, InvalidStepError, ("True",)),
]


@pytest.mark.parametrize(
    ("step", "kind", "names"), [c[1:] for c in STEP_CASES], ids=[c[0] for c in STEP_CASES]
)
async def test_bad_build_steps(
    step: Any, kind: type[AsyncSyncError], names: tuple[str, ...]
) -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 3)
    before = await snapshot_state(cache)
    with raises_typed(kind, *names):
        async with cache.build(step) as build:
            await build.add(weights(5))
    assert cache.stats().discards == 0  # refused before the slot was claimed
    await assert_cache_unchanged_and_usable(cache, before)


async def test_step_older_than_the_build_in_flight() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 0)
    async with cache.build(5) as build:
        with raises_typed(StaleStepError, "step 4", "build in flight (step 5)"):
            async with cache.build(4):
                pass
        # The refused build did not disturb the one in flight.
        await build.add(weights(5))
    assert cache.ready_step == 5
    await assert_cache_unchanged_and_usable(cache, await snapshot_state(cache))


async def test_read_of_a_step_that_never_becomes_ready() -> None:
    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 2)
    before = await snapshot_state(cache)
    with raises_typed(ReadTimeoutError, "step >= 99", "ready step: 2"):
        async with cache.read(min_step=99, timeout=0.05):
            pass
    with raises_typed(InvalidStepError, "step -3"):
        async with cache.read(min_step=-3):
            pass
    await assert_cache_unchanged_and_usable(cache, before)


async def test_session_asking_for_a_step_that_never_becomes_ready() -> None:
    from asyncsync.session import run_session

    cache = BucketCache(bucket_bytes=8 * KIB)
    await publish(cache, 2)
    before = await snapshot_state(cache)
    plan = SyncPlan({"e": object()}, min_step=50, pin_timeout_s=0.05)
    assert plan.engines is not None
    fleet = EngineFleet(plan.engines, initial=Health.SERVING)
    with raises_typed(ReadTimeoutError, "step >= 50", "ready step: 2"):
        await run_session(cache, plan, fleet, lambda name: backend(name).make())
    await assert_cache_unchanged_and_usable(cache, before)


async def test_resident_limit_smaller_than_one_model() -> None:
    model = 6 * 4 * KIB
    cache = BucketCache(bucket_bytes=8 * KIB, max_resident_bytes=model // 2)
    with raises_typed(ResidentLimitError, "step 0", f"max_resident_bytes={model // 2}"):
        await publish(cache, 0)
    stats = cache.stats()
    assert (stats.ready_step, stats.building_step, stats.resident_bytes) == (None, None, 0)
    # The next valid call (a model that fits) succeeds.
    await publish(cache, 0, n=2)
    async with cache.read(timeout=5) as snap:
        assert (snap.step, len(list(snap.named_tensors()))) == (0, 2)
    # And once a snapshot is ready, a model that cannot fit beside it fails at once.
    with raises_typed(ResidentLimitError, "step 1", "nothing else can be freed"):
        await publish(cache, 1)
    assert cache.ready_step == 0
    assert cache.stats().resident_bytes == 2 * 4 * KIB


CONFIG_CASES: list[tuple[str, Callable[[], object], tuple[str, ...]]] = [
    ("bucket-bytes-zero", lambda: BucketCache(bucket_bytes=0), ("bucket_bytes", "0")),
    ("max-resident-zero", lambda: BucketCache(max_resident_bytes=0), ("max_resident_bytes", "0")),
    ("max-resident-negative", lambda: BucketCache(max_resident_bytes=-5), ("-5",)),
    ("plan-no-engines", lambda: SyncPlan({}), ("engines",)),
    (
        "plan-inflight-zero",
        lambda: SyncPlan({"e": 1}, max_inflight_buckets=0),
        ("max_inflight_buckets",),
    ),
    ("plan-timeout-zero", lambda: SyncPlan({"e": 1}, timeout_s=0), ("timeout_s",)),
    ("unknown-transport", lambda: backend("carrier-pigeon"), ("'carrier-pigeon'",)),
    (
        "plan-unknown-transport",
        lambda: SyncPlan(transport="carrier-pigeon"),
        ("'carrier-pigeon'", "object_store"),
    ),
    ("plan-unknown-policy", lambda: SyncPlan(policy="quorum"), ("policy", "'quorum'")),
    ("plan-min-engines-zero", lambda: SyncPlan(min_engines=0), ("min_engines", "0")),
    ("plan-min-engines-fraction", lambda: SyncPlan(min_engines=1.5), ("min_engines", "1.5")),
    ("plan-max-updating-zero", lambda: SyncPlan(max_updating=0), ("max_updating", "0")),
    (
        "plan-cross-node-shm",
        lambda: SyncPlan(cross_node="shm"),
        ("cross_node", "'shm'", "object_store"),
    ),
    ("plan-engines-not-mapping", lambda: SyncPlan(["e0"]), ("engines", "['e0']")),
]


@pytest.mark.parametrize(
    ("make", "names"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_bad_options(make: Callable[[], object], names: tuple[str, ...]) -> None:
    with raises_typed(ConfigError, *names):
        make()
    assert issubclass(ConfigError, ValueError)


# ===================================================================== engine side


@pytest.fixture(scope="module")
def engine() -> HFEngine:
    # num_threads=None: leave this test process's torch thread count alone.
    return HFEngine("llama", TINY_LLAMA, seed=1)


class Sender:
    """Builds what a train actor would send the engine: step-encoded weights in buckets."""

    def __init__(self, engine: HFEngine) -> None:
        self.shapes = [(n, t.dtype, t.shape) for n, t in engine.model.state_dict().items()]
        self.version = 0

    def buckets(self, version: int) -> list[Bucket]:
        named = [
            (name, torch.full(shape, version + i / 1000, dtype=dtype))
            for i, (name, dtype, shape) in enumerate(self.shapes)
        ]
        return pack(named, BUCKET_BYTES)

    def next_version(self) -> int:
        self.version += 1
        return self.version


@pytest.fixture(scope="module")
def sender(engine: HFEngine) -> Sender:
    return Sender(engine)


def sid() -> str:
    return uuid.uuid4().hex


def manifest(buckets: list[Bucket]) -> list[BucketManifest]:
    return [b.manifest for b in buckets]


async def engine_state(engine: HFEngine) -> tuple[Any, ...]:
    stats = await engine.receiver_stats()
    return stats.version, stats.open_sessions, await engine.state_digests()


async def deliver(
    engine: HFEngine, version: int, buckets: list[Bucket], session: str | None = None
) -> str:
    session = session or sid()
    await engine.begin(session, version, manifest(buckets))
    for i, bucket in enumerate(buckets):
        await engine.receive(session, i, bucket)
    assert await engine.commit(session) == version
    return session


async def assert_engine_unchanged_and_usable(
    engine: HFEngine, sender: Sender, before: tuple[Any, ...]
) -> None:
    assert await engine_state(engine) == before
    version = sender.next_version()
    buckets = sender.buckets(version)
    await deliver(engine, version, buckets)
    served, digests = await engine.state_digests()
    assert served == version
    want = {n: d for b in buckets for n, d in _digests(b).items()}
    assert digests == want
    assert (await engine.generate([[1, 2, 3]], max_new_tokens=2)).version == version


def _digests(bucket: Bucket) -> dict[str, int]:
    from asyncsync.buckets import tensor_digest

    return {n: tensor_digest(t) for n, t in bucket.named_tensors()}


def renamed(bucket: Bucket, position: int, name: str) -> Bucket:
    index = list(bucket.index)
    index[position] = dataclasses.replace(index[position], name=name)
    return Bucket(bucket.buffer, tuple(index), bucket.checksum)


def retyped_meta(bucket: Bucket, position: int, **changes: Any) -> Bucket:
    """The same payload and checksum under an index whose entry ``position`` is changed."""
    index = list(bucket.index)
    index[position] = dataclasses.replace(index[position], **changes)
    return Bucket(bucket.buffer, tuple(index), bucket.checksum)


def with_bucket(buckets: list[Bucket], i: int, bucket: Bucket) -> list[Bucket]:
    return [*buckets[:i], bucket, *buckets[i + 1 :]]


Q = "model.layers.0.self_attn.q_proj.weight"


def begin_cases(sender: Sender) -> Iterator[tuple[str, list[Bucket], tuple[str, ...]]]:
    """(case id, buckets whose manifest ``begin`` must refuse, words of the message)."""
    good = sender.buckets(sender.version + 1)
    first = good[0].index[0].name
    # Manifest vs. the model: name, dtype, shape, coverage.
    yield (
        "unknown-name",
        with_bucket(good, 0, renamed(good[0], 0, "model.embed_tokenz.weight")),
        ("'model.embed_tokenz.weight'", "not a parameter"),
    )
    named = [(n, t.clone()) for b in good for n, t in b.named_tensors()]
    half = [(n, t.half() if n == Q else t) for n, t in named]
    yield "dtype", pack(half, BUCKET_BYTES), (f"'{Q}'", "float16", "float32")
    flat = [(n, t.reshape(-1) if n == Q else t) for n, t in named]
    yield "shape", pack(flat, BUCKET_BYTES), (f"'{Q}'", "[4096]", "[64, 64]")
    yield (
        "partial-update",
        pack([(n, t) for n, t in named if n != Q], BUCKET_BYTES),
        ("1 of 21 parameters", Q),
    )
    yield "name-twice", [*good, pack([named[0]], BUCKET_BYTES)[0]], (f"'{first}'", "twice")
    # Malformed indexes that still match their own checksum: they would only fail
    # when viewed back out, in the middle of writing the model.
    # A later bucket holding several tensors: the ones before it would be written first.
    last = max(i for i, b in enumerate(good) if len(b.index) >= 2)
    assert last > 0
    meta = good[last].index[-1]
    yield (
        "nbytes-vs-shape",
        with_bucket(good, last, retyped_meta(good[last], -1, nbytes=meta.nbytes - 4)),
        (f"'{meta.name}'", "nbytes"),
    )
    yield (
        "past-the-end",
        with_bucket(good, last, retyped_meta(good[last], -1, offset=meta.offset + 4096)),
        (f"'{meta.name}'", "past the bucket"),
    )
    prev = good[last].index[-2]
    yield (
        "overlap",
        with_bucket(good, last, retyped_meta(good[last], -1, offset=prev.offset)),
        (f"'{meta.name}'", "overlaps"),
    )
    yield (
        "unknown-dtype",
        with_bucket(good, last, retyped_meta(good[last], -1, dtype="float99")),
        (f"'{meta.name}'", "'float99'"),
    )


BEGIN_CASES = [
    "unknown-name",
    "dtype",
    "shape",
    "partial-update",
    "name-twice",
    "nbytes-vs-shape",
    "past-the-end",
    "overlap",
    "unknown-dtype",
]


@pytest.mark.parametrize("case", BEGIN_CASES)
async def test_begin_refuses_a_bad_manifest(engine: HFEngine, sender: Sender, case: str) -> None:
    buckets, names = {cid: (b, n) for cid, b, n in begin_cases(sender)}[case]
    before = await engine_state(engine)
    session = sid()
    with raises_typed(ProtocolError, *names):
        await engine.begin(session, sender.version + 1, manifest(buckets))
    # Nothing opened, nothing written, and the id was not used up.
    assert await engine_state(engine) == before
    version = sender.next_version()
    await deliver(engine, version, sender.buckets(version), session=session)
    assert (await engine.receiver_stats()).version == version


def receive_cases(
    good: list[Bucket],
) -> list[tuple[str, int, Any, type[AsyncSyncError], tuple[str, ...]]]:
    """(case id, index, payload, error, words) for a ``receive`` into an open session."""
    b0, b1 = good[0], good[1]
    corrupt = b1.buffer.copy()
    corrupt[len(corrupt) // 2] ^= 0xFF
    return [
        (
            "checksum",
            1,
            Bucket(corrupt, b1.index, b1.checksum),
            ChecksumMismatchError,
            (f"'{b1.index[0].name}'", "checksum"),
        ),
        (
            "wrong-bucket",
            0,
            b1,
            ProtocolError,
            (f"'{b1.index[0].name}'", f"'{b0.index[0].name}'"),
        ),
        (
            "size",
            0,
            Bucket(b0.buffer[:-64], b0.index, b0.checksum),
            ProtocolError,
            (f"'{b0.index[0].name}'", "size"),
        ),
        ("renamed-tensor", 0, renamed(b0, 0, "model.x"), ProtocolError, ("'model.x'",)),
        (
            "dtype-in-index",
            0,
            retyped_meta(b0, 0, dtype="int32"),
            ProtocolError,
            (f"'{b0.index[0].name}'", "dtype"),
        ),
        (
            "not-uint8",
            0,
            Bucket(b0.buffer.view(np.float32), b0.index, b0.checksum),
            ProtocolError,
            (f"'{b0.index[0].name}'", "uint8"),
        ),
        (
            "index-out-of-range",
            len(good),
            b0,
            ProtocolError,
            (f"bucket index {len(good)}",),
        ),
    ]


RECEIVE_CASES = [
    "checksum",
    "wrong-bucket",
    "size",
    "renamed-tensor",
    "dtype-in-index",
    "not-uint8",
    "index-out-of-range",
]


@pytest.mark.parametrize("case_id", RECEIVE_CASES)
async def test_receive_refuses_a_bad_bucket_and_the_model_stays_bit_identical(
    engine: HFEngine, sender: Sender, case_id: str
) -> None:
    version = sender.next_version()
    good = sender.buckets(version)
    index, payload, kind, names = {c[0]: c[1:] for c in receive_cases(good)}[case_id]
    session = sid()
    await engine.begin(session, version, manifest(good))
    before = await engine_state(engine)
    rejected = (await engine.receiver_stats()).rejected_buckets
    with raises_typed(kind, *names):
        await engine.receive(session, index, payload)
    assert await engine_state(engine) == before, case_id
    assert (await engine.receiver_stats()).rejected_buckets == rejected + 1
    # The refused bucket was not staged: the session cannot commit without it...
    with raises_typed(ProtocolError, session):
        await engine.commit(session)
    assert await engine_state(engine) == before, "the weights changed without a commit"
    # ...and the same session still takes the good buckets and commits them.
    for i, bucket in enumerate(good):
        await engine.receive(session, i, bucket)
    assert await engine.commit(session) == version
    await assert_engine_unchanged_and_usable(engine, sender, await engine_state(engine))


async def test_corrupted_bucket_leaves_the_model_bit_identical(
    engine: HFEngine, sender: Sender
) -> None:
    """Every bucket but one arrives fine; the corrupt one is refused; nothing reaches the model."""
    version = sender.next_version()
    good = sender.buckets(version)
    before = await engine_state(engine)
    session = sid()
    await engine.begin(session, version, manifest(good))
    bad = len(good) - 2
    for i, bucket in enumerate(good):
        if i == bad:
            corrupt = bucket.buffer.copy()
            corrupt[-1] ^= 0x01  # one bit
            with raises_typed(ChecksumMismatchError, f"'{bucket.index[0].name}'"):
                await engine.receive(session, i, Bucket(corrupt, bucket.index, bucket.checksum))
        else:
            await engine.receive(session, i, bucket)
    with raises_typed(ProtocolError, f"[{bad}]"):
        await engine.commit(session)
    await engine.abort(session)
    assert await engine_state(engine) == before
    await assert_engine_unchanged_and_usable(engine, sender, before)


async def test_unknown_session(engine: HFEngine, sender: Sender) -> None:
    before = await engine_state(engine)
    bucket = sender.buckets(0)[0]
    with raises_typed(ProtocolError, "'no-such-session'"):
        await engine.receive("no-such-session", 0, bucket)
    with pytest.raises(ProtocolError) as info:
        await engine.commit("no-such-session")
    assert str(info.value).startswith("no open session 'no-such-session'")  # not re-quoted
    await engine.abort("no-such-session")  # abort is idempotent, unknown ids are ignored
    await assert_engine_unchanged_and_usable(engine, sender, before)


async def test_commit_before_all_buckets(engine: HFEngine, sender: Sender) -> None:
    version = sender.next_version()
    good = sender.buckets(version)
    session = sid()
    await engine.begin(session, version, manifest(good))
    await engine.receive(session, 0, good[0])
    before = await engine_state(engine)
    with raises_typed(ProtocolError, f"'{session}'", f"1/{len(good)} received"):
        await engine.commit(session)
    assert await engine_state(engine) == before  # still open, nothing applied
    with raises_typed(ProtocolError, "bucket 0 received twice"):
        await engine.receive(session, 0, good[0])
    for i in range(1, len(good)):
        await engine.receive(session, i, good[i])
    assert await engine.commit(session) == version
    await assert_engine_unchanged_and_usable(engine, sender, await engine_state(engine))


async def test_session_id_reused(engine: HFEngine, sender: Sender) -> None:
    version = sender.next_version()
    used = await deliver(engine, version, sender.buckets(version))
    before = await engine_state(engine)
    with raises_typed(ProtocolError, f"'{used}'"):
        await engine.begin(used, version + 1, manifest(sender.buckets(version + 1)))
    await assert_engine_unchanged_and_usable(engine, sender, before)


async def test_stale_version_at_begin(engine: HFEngine, sender: Sender) -> None:
    version = sender.next_version()
    await deliver(engine, version, sender.buckets(version))
    before = await engine_state(engine)
    session = sid()
    with raises_typed(
        StaleStepError, f"'{session}'", f"step {version - 1}", f"committed version {version}"
    ):
        await engine.begin(session, version - 1, manifest(sender.buckets(version - 1)))
    await assert_engine_unchanged_and_usable(engine, sender, before)


async def test_stale_version_at_commit_never_goes_back(engine: HFEngine, sender: Sender) -> None:
    """Two sessions open at once: the newer commits first; the older one is refused."""
    older, newer = sender.next_version(), sender.next_version()
    a, b = sid(), sid()
    old_buckets, new_buckets = sender.buckets(older), sender.buckets(newer)
    await engine.begin(a, older, manifest(old_buckets))
    await engine.begin(b, newer, manifest(new_buckets))
    for i in range(len(old_buckets)):
        await asyncio.gather(
            engine.receive(a, i, old_buckets[i]), engine.receive(b, i, new_buckets[i])
        )
    assert await engine.commit(b) == newer
    _, _, digests = await engine_state(engine)
    with raises_typed(StaleStepError, f"'{a}'", f"step {older}", f"version {newer}"):
        await engine.commit(a)
    # Still the newer version, bit for bit; the stale session was dropped.
    after = (newer, (), digests)
    assert await engine_state(engine) == after
    await assert_engine_unchanged_and_usable(engine, sender, after)


async def test_concurrent_commits_apply_in_version_order(engine: HFEngine, sender: Sender) -> None:
    """Commits racing each other: whatever the order, the served version only moves forward."""
    versions = [sender.next_version() for _ in range(4)]
    sessions = {v: sid() for v in versions}
    buckets = {v: sender.buckets(v) for v in versions}
    for v in versions:
        await engine.begin(sessions[v], v, manifest(buckets[v]))
        for i, bucket in enumerate(buckets[v]):
            await engine.receive(sessions[v], i, bucket)
    # Start the commits newest first: each older one must be refused, never applied.
    results = await asyncio.gather(
        *(engine.commit(sessions[v]) for v in reversed(versions)), return_exceptions=True
    )
    assert results[0] == versions[-1]
    assert all(isinstance(r, StaleStepError) for r in results[1:]), results
    served, digests = await engine.state_digests()
    assert served == versions[-1]
    assert digests == {n: d for b in buckets[versions[-1]] for n, d in _digests(b).items()}
    assert (await engine.receiver_stats()).open_sessions == ()


# ===================================================================== security, static


def test_no_transport_unpickles() -> None:
    """No transport module imports pickle or calls something that unpickles.

    (``torch.load``, ``np.load``, or the ``torch.distributed`` object collectives,
    which pickle their payload.) Buckets travel as raw buffers plus a JSON index.
    """
    unsafe_modules = {"pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
    unsafe_calls = {"load", "loads"}
    object_collectives = {
        "broadcast_object_list",
        "all_gather_object",
        "gather_object",
        "scatter_object_list",
        "send_object_list",
        "recv_object_list",
    }
    package = pathlib.Path(asyncsync.transport.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert len(files) >= 3
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mods = {(node.module or "").split(".")[0]}
            else:
                mods = set()
            assert not mods & unsafe_modules, (
                f"{path.name}:{node.lineno} imports {mods & unsafe_modules}"
            )
            if isinstance(node, ast.Attribute | ast.Name):
                called = node.attr if isinstance(node, ast.Attribute) else node.id
                assert called not in object_collectives, f"{path.name}:{node.lineno} uses {called}"
            if isinstance(node, ast.Attribute) and node.attr in unsafe_calls:
                owner = node.value.id if isinstance(node.value, ast.Name) else ""
                # torch.load and np.load can unpickle; json.loads cannot.
                assert owner not in {"torch", "np", "numpy"}, (
                    f"{path.name}:{node.lineno} calls {owner}.{node.attr}"
                )
