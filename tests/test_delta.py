"""Delta sync: the encoding, the base rule, and sessions that send deltas.

In-process (no Ray) for the encoding and the engine's rules: real
:class:`~asyncsync.engines.TensorEngine` receivers behind a handle shim, real
caches, the shared-snapshot transport. On real Ray (light actors, see
_fleet_actors) for every transport and both policies.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
import torch
from _inprocess import Handle

from asyncsync import (
    BucketCache,
    ConfigError,
    DeltaBaseError,
    EngineFleet,
    Health,
    ProtocolError,
    SessionError,
    SyncPlan,
)
from asyncsync.buckets import Bucket, pack, tensor_digest
from asyncsync.delta import (
    CHUNK_WORDS,
    DeltaStore,
    PrivateBuffer,
    apply_delta_bucket,
    changed_words,
    encode_bucket,
)
from asyncsync.engines import TensorEngine
from asyncsync.engines.tensors import write_changed
from asyncsync.protocol import DeltaHeader
from asyncsync.receiver import current_node
from asyncsync.session import run_session
from asyncsync.sharedmem import SharedBuffer
from asyncsync.transport import backend

pytestmark = pytest.mark.timeout(120)

NUMEL = 1 << 15


def sparse_weights(step: int, every: int = 97) -> dict[str, torch.Tensor]:
    """bf16 weights of which about 1 element in ``every`` changes from one step to the next."""
    out = {}
    for i in range(4):
        t = torch.linspace(-1, 1, NUMEL).to(torch.bfloat16) + i
        if step >= 0:
            hit = (torch.arange(NUMEL) * 31 + i) % every < 1
            for s in range(step + 1):  # the changes of every step so far
                shifted = torch.roll(hit, s * 7)
                t = torch.where(shifted, t + 0.5 * (s + 1), t)
        out[f"w{i}"] = t
    return out


# ------------------------------------------------------------------ the encoding


def test_changed_words_finds_exactly_the_differing_words() -> None:
    rng = np.random.default_rng(0)
    for n in (64, 4096 + 64, 6):  # multiples of 8 bytes, and not
        base = rng.integers(0, 256, n, dtype=np.uint8)
        new = base.copy()
        words = new.view(np.uint16)
        flip = np.sort(rng.choice(words.size, size=max(1, words.size // 10), replace=False))
        words[flip] ^= 1
        assert changed_words(base, new).tolist() == flip.tolist()
    same = rng.integers(0, 256, 128, dtype=np.uint8)
    assert changed_words(same, same.copy()).size == 0


@pytest.mark.parametrize("share", [0.0, 0.01, 0.2, 0.9])
@pytest.mark.parametrize("numel", [NUMEL, NUMEL - 5])  # a bitmap's last byte half used
def test_a_bucket_delta_applied_on_its_base_is_the_new_bucket_bit_for_bit(
    share: float, numel: int
) -> None:
    rng = np.random.default_rng(1)
    old = torch.from_numpy(rng.standard_normal(numel).astype(np.float32)).to(torch.bfloat16)
    new = old.clone()
    hit = torch.from_numpy(rng.random(numel) < share)
    new[hit] = new[hit] * 1.01 + 0.001
    (base,) = pack([("w", old)], 1 << 20)
    (target,) = pack([("w", new)], 1 << 20)
    buffers: list[SharedBuffer] = []

    def allocate(n: int) -> SharedBuffer:
        buffers.append(SharedBuffer.allocate(n))
        return buffers[-1]

    kind, delta, changed, _ = encode_bucket(base.buffer, target, allocate)
    try:
        # The smallest encoding: indices below ~3% changed, a bitmap above, never
        # more than the bucket.
        allowed = {0.0: {"sparse"}, 0.01: {"sparse"}, 0.2: {"bitmap"}, 0.9: {"bitmap", "dense"}}
        assert kind in allowed[share], (share, kind)
        assert delta.nbytes <= target.nbytes * min(1.0, 1 / 16 + 1.2 * share + 0.01)
        delta.verify()
        patched = base.buffer.copy()
        apply_delta_bucket(patched, kind, delta)
        assert np.array_equal(patched, target.buffer)
        assert changed == int((old.view(torch.int16) != new.view(torch.int16)).sum())
    finally:
        for b in buffers:
            b.release()


def test_the_encoding_is_the_same_over_threads_and_updates_the_base_in_that_pass() -> None:
    rng = np.random.default_rng(2)
    words = CHUNK_WORDS * 3 + CHUNK_WORDS // 2 + 3  # chunks, a part chunk, an odd tail
    old = torch.from_numpy(rng.integers(-(2**15), 2**15, words, dtype=np.int16))
    new = old.clone()
    for share, lo, hi in ((0.005, 0, CHUNK_WORDS), (0.3, CHUNK_WORDS, 2 * CHUNK_WORDS)):
        hit = torch.from_numpy(rng.random(hi - lo) < share)
        new[lo:hi][hit] ^= 1
    new[-1] ^= 4  # the very last word
    (base,) = pack([("w", old)], 1 << 30)
    (target,) = pack([("w", new)], 1 << 30)
    results = []
    for threads in (1, 3):
        kept = base.buffer.copy()
        kind, delta, changed, _ = encode_bucket(
            kept, target, PrivateBuffer, update_base=True, threads=threads
        )
        assert np.array_equal(kept, target.buffer)  # the base became the target
        results.append((kind, delta.buffer.tobytes(), changed))
    assert results[0] == results[1]
    kind, _, changed = results[0]
    assert changed == int((old != new).sum())
    patched = base.buffer.copy()
    (_, delta, _, _) = encode_bucket(base.buffer.copy(), target, PrivateBuffer, threads=2)
    written = apply_delta_bucket(patched, kind, delta)
    assert np.array_equal(patched, target.buffer)
    assert written is not None
    assert written.tolist() == torch.nonzero(old != new).flatten().tolist()


def test_write_changed_writes_only_the_changed_words_or_a_faster_whole_copy() -> None:
    n = 4096
    base = {
        "sparse": torch.linspace(-1, 1, n).to(torch.bfloat16),  # 0.1% changed: words
        "dense": torch.linspace(-2, 2, n),  # fp32, half changed: whole copy
        "bytes": torch.arange(n, dtype=torch.int8),  # 1-byte dtype: whole copy
        "same": torch.ones(n, dtype=torch.bfloat16),  # unchanged: untouched
    }
    new = {k: v.clone() for k, v in base.items()}
    new["sparse"][:: n // 4] += 1  # 4 of 4096 elements
    new["dense"][::2] += 1
    new["bytes"][7] += 1
    (old_bucket,) = pack(list(base.items()), 1 << 20)
    (new_bucket,) = pack(list(new.items()), 1 << 20)
    kept = old_bucket.buffer.copy()
    kind, delta, _, _ = encode_bucket(old_bucket.buffer, new_bucket, PrivateBuffer)
    changes = apply_delta_bucket(kept, kind, delta)
    patched = Bucket(kept, new_bucket.index, new_bucket.checksum)
    params = {k: v.clone() for k, v in base.items()}
    # Sentinels in words no change lists: kept where single words are written,
    # overwritten where the tensor is copied whole.
    params["sparse"][1] = 7
    params["dense"][1] = 7
    params["same"][3] = 7
    write_changed(params, [patched], [changes], threads=2)
    assert params["sparse"][1] == 7  # words only
    assert params["same"][3] == 7  # not touched at all
    params["sparse"][1] = new["sparse"][1]
    params["same"][3] = new["same"][3]
    for name, want in new.items():
        assert tensor_digest(params[name]) == tensor_digest(want), name
    # None: the whole bucket, as copy_into.
    fresh = {k: v.clone() for k, v in base.items()}
    write_changed(fresh, [patched], [None])
    assert all(tensor_digest(fresh[k]) == tensor_digest(v) for k, v in new.items())
    with pytest.raises(ProtocolError, match="change lists"):
        write_changed(fresh, [patched], [])


async def test_a_tensor_engine_that_overrides_apply_gets_it_for_a_delta_too() -> None:
    class Counting(TensorEngine):
        applied = 0

        async def apply(self, buckets: Any, version: int) -> None:
            self.applied += 1
            await super().apply(buckets, version)

    weights = sparse_weights(0)
    (bucket,) = pack(list(sparse_weights(1).items()), 1 << 22)
    engine = Counting({k: v.clone() for k, v in weights.items()})
    plain = TensorEngine({k: v.clone() for k, v in weights.items()})
    for receiver in (engine, plain):
        await receiver.apply_changes([bucket], [None], 1)
    assert engine.applied == 1  # what the subclass adds in apply is never skipped
    for receiver in (engine, plain):
        assert all(
            tensor_digest(receiver.params[k]) == tensor_digest(v)
            for k, v in sparse_weights(1).items()
        )


# ------------------------------------------------------------------ in-process sessions


class Rig:
    """A cache, its delta store and a fleet of TensorEngines, in one process."""

    def __init__(self, names: list[str], engine: type[TensorEngine] = TensorEngine) -> None:
        self.cache = BucketCache(bucket_bytes=NUMEL)  # two tensors per bucket
        self.deltas = DeltaStore(self.cache)
        self.engines = {n: engine(sparse_weights(-1)) for n in names}
        self.fleet = EngineFleet(
            {n: Handle(e) for n, e in self.engines.items()}, initial=Health.SERVING
        )
        self.made: dict[str, Any] = {}

    async def publish(self, step: int) -> None:
        async with self.cache.build(step) as build:
            await build.add(list(sparse_weights(step).items()))
        self.deltas.published()

    async def sync(self, **plan: Any) -> Any:
        plan.setdefault("delta", "always")
        return await run_session(
            self.cache,
            SyncPlan(**plan),
            self.fleet,
            lambda name: self.made.setdefault(name, backend(name).make()),
            # The engines report this process's node (a Ray node id once an earlier
            # test started Ray here): the cache owner's, so they get the shared snapshot.
            owner_node=current_node(),
            deltas=self.deltas,
        )

    def exact(self, name: str, step: int) -> bool:
        want = sparse_weights(step)
        have = self.engines[name].params
        return all(tensor_digest(have[n]) == tensor_digest(t) for n, t in want.items())

    async def close(self) -> None:
        await self.deltas.close()
        await self.cache.close()


@pytest.fixture
async def rig() -> Any:
    made = Rig(["a", "b"])
    yield made
    await made.close()


async def test_engines_on_the_base_get_the_delta_and_end_bit_exact(rig: Rig) -> None:
    await rig.publish(0)
    first = await rig.sync()  # no delta yet: full, and the store starts keeping a base
    assert not any(r.delta for r in first.engines.values())
    # The first delta offered is refused: an engine keeps no base copy until a
    # session offers it a delta.
    await rig.publish(1)
    second = await rig.sync()
    assert not any(r.delta for r in second.engines.values())
    assert all(rig.engines[n]._base for n in ("a", "b"))  # kept from now on
    for step in (2, 3, 4):
        await rig.publish(step)
        report = await rig.sync()
        assert report.committed == ("a", "b"), report
        for name in ("a", "b"):
            engine = report.engines[name]
            assert engine.delta, (step, engine)
            assert 0 < engine.sent_bytes < report.nbytes / 10, (step, engine)
            assert rig.exact(name, step)
    assert rig.deltas.computed == 4


async def test_an_engine_off_the_base_gets_the_full_snapshot_in_the_same_session(
    rig: Rig,
) -> None:
    for step in (-1, 0, 1):
        await rig.publish(step)
        await rig.sync()
    await rig.publish(2)
    # "b" lost its kept copy (a restart would, too): it refuses the delta at begin.
    rig.engines["b"]._base_sums = ()
    report = await rig.sync()
    assert report.committed == ("a", "b")
    assert report.engines["a"].delta and not report.engines["b"].delta
    assert report.engines["b"].sent_bytes == report.nbytes
    assert rig.exact("a", 2) and rig.exact("b", 2)
    await rig.publish(3)
    report = await rig.sync()  # both on the base again
    assert report.engines["a"].delta and report.engines["b"].delta
    assert rig.exact("a", 3) and rig.exact("b", 3)


@pytest.mark.parametrize("policy", ["all_or_nothing", "per_engine"])
async def test_a_corrupted_base_is_caught_before_the_model_is_touched(
    rig: Rig, policy: str
) -> None:
    for step in (-1, 0, 1):
        await rig.publish(step)
        await rig.sync()
    await rig.publish(2)
    # The kept copy's bytes rot behind its checksums: the patched result cannot
    # hash to the target's checksums; the commit refuses before apply.
    rig.engines["b"]._base[0][:64] ^= 0xFF
    # The commit phase (all_or_nothing included) quarantines the engine that fails it.
    report = await rig.sync(policy=policy)
    assert report.committed == ("a",) and "hashes to" in str(report.engines["b"].error)
    assert rig.exact("a", 2)
    b = rig.engines["b"]
    assert b.version == 1 and b.intact and rig.exact("b", 1)  # untouched, still intact
    assert b._base == []  # the rotten copy is dropped: the next session sends it full
    assert rig.fleet.view().engines["b"].version is None  # the fleet claims no version
    rig.fleet.mark("b", Health.CATCHING_UP, "the keeper would probe it and catch it up")
    await rig.publish(3)
    report = await rig.sync(policy=policy)
    assert set(report.committed) == {"a", "b"}
    assert report.engines["a"].delta and not report.engines["b"].delta
    assert rig.exact("a", 3) and rig.exact("b", 3)


async def test_begin_delta_refuses_every_base_but_the_one_served() -> None:
    engine = TensorEngine(sparse_weights(-1))
    buckets = pack(list(sparse_weights(0).items()), NUMEL)
    manifest = [b.manifest for b in buckets]
    n = len(manifest)
    dense = DeltaHeader(-1, "initial", (0,) * n, tuple(manifest), ("dense",) * n)
    with pytest.raises(DeltaBaseError, match="serves version None"):  # the first offer
        await engine.begin_delta("offer", 0, manifest, dense)
    await engine.begin("s0", 0, manifest)
    for i, b in enumerate(buckets):
        await engine.receive("s0", i, b)
    await engine.commit("s0")
    target = [b.manifest for b in pack(list(sparse_weights(1).items()), NUMEL)]
    good = DeltaHeader(
        0,
        engine.identity or "",
        tuple(m.checksum for m in manifest),
        tuple(manifest),  # dense payloads of the base's size: the header is well formed
        ("dense",) * len(manifest),
    )
    sums, payload, kinds = good.base_checksums, good.payload, good.kinds
    for header, why in (
        (DeltaHeader(5, good.base_weights, sums, payload, kinds), "serves version 0"),
        (DeltaHeader(0, "other", sums, payload, kinds), "serves version 0"),
        (DeltaHeader(0, good.base_weights, (1,) * len(sums), payload, kinds), "checksums"),
    ):
        with pytest.raises(DeltaBaseError, match=why):
            await engine.begin_delta("s1", 1, target, header)
    bad_kind = DeltaHeader(0, good.base_weights, sums, payload, ("x",) * len(sums))
    with pytest.raises(ProtocolError, match="unknown kind"):
        await engine.begin_delta("s1", 1, target, bad_kind)
    await engine.begin_delta("s1", 1, target, good)  # the id was never used by a refusal
    with pytest.raises(ConfigError, match="delta"):
        SyncPlan(delta="sometimes")


# ------------------------------------------------------------------ on a real Ray


@pytest.fixture
async def ray_rig(ray_local: Any) -> Any:
    """A sparse-weights train actor and three light engines in its fleet; the keeper
    probes rarely, so only the test's sessions move engines."""
    import ray
    from _fleet_actors import engine_class, trainer_class
    from _waits import within

    from asyncsync import Deadlines

    trainer = trainer_class().remote(
        sparse=True, deadlines=Deadlines(probe_interval_s=300.0, call_s=10.0)
    )
    engines = {f"r{i}": engine_class(max_restarts=1).remote(f"r{i}") for i in range(3)}
    await within(asyncio.gather(*(e.pid.remote() for e in engines.values())), 180)
    for name, handle in engines.items():
        await within(trainer.fleet_add.remote(name, handle))
    yield trainer, engines
    await within(trainer.close.remote())
    for handle in [trainer, *engines.values()]:
        ray.kill(handle, no_restart=True)


async def exact(trainer: Any, engines: dict[str, Any], step: int) -> None:
    from _waits import within

    want = await within(trainer.snapshot_digests.remote(step))
    for name, engine in engines.items():
        version, have = await within(engine.state_digests.remote())
        assert (version, have) == (step, want), name


async def test_delta_sessions_over_every_transport_and_policy_end_bit_exact(ray_rig: Any) -> None:
    from _waits import within

    trainer, engines = ray_rig
    for step in (-1, 0):  # full, then offered a first delta (refused: no base yet)
        await within(trainer.publish.remote(step))
        report = await within(trainer.run_sync_session.remote(SyncPlan(delta="always")))
        assert not any(e.delta for e in report.engines.values())
    for transport in ("shm", "object_store", "collective"):
        for policy in ("all_or_nothing", "per_engine"):
            step += 1
            await within(trainer.publish.remote(step))
            plan = SyncPlan(transport=transport, policy=policy, delta="always", timeout_s=60)
            report = await within(trainer.run_sync_session.remote(plan), 90)
            assert set(report.committed) == set(engines), (transport, policy, report)
            for name, engine in report.engines.items():
                assert engine.delta and engine.transport == transport, (name, engine)
                assert engine.sent_bytes < report.nbytes / 5, (name, engine)
            await exact(trainer, engines, step)
    stats = await within(trainer.delta_stats.remote())
    assert stats.step == step and stats.base_step == step - 1
    assert 0 < stats.changed_fraction < 0.05 and stats.nbytes < stats.full_bytes / 5
    # The store's memory bound: one base copy and its two newest deltas (each sparse).
    assert stats.deltas_kept == 2
    assert stats.resident_bytes <= stats.full_bytes * (1 + 2 / 5)
    # "never" sends the full snapshot even to engines on the base.
    step += 1
    await within(trainer.publish.remote(step))
    report = await within(trainer.run_sync_session.remote(SyncPlan(delta="never")))
    assert not any(e.delta for e in report.engines.values())
    await exact(trainer, engines, step)


async def test_an_engine_killed_mid_delta_restarts_and_gets_the_full_snapshot(
    ray_rig: Any,
) -> None:
    from _waits import eventually, within

    trainer, engines = ray_rig
    plan = SyncPlan(transport="object_store", policy="per_engine", delta="always")
    for step in (0, 1):
        await within(trainer.publish.remote(step))
        await within(trainer.run_sync_session.remote(plan))
    first = await within(engines["r1"].engine_info.remote())
    await within(engines["r1"].set_faults.remote(die_on_bucket=1))
    await within(trainer.publish.remote(2))
    report = await within(trainer.run_sync_session.remote(plan), 60)
    assert set(report.committed) == {"r0", "r2"}
    assert all(report.engines[n].delta for n in ("r0", "r2"))
    assert report.engines["r1"].outcome != "committed"

    async def back() -> bool:
        state = (await within(trainer.fleet_refresh.remote())).engines["r1"]
        return state.incarnation != first.incarnation

    await eventually(back, "Ray did not restart r1", 90)
    # Its step-2 stream ends once the new incarnation answers (it has no such
    # session); until then r1 is busy and sessions go on without it.
    last: list[Any] = [2, None]

    async def r1_included() -> bool:
        last[0] += 1
        await within(trainer.publish.remote(last[0]))
        last[1] = await within(trainer.run_sync_session.remote(plan), 60)
        return "r1" not in last[1].busy

    await eventually(r1_included, "r1 stayed busy with the killed session", 60)
    step, report = last
    # The new incarnation serves its initial weights (no base): the full snapshot,
    # in the same session in which the others get the delta.
    assert set(report.committed) == set(engines), report
    assert report.engines["r0"].delta and report.engines["r2"].delta
    assert not report.engines["r1"].delta and report.engines["r1"].sent_bytes == report.nbytes
    await exact(trainer, engines, step)
    # The new incarnation keeps no copy until a delta is offered to it: the next
    # session's offer is refused (full again), the one after is a delta for all.
    for _ in range(2):
        step += 1
        await within(trainer.publish.remote(step))
        report = await within(trainer.run_sync_session.remote(plan), 60)
    assert all(e.delta for e in report.engines.values()), report  # all on the base again
    await exact(trainer, engines, step)
    await exact(trainer, engines, step)


async def test_a_delta_whose_step_another_session_committed_first_commits_as_a_no_op() -> None:
    """Sessions may run at once: a full session commits step 2 while a delta to step 2
    is staged; the delta's base is gone, and its commit succeeds applying nothing."""
    engine = TensorEngine(sparse_weights(-1))
    base = pack(list(sparse_weights(1).items()), NUMEL)
    target = pack(list(sparse_weights(2).items()), NUMEL)
    n = len(base)
    offer = DeltaHeader(0, "x", (0,) * n, tuple(b.manifest for b in base), ("dense",) * n)
    with pytest.raises(DeltaBaseError):  # offered once: it keeps its next commit's bytes
        await engine.begin_delta("offer", 1, [b.manifest for b in base], offer)
    await engine.begin("full-1", 1, [b.manifest for b in base])
    for i, b in enumerate(base):
        await engine.receive("full-1", i, b)
    await engine.commit("full-1")
    encoded = [
        encode_bucket(old.buffer, new, PrivateBuffer) for old, new in zip(base, target, strict=True)
    ]
    header = DeltaHeader(
        1,
        engine.identity or "",
        tuple(b.checksum for b in base),
        tuple(e[1].manifest for e in encoded),
        tuple(e[0] for e in encoded),
    )
    manifest = [b.manifest for b in target]
    await engine.begin_delta("delta-2", 2, manifest, header)
    for i, (_, payload, _, _) in enumerate(encoded):
        await engine.receive("delta-2", i, payload)
    await engine.begin("full-2", 2, manifest)
    for i, b in enumerate(target):
        await engine.receive("full-2", i, b)
    assert await engine.commit("full-2") == 2
    applied = (await engine.receiver_stats()).applied_bytes
    assert await engine.commit("delta-2") == 2
    assert (await engine.receiver_stats()).applied_bytes == applied  # nothing applied again
    assert all(
        tensor_digest(engine.params[n]) == tensor_digest(t) for n, t in sparse_weights(2).items()
    )
    assert (await engine.engine_info()).open_sessions == 0


async def test_a_delta_over_the_store_cap_is_dropped_and_the_session_sends_full(
    rig: Rig,
) -> None:
    for step in (0, 1, 2):
        await rig.publish(step)
        await rig.sync()
    assert rig.deltas.stats().step == 2
    rewritten = {k: v + 1 for k, v in sparse_weights(2).items()}  # every word changes
    async with rig.cache.build(3) as build:
        await build.add(list(rewritten.items()))
    rig.deltas.published()
    report = await rig.sync()  # delta="always": still full, the store has none
    assert report.step == 3 and report.committed == ("a", "b")
    assert not any(r.delta for r in report.engines.values()), report.engines
    stats = rig.deltas.stats()
    assert (stats.dropped, stats.step) == (1, 2), stats  # step 3's was dropped
    # What it held was freed at once: the base and the kept deltas only.
    assert stats.resident_bytes <= report.nbytes * (1 + 2 * 0.1), stats
    for name in ("a", "b"):
        have = rig.engines[name].params
        assert all(tensor_digest(have[k]) == tensor_digest(v) for k, v in rewritten.items())


class FailsChanges(TensorEngine):
    """Writes half of a delta's first bucket into the model, then raises."""

    fail = True

    async def apply_changes(self, buckets: Any, changes: Any, version: int) -> None:
        if self.fail:
            first = dict(buckets[0].named_tensors())
            name = next(iter(first))
            self.params[name].copy_(first[name])
            raise RuntimeError("the model's memory went away")
        await super().apply_changes(buckets, changes, version)


async def test_an_apply_changes_that_fails_leaves_the_engine_on_no_version_until_full() -> None:
    rig = Rig(["a"], engine=FailsChanges)
    try:
        for step in (0, 1):  # the store's base, then the first offer (refused, kept)
            await rig.publish(step)
            await rig.sync()
        engine = rig.engines["a"]
        await rig.publish(2)
        with pytest.raises(SessionError, match="memory went away"):
            await rig.sync()  # the delta: its write into the model fails halfway
        stamp = engine.stamp()
        assert (stamp.version, stamp.intact) == (None, False)  # a mix of two versions
        engine.fail = False
        rig.fleet.mark("a", Health.CATCHING_UP, "the keeper would probe it and catch it up")
        await rig.publish(3)
        report = await rig.sync()
        # Its kept copy counts for nothing now: the full snapshot, then exact.
        assert report.committed == ("a",) and not report.engines["a"].delta
        assert rig.exact("a", 3) and engine.stamp().intact
    finally:
        await rig.close()


@pytest.mark.parametrize(
    ("options", "named"),
    [({"threads": 0}, "threads"), ({"threads": True}, "threads"), ({"max_ratio": 0}, "max_ratio")],
)
async def test_a_delta_store_refuses_bad_options(options: dict[str, Any], named: str) -> None:
    cache = BucketCache(bucket_bytes=NUMEL)
    try:
        with pytest.raises(ConfigError, match=named):
            DeltaStore(cache, **options)
    finally:
        await cache.close()
