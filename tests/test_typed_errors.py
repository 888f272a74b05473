"""A typed error at every public boundary of the fleet API, naming the offending item.

Each case calls one entry point with one wrong input and checks: the exception is
an :class:`~asyncsync.AsyncSyncError` (the documented subclass), its message names
the offending item (the option, the engine, the value), nothing changed, and the
next valid call succeeds. Constructors and plans are checked in-process; engine
receivers in-process on a real receiver; the train actor, its fleet and the
coordinator on a real local Ray, where a wrong target is a plain object or the
handle of an actor that is not a receiver.

The low-level entries (every public callable of :mod:`asyncsync.buckets`,
:mod:`asyncsync.sharedmem`, :mod:`asyncsync.cache` and :mod:`asyncsync.engines`) are
checked in-process with wrong types, NaN and infinity, negative, huge and empty
values; the list of cases is held against the modules' public names, so a new
public callable without a case fails :func:`test_every_public_callable_has_a_case`.
``tests/test_bad_input.py`` covers the cache, buckets and manifests in depth.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import ray
import torch
from _actors import TINY_LLAMA
from _fleet_actors import LightEngine, LightTrainer, engine_class, trainer_class
from _waits import within

import asyncsync.buckets
import asyncsync.cache
import asyncsync.engines
import asyncsync.sharedmem
from asyncsync import (
    ActorDefinitionError,
    AsyncSyncError,
    Bucket,
    BucketCache,
    BucketError,
    BucketManifest,
    ConfigError,
    FleetError,
    InvalidStepError,
    ProtocolError,
    SessionError,
    SharedMemoryError,
    SyncCoordinator,
    SyncPlan,
    TransportError,
    pack,
)
from asyncsync.actor import train_actor
from asyncsync.buckets import (
    TensorMeta,
    TensorStream,
    aligned,
    checksum,
    dtype_from_name,
    dtype_name,
    fill_and_hash,
    fill_buffer,
    tensor_digest,
)
from asyncsync.client import Deadlines
from asyncsync.engines import (
    HFEngine,
    TensorEngine,
    check_fits,
    copy_into,
    copy_named,
    engine_actor,
    tensor_engine_actor,
    write_changed,
)
from asyncsync.fleet import EngineFleet, Health
from asyncsync.sharedmem import SharedBuffer, SharedMappings, SharedRegion, map_region

pytestmark = pytest.mark.timeout(120)

Case = tuple[str, Callable[[], Any], type[AsyncSyncError], tuple[str, ...]]


@contextmanager
def raises_typed(kind: type[AsyncSyncError], *names: str) -> Iterator[None]:
    """``pytest.raises(kind)`` whose message names each of ``names`` verbatim."""
    with pytest.raises(Exception) as info:
        yield
    assert isinstance(info.value, AsyncSyncError), f"untyped: {info.value!r}"
    assert isinstance(info.value, kind), f"{type(info.value).__name__} is not a {kind.__name__}"
    for name in names:
        assert name in str(info.value), f"{name!r} is not named in: {info.value}"


def cases(*rows: Case) -> Any:
    return pytest.mark.parametrize(
        "call, kind, names", [pytest.param(c, k, n, id=i) for i, c, k, n in rows]
    )


# --------------------------------------------------------------------- options, in-process


@cases(
    ("engines-empty", lambda: SyncPlan(engines={}), ConfigError, ("SyncPlan.engines",)),
    ("engines-list", lambda: SyncPlan(engines=["e0"]), ConfigError, ("SyncPlan.engines",)),
    ("engines-name", lambda: SyncPlan(engines={3: None}), ConfigError, ("SyncPlan.engines", "3")),
    ("min_step-str", lambda: SyncPlan(min_step="1"), InvalidStepError, ("min_step", "'1'")),
    ("min_step-bool", lambda: SyncPlan(min_step=True), InvalidStepError, ("min_step", "True")),
    ("min_step-low", lambda: SyncPlan(min_step=-2), InvalidStepError, ("min_step", "-2")),
    ("transport", lambda: SyncPlan(transport="pigeon"), ConfigError, ("'pigeon'",)),
    ("cross_node-shm", lambda: SyncPlan(cross_node="shm"), ConfigError, ("cross_node='shm'",)),
    ("policy", lambda: SyncPlan(policy="some"), ConfigError, ("SyncPlan.policy", "'some'")),
    ("policy-renamed", lambda: SyncPlan(policy="fleet"), ConfigError, ("'all_or_nothing'",)),
    ("min_engines-0", lambda: SyncPlan(min_engines=0), ConfigError, ("min_engines", "0")),
    ("min_engines-1.5", lambda: SyncPlan(min_engines=1.5), ConfigError, ("min_engines", "1.5")),
    ("min_engines-bool", lambda: SyncPlan(min_engines=True), ConfigError, ("min_engines",)),
    ("max_updating-0", lambda: SyncPlan(max_updating=0), ConfigError, ("max_updating", "0")),
    ("max_updating-bool", lambda: SyncPlan(max_updating=True), ConfigError, ("max_updating",)),
    ("grace-neg", lambda: SyncPlan(straggler_grace_s=-1), ConfigError, ("straggler_grace_s",)),
    ("grace-str", lambda: SyncPlan(straggler_grace_s="1"), ConfigError, ("straggler_grace_s",)),
    ("timeout-0", lambda: SyncPlan(timeout_s=0), ConfigError, ("SyncPlan.timeout_s", "0")),
    ("timeout-nan", lambda: SyncPlan(timeout_s=math.nan), ConfigError, ("timeout_s", "nan")),
    ("timeout-bool", lambda: SyncPlan(timeout_s=True), ConfigError, ("timeout_s", "True")),
    ("pin_timeout-nan", lambda: SyncPlan(pin_timeout_s=math.nan), ConfigError, ("pin_timeout_s",)),
    ("inflight-0", lambda: SyncPlan(max_inflight_buckets=0), ConfigError, ("max_inflight",)),
)
def test_sync_plan_fields(
    call: Callable[[], Any], kind: type[AsyncSyncError], names: tuple[str, ...]
) -> None:
    with raises_typed(kind, *names):
        call()
    SyncPlan(policy="per_engine", min_engines=0.5, max_updating=2)  # the next valid one


@cases(
    ("deadlines-call", lambda: Deadlines(call_s=0), ConfigError, ("Deadlines.call_s",)),
    ("deadlines-abort", lambda: Deadlines(abort_s=math.inf), ConfigError, ("abort_s", "inf")),
    ("deadlines-probe", lambda: Deadlines(probe_interval_s="1"), ConfigError, ("probe_interval",)),
    ("deadlines-probe_s", lambda: Deadlines(probe_s=-1), ConfigError, ("probe_s", "-1")),
    ("fleet-deadlines", lambda: EngineFleet(deadlines=5), ConfigError, ("deadlines",)),
    ("fleet-initial", lambda: EngineFleet(initial="serving"), ConfigError, ("initial",)),
    ("fleet-engines", lambda: EngineFleet(["e0"]), FleetError, ("mapping",)),
    ("fleet-name", lambda: EngineFleet({"": object()}), FleetError, ("engine names", "''")),
    ("actor-deadlines", lambda: LightTrainer(deadlines=60), ConfigError, ("deadlines",)),
    (
        "actor-catch-up-plan",
        lambda: LightTrainer(catch_up_plan=SyncPlan(min_step=3)),
        ConfigError,
        ("catch_up_plan", "min_step"),
    ),
    (
        "actor-transport",
        lambda: LightTrainer(transport_options={"pigeon": {}}),
        ConfigError,
        ("'pigeon'",),
    ),
    (
        "actor-transport-option",
        lambda: LightTrainer(transport_options={"object_store": {"speed": 9}}),
        ConfigError,
        ("'object_store'", "speed"),
    ),
    (
        "actor-transport-options",
        lambda: LightTrainer(transport_options=["shm"]),
        ConfigError,
        ("transport_options",),
    ),
    ("actor-bucket_bytes", lambda: LightTrainer(bucket_bytes=0), ConfigError, ("bucket_bytes",)),
    (
        "train_actor-class",
        lambda: train_actor(int),  # type: ignore[arg-type]
        ActorDefinitionError,
        ("int",),
    ),
    (
        "train_actor-concurrency",
        lambda: train_actor(LightTrainer, max_concurrency=2),
        ActorDefinitionError,
        ("max_concurrency=2",),
    ),
    (
        "train_actor-reserved",
        lambda: train_actor(LightTrainer, reserved_slots=True),
        ActorDefinitionError,
        ("reserved_slots=True",),
    ),
    (
        "train_actor-ray-option",
        lambda: train_actor(LightTrainer, num_gpus="two"),
        ActorDefinitionError,
        ("num_gpus",),
    ),
    ("cache-bucket_bytes", lambda: BucketCache(0), ConfigError, ("bucket_bytes",)),
    ("cache-resident", lambda: BucketCache(max_resident_bytes=0), ConfigError, ("max_resident",)),
)
def test_constructor_options(
    call: Callable[[], Any], kind: type[AsyncSyncError], names: tuple[str, ...]
) -> None:
    with raises_typed(kind, *names):
        call()
    # The next valid construction succeeds.
    LightTrainer(deadlines=Deadlines(probe_interval_s=0.5), transport_options={"object_store": {}})


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"bucket_bytes": True}, id="bucket_bytes-bool"),
        pytest.param({"max_resident_bytes": "1GiB"}, id="max_resident-str"),
        pytest.param({"resident_wait_s": -1}, id="resident_wait-negative"),
        pytest.param({"pin_memory": "yes"}, id="pin_memory-str"),
    ],
)
def test_bucket_cache_options_are_typed(options: dict[str, Any]) -> None:
    with raises_typed(ConfigError, next(iter(options))):
        BucketCache(**options)


@cases(
    (
        "staleness",
        lambda: SyncCoordinator(FakeTrainer(), staleness=-1),
        ConfigError,
        ("staleness",),
    ),
    ("plan-type", lambda: SyncCoordinator(FakeTrainer(), plan={}), ConfigError, ("plan",)),
    (
        "plan-engines",
        lambda: SyncCoordinator(FakeTrainer(), plan=SyncPlan(engines={"e": 1})),
        ConfigError,
        ("engines",),
    ),
    (
        "cancel_wait",
        lambda: SyncCoordinator(FakeTrainer(), cancel_wait_s="x"),
        ConfigError,
        ("cancel_wait_s",),
    ),
    ("engines-list", lambda: SyncCoordinator(FakeTrainer(), ["e0"]), ConfigError, ("engines",)),
    (
        "engines-name",
        lambda: SyncCoordinator(FakeTrainer(), {"": 1}),
        ConfigError,
        ("engines", "''"),
    ),
    ("trainer", lambda: SyncCoordinator(object()), ConfigError, ("trainer", "object")),
)
def test_coordinator_options(
    call: Callable[[], Any], kind: type[AsyncSyncError], names: tuple[str, ...]
) -> None:
    with raises_typed(kind, *names):
        call()
    SyncCoordinator(FakeTrainer(), staleness=0, plan=SyncPlan(policy="per_engine", min_engines=0.5))


class FakeTrainer:
    """Stands in for a trainer handle where only the coordinator's own checks run."""

    run_sync_session = None


# --------------------------------------------------------------------- receiver protocol


def manifest_and_buckets(step: int) -> tuple[list[Any], list[Any]]:
    buckets = pack([("w", torch.full((256,), float(step)))], 1 << 16)
    return [b.manifest for b in buckets], buckets


async def test_receiver_protocol_misuse_is_typed_and_changes_nothing() -> None:
    engine = LightEngine("r")
    manifest, buckets = manifest_and_buckets(0)
    await engine.begin("s0", 0, manifest, 10.0)
    await engine.receive("s0", 0, buckets[0])
    assert await engine.commit("s0") == 0
    before = (await engine.state_digests(), await engine.receiver_stats())
    await engine.begin("open", 1, manifest_and_buckets(1)[0], 10.0)
    bad: list[Case] = [
        (
            "id-reused",
            lambda: engine.begin("s0", 2, manifest, 10.0),
            ProtocolError,
            ("'s0'",),
        ),
        ("id-list", lambda: engine.begin(["x"], 2, manifest, 10.0), ConfigError, ("['x']",)),
        ("id-empty", lambda: engine.begin("", 2, manifest, 10.0), ConfigError, ("session ids",)),
        ("step-str", lambda: engine.begin("a", "2", manifest, 10.0), InvalidStepError, ("'2'",)),
        ("step-low", lambda: engine.begin("b", -5, manifest, 10.0), InvalidStepError, ("-5",)),
        ("ttl-str", lambda: engine.begin("c", 2, manifest, "10"), ConfigError, ("ttl_s", "'10'")),
        ("ttl-0", lambda: engine.begin("d", 2, manifest, 0), ConfigError, ("ttl_s", "0")),
        (
            "manifest-None",
            lambda: engine.begin("e", 2, None, 10.0),
            ProtocolError,
            ("NoneType",),
        ),
        (
            "manifest-entry",
            lambda: engine.begin("f", 2, [7], 10.0),
            ProtocolError,
            ("entry 0",),
        ),
        (
            "index-str",
            lambda: engine.receive("open", "0", buckets[0]),
            ProtocolError,
            ("'0'",),
        ),
        ("index-out", lambda: engine.receive("open", 4, buckets[0]), ProtocolError, ("4",)),
        ("payload", lambda: engine.receive("open", 0, "bytes"), TransportError, ("str",)),
        (
            "receive-unknown",
            lambda: engine.receive("nope", 0, buckets[0]),
            ProtocolError,
            ("'nope'",),
        ),
        (
            "receive-id-list",
            lambda: engine.receive(["open"], 0, buckets[0]),
            ProtocolError,
            ("['open']",),
        ),
        ("commit-unknown", lambda: engine.commit("nope"), ProtocolError, ("'nope'",)),
        ("commit-id-list", lambda: engine.commit(["open"]), ProtocolError, ("['open']",)),
        ("abort-id-list", lambda: engine.abort(["open"]), ProtocolError, ("['open']",)),
        ("setup", lambda: engine.transport_setup("pigeon", None), ConfigError, ("'pigeon'",)),
    ]
    for case, call, kind, names in bad:
        with raises_typed(kind, *names):
            await call()
        stats = await engine.receiver_stats()
        assert (await engine.state_digests()) == before[0], case
        assert stats.open_sessions == ("open",), case
        assert stats.commits == before[1].commits, case
    # The session that was open all along completes; the weights are step 1's.
    _, buckets1 = manifest_and_buckets(1)
    await engine.receive("open", 0, buckets1[0])
    assert await engine.commit("open") == 1
    assert (await engine.receiver_stats()).open_sessions == ()


# --------------------------------------------------------------------- on a real Ray


class Rig:
    def __init__(self, trainer: Any, engine: Any) -> None:
        self.trainer = trainer
        self.engine = engine
        self.step = 0


@pytest.fixture(scope="module")
async def rig(ray_local: Any) -> AsyncIterator[Rig]:
    trainer = trainer_class().remote(deadlines=Deadlines(probe_interval_s=0.5, call_s=5.0))
    engine = engine_class().remote("t0")
    await within(asyncio.gather(trainer.pid.remote(), engine.pid.remote()), 120)
    await within(trainer.publish.remote(0))
    yield Rig(trainer, engine)
    for handle in (trainer, engine):
        ray.kill(handle, no_restart=True)


async def state(rig: Rig) -> tuple[Any, ...]:
    """What a refused call must not change: fleet, ready step, pins, the engine's version."""
    view = await within(rig.trainer.fleet_view.remote())
    stats = await within(rig.trainer.cache_stats.remote())
    receiver = await within(rig.engine.receiver_stats.remote())
    return (
        {n: (s.health, s.version) for n, s in view.engines.items()},
        stats.ready_step,
        stats.pins,
        receiver.version,
        receiver.open_sessions,
    )


async def test_train_actor_fleet_and_sessions_refuse_wrong_targets(rig: Rig) -> None:
    trainer, engine = rig.trainer, rig.engine
    await within(trainer.fleet_add.remote("t0", engine))
    report = await within(trainer.run_sync_session.remote(SyncPlan(timeout_s=30.0)))
    assert report.committed == ("t0",)
    before = await state(rig)
    remote: list[tuple[str, Callable[[], Any], type[AsyncSyncError], tuple[str, ...]]] = [
        (
            "add-plain-object",
            lambda: trainer.fleet_add.remote("obj", object()),
            FleetError,
            ("'obj'", "not an engine"),
        ),
        (
            "add-wrong-actor",
            lambda: trainer.fleet_add.remote("tr", trainer),
            FleetError,
            ("'tr'", "not an engine", "engine_info"),
        ),
        (
            "add-duplicate",
            lambda: trainer.fleet_add.remote("t0", trainer),
            FleetError,
            ("'t0'", "already used"),
        ),
        ("add-bad-name", lambda: trainer.fleet_add.remote("", engine), FleetError, ("''",)),
        ("remove-unknown", lambda: trainer.fleet_remove.remote("t9"), FleetError, ("'t9'",)),
        ("remove-bad-name", lambda: trainer.fleet_remove.remote(["t0"]), FleetError, ("['t0']",)),
        (
            "plan-not-a-plan",
            lambda: trainer.run_sync_session.remote({"targets": None}),
            ConfigError,
            ("SyncPlan", "dict"),
        ),
        (
            "target-plain-object",
            lambda: trainer.run_sync_session.remote(SyncPlan({"obj": object()})),
            SessionError,
            ("'obj'", "not an engine"),
        ),
        (
            "target-wrong-actor",
            lambda: trainer.run_sync_session.remote(SyncPlan({"tr": trainer})),
            SessionError,
            ("'tr'", "not an engine"),
        ),
        (
            "target-among-good",
            lambda: trainer.run_sync_session.remote(
                SyncPlan({"t0": engine, "obj": object()}, timeout_s=30.0)
            ),
            SessionError,
            ("'obj'",),
        ),
        (
            "build-step",
            lambda: trainer.build_cpu_bucket_cache.remote("1"),
            InvalidStepError,
            ("'1'",),
        ),
    ]
    for case, call, kind, names in remote:
        with raises_typed(kind, *names):
            await within(call())
        assert await state(rig) == before, case
    # The next valid calls succeed (adding the same handle under its name is a no-op).
    assert (await within(trainer.fleet_add.remote("t0", engine))).name == "t0"
    rig.step += 1
    await within(trainer.publish.remote(rig.step))
    report = await within(trainer.run_sync_session.remote(SyncPlan(timeout_s=30.0)))
    assert report.committed == ("t0",) and report.step == rig.step
    view = await within(trainer.fleet_view.remote())
    assert view.engines["t0"].health is Health.SERVING and set(view.engines) == {"t0"}


async def test_coordinator_refuses_wrong_handles_and_steps(rig: Rig) -> None:
    with raises_typed(ConfigError, "trainer"):
        SyncCoordinator(rig.engine)  # an engine's handle, not a train actor's
    coordinator = SyncCoordinator(rig.trainer, staleness=0, plan=SyncPlan(timeout_s=30.0))
    with raises_typed(FleetError, "'obj'", "not an engine"):
        await within(coordinator.add_engine("obj", object()))
    with raises_typed(FleetError, "'t9'"):
        await within(coordinator.remove_engine("t9"))
    for step in ("3", True, -2):
        with raises_typed(InvalidStepError, repr(step)):
            await within(coordinator.after_build(step))  # type: ignore[arg-type]
    with raises_typed(InvalidStepError, "'3'"):
        await within(coordinator.sync("3"))  # type: ignore[arg-type]
    # The next valid calls succeed.
    rig.step += 1
    await within(rig.trainer.publish.remote(rig.step))
    await within(coordinator.after_build(rig.step))
    assert coordinator.engine_version == rig.step
    await within(coordinator.close())


# ----------------------------------------------------------------- low-level entries, in-process
#
# Every public callable of buckets, sharedmem, cache and engines (each name of the
# module's __all__, each class's constructor and public methods) has bad-input cases
# below, or is listed in NOT_CASED with the reason it takes no input to refuse.
# test_every_public_callable_has_a_case walks the modules, so a new public callable
# without a case fails the suite.

LOW_LEVEL = {
    "buckets": asyncsync.buckets,
    "sharedmem": asyncsync.sharedmem,
    "cache": asyncsync.cache,
    "engines": asyncsync.engines,
}

NOT_CASED = {
    # No arguments to refuse.
    "buckets.Bucket.named_tensors": "no arguments",
    "buckets.BucketManifest.to_json": "no arguments",
    "buckets.TensorMeta.to_json": "no arguments",
    "buckets.TensorStream.next_group": "no arguments (its input is checked by the constructor)",
    "sharedmem.SharedMappings": "no arguments",
    "sharedmem.SharedMappings.prune": "no arguments",
    "sharedmem.SharedMappings.clear": "no arguments",
    "sharedmem.SharedBuffer.release": "no arguments",
    "cache.BucketCache.stats": "no arguments",
    "cache.BucketCache.close": "no arguments",
    "cache.Snapshot.named_tensors": "no arguments",
    "engines.copy_threads": "no arguments",
    "engines.HFEngine.state_digests": "no arguments",
    "engines.HFEngine.served_version": "no arguments",
    "engines.HFEngine.served_digests": "no arguments",
    "engines.TensorEngine.served_digests": "no arguments",
    "engines.HFEngine.ping": "no arguments",
    # Made by the library and handed out; callers never construct them.
    "sharedmem.SharedBuffer": "made by SharedBuffer.allocate",
    "cache.BuildHandle": "made by BucketCache.build",
    "cache.Snapshot": "a read's result",
    "cache.CacheStats": "BucketCache.stats()'s result",
    "engines.Generation": "HFEngine.generate's result",
}


def public_callables() -> set[str]:
    """``module.name`` and ``module.Class.method`` of every public callable of LOW_LEVEL."""
    found: set[str] = set()
    for short, module in LOW_LEVEL.items():
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type):
                found.add(f"{short}.{name}")
                for attr, value in vars(obj).items():
                    plain = inspect.isfunction(value) or isinstance(
                        value, classmethod | staticmethod
                    )
                    if plain and not attr.startswith("_"):
                        found.add(f"{short}.{name}.{attr}")
            elif callable(obj):
                found.add(f"{short}.{name}")
    return found


class World:
    """The objects the cases call, and what a refused call must leave unchanged."""

    def __init__(self, hf: HFEngine, buffer: SharedBuffer) -> None:
        self.hf = hf
        self.buffer = buffer
        self.cache = BucketCache(1 << 16, prefault_pool=False)
        self.tensors = TensorEngine({"w": torch.zeros(64), "b": torch.zeros(8)})
        self.mappings = SharedMappings()
        self.bucket = pack([("w", torch.ones(64))], 1 << 16)[0]
        self.meta = self.bucket.index[0]
        self.step = 0

    async def start(self) -> None:
        await self.publish()

    async def publish(self) -> None:
        async with self.cache.build(self.step) as build:
            await build.add([("w", torch.full((64,), float(self.step)))])
        self.step += 1

    async def add(self, named_tensors: Any) -> None:
        """``BuildHandle.add(named_tensors)`` in a build of the next step."""
        async with self.cache.build(self.step) as build:
            await build.add(named_tensors)

    async def state(self) -> tuple[Any, ...]:
        stats = self.cache.stats()
        tensors = await self.tensors.receiver_stats()
        return (
            (stats.ready_step, stats.building_step, stats.pins, stats.publishes),
            (tensors.version, tensors.open_sessions),
            {n: bytes(t.numpy()) for n, t in self.tensors.params.items()},
            await self.hf.state_digests(),
            (self.buffer.nbytes, self.buffer.released, len(self.mappings)),
            (torch.get_num_threads(), torch.initial_seed()),
        )

    async def next_valid_calls(self) -> None:
        await self.publish()
        async with self.cache.read(min_step=self.step - 1, timeout=5.0) as snap:
            assert snap.step == self.step - 1
        buckets = pack([("w", torch.ones(64)), ("b", torch.ones(8))], 1 << 16)
        assert buckets[0].manifest == BucketManifest.from_json(buckets[0].manifest.to_json())
        session = f"ok{self.step}"
        await self.tensors.begin(session, self.step, [b.manifest for b in buckets], 10.0)
        await self.tensors.receive(session, 0, buckets[0])
        assert await self.tensors.commit(session) == self.step
        region = self.buffer.region(0, 16)
        assert map_region(region).nbytes == self.mappings.map(region).nbytes == 16
        assert (await self.hf.generate([[1, 2]], max_new_tokens=1)).tokens
        assert aligned(1) == 64 and dtype_from_name("float32") is torch.float32


def params() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(64)}


NAN, INF = math.nan, math.inf
B = BucketError
S = SharedMemoryError
C = ConfigError
M = ProtocolError
I = InvalidStepError  # noqa: E741

LowCase = tuple[str, str, Callable[[World], Any], type[AsyncSyncError], tuple[str, ...]]

LOW_CASES: list[LowCase] = [
    # ------------------------------------------------------------ buckets
    ("buckets.aligned", "str", lambda w: aligned("x"), B, ("nbytes", "'x'")),
    ("buckets.aligned", "negative", lambda w: aligned(-1), B, ("nbytes", "-1")),
    ("buckets.aligned", "nan", lambda w: aligned(NAN), B, ("nbytes", "nan")),
    ("buckets.aligned", "bool", lambda w: aligned(True), B, ("nbytes", "True")),
    ("buckets.checksum", "bytes", lambda w: checksum(b"abc"), B, ("payload", "bytes")),
    (
        "buckets.checksum",
        "strided",
        lambda w: checksum(np.zeros(8, np.uint8)[::2]),
        B,
        ("payload", "contiguous"),
    ),
    ("buckets.dtype_from_name", "int", lambda w: dtype_from_name(5), B, ("5",)),
    ("buckets.dtype_from_name", "unknown", lambda w: dtype_from_name("float99"), B, ("'float99'",)),
    ("buckets.dtype_from_name", "not-a-dtype", lambda w: dtype_from_name("Tensor"), B, ("Tensor",)),
    ("buckets.dtype_name", "str", lambda w: dtype_name("float32"), B, ("dtype", "'float32'")),
    ("buckets.tensor_digest", "str", lambda w: tensor_digest("x"), B, ("tensor_digest", "str")),
    (
        "buckets.tensor_digest",
        "meta",
        lambda w: tensor_digest(torch.empty(2, device="meta")),
        B,
        ("tensor_digest", "meta"),
    ),
    (
        "buckets.fill_and_hash",
        "payload-list",
        lambda w: fill_and_hash([0] * 64, w.bucket.index, [torch.ones(64)]),
        B,
        ("payload",),
    ),
    (
        "buckets.fill_and_hash",
        "index-str",
        lambda w: fill_and_hash(np.zeros(256, np.uint8), "x", [torch.ones(64)]),
        B,
        ("index", "str"),
    ),
    (
        "buckets.fill_and_hash",
        "index-entry",
        lambda w: fill_and_hash(np.zeros(256, np.uint8), [5], [torch.ones(64)]),
        B,
        ("index entries", "5"),
    ),
    (
        "buckets.fill_and_hash",
        "tensor-str",
        lambda w: fill_and_hash(np.zeros(256, np.uint8), w.bucket.index, ["x"]),
        B,
        ("'w'", "str"),
    ),
    (
        "buckets.fill_buffer",
        "tensors-str",
        lambda w: fill_buffer(np.zeros(256, np.uint8), w.bucket.index, "x"),
        B,
        ("tensors", "str"),
    ),
    (
        "buckets.fill_buffer",
        "shape",
        lambda w: fill_buffer(np.zeros(256, np.uint8), w.bucket.index, [torch.ones(63)]),
        B,
        ("'w'", "[63]"),
    ),
    ("buckets.pack", "int", lambda w: pack(5), B, ("named_tensors", "int")),
    ("buckets.pack", "mapping", lambda w: pack({"w": torch.ones(2)}), B, ("mapping.items()",)),
    ("buckets.pack", "str", lambda w: pack("w"), B, ("named_tensors", "str")),
    ("buckets.pack", "item", lambda w: pack([("w", "x")]), B, ("'w'", "str")),
    (
        "buckets.pack",
        "budget-str",
        lambda w: pack([], bucket_bytes="x"),
        B,
        ("bucket_bytes", "'x'"),
    ),
    (
        "buckets.pack",
        "budget-nan",
        lambda w: pack([], bucket_bytes=NAN),
        B,
        ("bucket_bytes", "nan"),
    ),
    (
        "buckets.pack",
        "budget-inf",
        lambda w: pack([], bucket_bytes=INF),
        B,
        ("bucket_bytes", "inf"),
    ),
    ("buckets.pack", "budget-float", lambda w: pack([], bucket_bytes=1.5), B, ("bucket_bytes",)),
    ("buckets.pack", "budget-0", lambda w: pack([], bucket_bytes=0), B, ("bucket_bytes", "0")),
    ("buckets.pack", "budget-negative", lambda w: pack([], bucket_bytes=-8), B, ("-8",)),
    ("buckets.pack", "budget-bool", lambda w: pack([], bucket_bytes=True), B, ("True",)),
    ("buckets.TensorStream", "items", lambda w: TensorStream(5, 64), B, ("named_tensors", "int")),
    ("buckets.TensorStream", "budget", lambda w: TensorStream([], NAN), B, ("bucket_bytes", "nan")),
    ("buckets.TensorStream", "seen", lambda w: TensorStream([], 64, seen=[]), B, ("seen", "[]")),
    (
        "buckets.Bucket",
        "buffer",
        lambda w: Bucket("x", w.bucket.index, 0),
        B,
        ("Bucket.buffer", "str"),
    ),
    (
        "buckets.Bucket",
        "index",
        lambda w: Bucket(w.bucket.buffer, list(w.bucket.index), 0),
        B,
        ("Bucket.index",),
    ),
    (
        "buckets.Bucket",
        "checksum",
        lambda w: Bucket(w.bucket.buffer, w.bucket.index, NAN),
        B,
        ("Bucket.checksum", "nan"),
    ),
    ("buckets.Bucket.verify", "expected", lambda w: w.bucket.verify("x"), B, ("expected", "'x'")),
    (
        "buckets.BucketManifest",
        "index",
        lambda w: BucketManifest([w.meta], 256, 0),
        B,
        ("BucketManifest.index",),
    ),
    (
        "buckets.BucketManifest",
        "nbytes",
        lambda w: BucketManifest((w.meta,), "256", 0),
        B,
        ("BucketManifest.nbytes", "'256'"),
    ),
    ("buckets.BucketManifest.from_json", "int", lambda w: BucketManifest.from_json(5), B, ("5",)),
    (
        "buckets.BucketManifest.from_json",
        "not-json",
        lambda w: BucketManifest.from_json("{"),
        B,
        ("malformed", "'{'"),
    ),
    (
        "buckets.BucketManifest.from_json",
        "fields",
        lambda w: BucketManifest.from_json('{"index": 3}'),
        B,
        ("malformed",),
    ),
    (
        "buckets.TensorMeta",
        "name",
        lambda w: TensorMeta(5, "float32", (1,), 0, 4),
        B,
        ("TensorMeta.name", "5"),
    ),
    (
        "buckets.TensorMeta",
        "shape",
        lambda w: TensorMeta("w", "float32", [1], 0, 4),
        B,
        ("shape", "[1]"),
    ),
    (
        "buckets.TensorMeta",
        "offset",
        lambda w: TensorMeta("w", "float32", (1,), 1.5, 4),
        B,
        ("offset", "1.5"),
    ),
    ("buckets.TensorMeta.from_json", "str", lambda w: TensorMeta.from_json("x"), B, ("data",)),
    (
        "buckets.TensorMeta.from_json",
        "missing",
        lambda w: TensorMeta.from_json({"name": "w"}),
        B,
        ("malformed", "'w'"),
    ),
    # ------------------------------------------------------------ sharedmem
    ("sharedmem.SharedBuffer.allocate", "str", lambda w: SharedBuffer.allocate("x"), S, ("'x'",)),
    ("sharedmem.SharedBuffer.allocate", "nan", lambda w: SharedBuffer.allocate(NAN), S, ("nan",)),
    ("sharedmem.SharedBuffer.allocate", "float", lambda w: SharedBuffer.allocate(1.5), S, ("1.5",)),
    (
        "sharedmem.SharedBuffer.allocate",
        "huge",
        lambda w: SharedBuffer.allocate(2**70),
        S,
        ("nbytes", str(2**70)),
    ),
    (
        "sharedmem.SharedBuffer.allocate",
        "negative",
        lambda w: SharedBuffer.allocate(-1),
        S,
        ("-1",),
    ),
    (
        "sharedmem.SharedBuffer.allocate",
        "pin-str",
        lambda w: SharedBuffer.allocate(8, pin_memory="yes"),
        C,
        ("pin_memory", "'yes'"),
    ),
    (
        "sharedmem.SharedBuffer.allocate",
        "prefault-int",
        lambda w: SharedBuffer.allocate(8, prefault=1),
        C,
        ("prefault", "1"),
    ),
    ("sharedmem.SharedBuffer.region", "str", lambda w: w.buffer.region("x"), S, ("offset", "'x'")),
    (
        "sharedmem.SharedBuffer.region",
        "nbytes-nan",
        lambda w: w.buffer.region(nbytes=NAN),
        S,
        ("nbytes", "nan"),
    ),
    ("sharedmem.SharedBuffer.region", "negative", lambda w: w.buffer.region(-1), S, ("-1",)),
    ("sharedmem.SharedBuffer.region", "huge", lambda w: w.buffer.region(2**70), S, ("outside",)),
    (
        "sharedmem.SharedBuffer.region",
        "too-long",
        lambda w: w.buffer.region(0, w.buffer.nbytes + 1),
        S,
        ("outside",),
    ),
    ("sharedmem.SharedRegion", "pid", lambda w: SharedRegion("1", 3, 0, 1, "ab"), S, ("pid",)),
    ("sharedmem.SharedRegion", "fd", lambda w: SharedRegion(1, -3, 0, 1, "ab"), S, ("fd", "-3")),
    ("sharedmem.SharedRegion", "nbytes", lambda w: SharedRegion(1, 3, 0, NAN, "ab"), S, ("nan",)),
    ("sharedmem.SharedRegion", "token", lambda w: SharedRegion(1, 3, 0, 1, ""), S, ("token",)),
    ("sharedmem.map_region", "str", lambda w: map_region("x"), S, ("region", "'x'")),
    ("sharedmem.map_region", "None", lambda w: map_region(None), S, ("region", "None")),
    ("sharedmem.SharedMappings.map", "str", lambda w: w.mappings.map("x"), S, ("region", "'x'")),
    # ------------------------------------------------------------ cache
    ("cache.BucketCache", "budget-nan", lambda w: BucketCache(NAN), C, ("bucket_bytes", "nan")),
    ("cache.BucketCache", "budget-str", lambda w: BucketCache("x"), C, ("bucket_bytes", "'x'")),
    ("cache.BucketCache", "budget-float", lambda w: BucketCache(2.5), C, ("bucket_bytes", "2.5")),
    (
        "cache.BucketCache",
        "resident-nan",
        lambda w: BucketCache(max_resident_bytes=NAN),
        C,
        ("max_resident_bytes", "nan"),
    ),
    (
        "cache.BucketCache",
        "wait-inf",
        lambda w: BucketCache(resident_wait_s=INF),
        C,
        ("resident_wait_s", "inf"),
    ),
    (
        "cache.BucketCache",
        "prefault-int",
        lambda w: BucketCache(prefault_pool=1),
        C,
        ("prefault_pool", "1"),
    ),
    ("cache.BucketCache.build", "step-str", lambda w: w.cache.build("x"), I, ("step", "'x'")),
    ("cache.BucketCache.build", "step-nan", lambda w: w.cache.build(NAN), I, ("step", "nan")),
    ("cache.BucketCache.build", "step-low", lambda w: w.cache.build(-2), I, ("-2",)),
    (
        "cache.BucketCache.build",
        "timeout-str",
        lambda w: w.cache.build(w.step, timeout="x"),
        C,
        ("timeout", "'x'"),
    ),
    (
        "cache.BucketCache.build",
        "timeout-nan",
        lambda w: w.cache.build(w.step, timeout=NAN),
        C,
        ("timeout", "nan"),
    ),
    (
        "cache.BucketCache.build",
        "timeout-negative",
        lambda w: w.cache.build(w.step, timeout=-1),
        C,
        ("timeout", "-1"),
    ),
    (
        "cache.BucketCache.build",
        "timeout-inf",
        lambda w: w.cache.build(w.step, timeout=INF),
        C,
        ("timeout", "inf"),
    ),
    (
        "cache.BucketCache.build",
        "guard",
        lambda w: w.cache.build(w.step, guard=5),
        C,
        ("guard", "5"),
    ),
    ("cache.BucketCache.read", "step-str", lambda w: w.cache.read("0"), I, ("step", "'0'")),
    ("cache.BucketCache.read", "step-nan", lambda w: w.cache.read(NAN), I, ("step", "nan")),
    (
        "cache.BucketCache.read",
        "timeout-str",
        lambda w: w.cache.read(timeout="x"),
        C,
        ("timeout", "'x'"),
    ),
    (
        "cache.BucketCache.read",
        "timeout-nan",
        lambda w: w.cache.read(99, timeout=NAN),
        C,
        ("timeout", "nan"),
    ),
    (
        "cache.BucketCache.read",
        "timeout-negative",
        lambda w: w.cache.read(timeout=-1.0),
        C,
        ("timeout", "-1.0"),
    ),
    ("cache.BucketCache.read", "timeout-inf", lambda w: w.cache.read(timeout=INF), C, ("inf",)),
    ("cache.BuildHandle.add", "int", lambda w: w.add(5), B, ("named_tensors", "int")),
    ("cache.BuildHandle.add", "mapping", lambda w: w.add({"w": torch.ones(2)}), B, ("items()",)),
    ("cache.BuildHandle.add", "item", lambda w: w.add([("w", "x")]), B, ("'w'", "str")),
    ("cache.BuildHandle.add", "name", lambda w: w.add([(3, torch.ones(2))]), B, ("3",)),
    # ------------------------------------------------------------ engines
    ("engines.check_fits", "params", lambda w: check_fits(5, []), C, ("params", "int")),
    (
        "engines.check_fits",
        "param-str",
        lambda w: check_fits({"w": "x"}, []),
        C,
        ("params", "'w'", "str"),
    ),
    ("engines.check_fits", "manifest", lambda w: check_fits(params(), "x"), M, ("manifest",)),
    ("engines.check_fits", "entry", lambda w: check_fits(params(), [5]), M, ("entry 0", "int")),
    ("engines.check_fits", "owner", lambda w: check_fits(params(), [], owner=5), C, ("owner",)),
    (
        "engines.check_fits",
        "complete",
        lambda w: check_fits(params(), [], complete=5),
        C,
        ("complete", "int"),
    ),
    (
        "engines.check_fits",
        "complete-names",
        lambda w: check_fits(params(), [], complete=["w"]),
        C,
        ("complete", "'w'"),
    ),
    ("engines.copy_named", "params", lambda w: copy_named(5, []), C, ("params", "int")),
    ("engines.copy_named", "named", lambda w: copy_named(params(), 5), M, ("named", "int")),
    ("engines.copy_named", "item", lambda w: copy_named(params(), [("w", "x")]), M, ("'w'", "str")),
    (
        "engines.copy_named",
        "unknown",
        lambda w: copy_named(params(), [("v", torch.ones(64))]),
        M,
        ("'v'",),
    ),
    (
        "engines.copy_named",
        "shape",
        lambda w: copy_named(params(), [("w", torch.ones(63))]),
        M,
        ("'w'", "[63]", "[64]"),
    ),
    (
        "engines.copy_named",
        "threads-0",
        lambda w: copy_named(params(), [], threads=0),
        C,
        ("threads", "0"),
    ),
    (
        "engines.copy_named",
        "threads-nan",
        lambda w: copy_named(params(), [], threads=NAN),
        C,
        ("threads", "nan"),
    ),
    (
        "engines.copy_named",
        "threads-huge",
        lambda w: copy_named(params(), [], threads=2**70),
        C,
        ("threads", str(2**70)),
    ),
    ("engines.copy_into", "buckets", lambda w: copy_into(params(), 5), M, ("buckets", "int")),
    ("engines.copy_into", "bucket", lambda w: copy_into(params(), ["x"]), M, ("bucket 0", "str")),
    (
        "engines.copy_into",
        "threads",
        lambda w: copy_into(params(), [w.bucket], threads="2"),
        C,
        ("threads", "'2'"),
    ),
    ("engines.engine_actor", "concurrency", lambda w: engine_actor(max_concurrency=0), C, ("0",)),
    (
        "engines.engine_actor",
        "ray-option",
        lambda w: engine_actor(num_gpus="two"),
        C,
        ("num_gpus",),
    ),
    (
        "engines.tensor_engine_actor",
        "cls",
        lambda w: tensor_engine_actor(int),
        C,
        ("cls", "int"),
    ),
    (
        "engines.tensor_engine_actor",
        "concurrency",
        lambda w: tensor_engine_actor(max_concurrency=NAN),
        C,
        ("max_concurrency", "nan"),
    ),
    ("engines.TensorEngine", "int", lambda w: TensorEngine(3), C, ("params", "int")),
    ("engines.TensorEngine", "value", lambda w: TensorEngine({"w": "x"}), C, ("'w'", "str")),
    ("engines.TensorEngine", "empty", lambda w: TensorEngine({}), C, ("at least one",)),
    ("engines.TensorEngine", "name", lambda w: TensorEngine({"": torch.ones(1)}), C, ("''",)),
    (
        "engines.TensorEngine",
        "meta",
        lambda w: TensorEngine({"w": torch.empty(1, device="meta")}),
        C,
        ("'w'", "meta"),
    ),
    (
        "engines.TensorEngine.check_manifest",
        "str",
        lambda w: w.tensors.check_manifest("x"),
        M,
        ("manifest", "str"),
    ),
    (
        "engines.TensorEngine.apply",
        "buckets",
        lambda w: w.tensors.apply("x", 1),
        M,
        ("buckets", "str"),
    ),
    (
        "engines.TensorEngine.apply",
        "version",
        lambda w: w.tensors.apply([w.bucket], "1"),
        I,
        ("version", "'1'"),
    ),
    (
        "engines.TensorEngine.apply",
        "version-low",
        lambda w: w.tensors.apply([w.bucket], -2),
        I,
        ("version", "-2"),
    ),
    (
        "engines.TensorEngine.apply_changes",
        "buckets",
        lambda w: w.tensors.apply_changes("x", [None], 1),
        M,
        ("buckets", "str"),
    ),
    (
        "engines.TensorEngine.apply_changes",
        "changes",
        lambda w: w.tensors.apply_changes([w.bucket], [], 1),
        M,
        ("0 change lists", "1 buckets"),
    ),
    (
        "engines.TensorEngine.apply_changes",
        "version",
        lambda w: w.tensors.apply_changes([w.bucket], [None], "1"),
        I,
        ("version", "'1'"),
    ),
    (
        "engines.write_changed",
        "params",
        lambda w: write_changed(3, [w.bucket], [None]),
        C,
        ("params", "int"),
    ),
    (
        "engines.write_changed",
        "changes",
        lambda w: write_changed(params(), [w.bucket], "x"),
        M,
        ("changes", "str"),
    ),
    (
        "engines.write_changed",
        "change",
        lambda w: write_changed(params(), [w.bucket], [[1, 2]]),
        M,
        ("changes[0]", "list"),
    ),
    (
        "engines.write_changed",
        "threads",
        lambda w: write_changed(params(), [w.bucket], [None], threads=0),
        C,
        ("threads", "0"),
    ),
    (
        "engines.HFEngine",
        "model-type",
        lambda w: HFEngine("no-such-model-type", {}),
        C,
        ("model_type", "'no-such-model-type'"),
    ),
    ("engines.HFEngine", "model-type-int", lambda w: HFEngine(5, {}), C, ("model_type", "5")),
    ("engines.HFEngine", "config", lambda w: HFEngine("llama", "x"), C, ("config", "'x'")),
    (
        "engines.HFEngine",
        "config-value",
        lambda w: HFEngine("llama", {**TINY_LLAMA, "hidden_size": "x"}),
        C,
        ("'llama'", "hidden_size"),
    ),
    (
        "engines.HFEngine",
        "config-build",  # transformers takes the config; the model cannot be built
        lambda w: HFEngine("llama", {**TINY_LLAMA, "vocab_size": -1}, seed=7, num_threads=1),
        C,
        ("'llama'", "'vocab_size': -1"),
    ),
    (
        "engines.HFEngine",
        "seed",
        lambda w: HFEngine("llama", TINY_LLAMA, seed=-1),
        C,
        ("seed", "-1"),
    ),
    (
        "engines.HFEngine",
        "threads",
        lambda w: HFEngine("llama", TINY_LLAMA, num_threads=0),
        C,
        ("num_threads", "0"),
    ),
    ("engines.HFEngine.generate", "empty", lambda w: w.hf.generate([]), C, ("prompts", "[]")),
    (
        "engines.HFEngine.generate",
        "ragged",
        lambda w: w.hf.generate([[1, 2], [1]]),
        C,
        ("prompts", "lengths [1, 2]"),
    ),
    ("engines.HFEngine.generate", "str", lambda w: w.hf.generate("x"), C, ("prompts", "'x'")),
    ("engines.HFEngine.generate", "row", lambda w: w.hf.generate([[]]), C, ("prompts[0]",)),
    ("engines.HFEngine.generate", "float", lambda w: w.hf.generate([[1.5]]), C, ("1.5",)),
    ("engines.HFEngine.generate", "bool", lambda w: w.hf.generate([[True]]), C, ("True",)),
    ("engines.HFEngine.generate", "negative", lambda w: w.hf.generate([[-1]]), C, ("-1",)),
    (
        "engines.HFEngine.generate",
        "vocab",
        lambda w: w.hf.generate([[10**6]]),
        C,
        ("1000000", "vocabulary"),
    ),
    (
        "engines.HFEngine.generate",
        "new-tokens",
        lambda w: w.hf.generate([[1]], max_new_tokens=-1),
        C,
        ("max_new_tokens", "-1"),
    ),
    (
        "engines.HFEngine.generate",
        "new-tokens-huge",
        lambda w: w.hf.generate([[1]], max_new_tokens=2**70),
        C,
        ("max_new_tokens", str(2**70)),
    ),
    (
        "engines.HFEngine.generate",
        "new-tokens-nan",
        lambda w: w.hf.generate([[1]], max_new_tokens=NAN),
        C,
        ("max_new_tokens", "nan"),
    ),
    ("engines.HFEngine.logits", "empty", lambda w: w.hf.logits([]), C, ("tokens", "[]")),
    ("engines.HFEngine.logits", "ragged", lambda w: w.hf.logits([[1], [1, 2]]), C, ("lengths",)),
    (
        "engines.HFEngine.check_manifest",
        "entry",
        lambda w: w.hf.check_manifest([5]),
        M,
        ("entry 0",),
    ),
    ("engines.HFEngine.apply", "buckets", lambda w: w.hf.apply(None, 1), M, ("buckets", "None")),
    ("engines.HFEngine.apply", "version", lambda w: w.hf.apply([], NAN), I, ("version", "nan")),
]


def test_every_public_callable_has_a_case() -> None:
    cased = {key for key, *_ in LOW_CASES}
    public = public_callables()
    missing = public - cased - NOT_CASED.keys()
    assert not missing, f"public callables without a bad-input case: {sorted(missing)}"
    stale = (cased | NOT_CASED.keys()) - public
    assert not stale, f"cases for callables that are not public (renamed?): {sorted(stale)}"


@pytest.fixture(scope="module")
def hf_engine() -> HFEngine:
    return HFEngine("llama", TINY_LLAMA, seed=1)


@pytest.fixture(scope="module")
def shared_buffer() -> Iterator[SharedBuffer]:
    buffer = SharedBuffer.allocate(4096)
    yield buffer
    buffer.release()


@pytest.mark.parametrize(
    "call, kind, names",
    [
        pytest.param(call, kind, names, id=f"{key}-{case}")
        for key, case, call, kind, names in LOW_CASES
    ],
)
async def test_low_level_entries_refuse_bad_input(
    hf_engine: HFEngine,
    shared_buffer: SharedBuffer,
    call: Callable[[World], Any],
    kind: type[AsyncSyncError],
    names: tuple[str, ...],
) -> None:
    world = World(hf_engine, shared_buffer)
    await world.start()
    before = await world.state()
    with raises_typed(kind, *names):
        result = call(world)
        if hasattr(result, "__aenter__"):
            async with result:
                pass
        elif inspect.isawaitable(result):
            await result
    assert await world.state() == before
    await world.next_valid_calls()
    await world.cache.close()
