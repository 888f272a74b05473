"""A typed error at every public boundary of the fleet API, naming the offending item.

Each case calls one entry point with one wrong input and checks: the exception is
an :class:`~asyncsync.AsyncSyncError` (the documented subclass), its message names
the offending item (the option, the engine, the value), nothing changed, and the
next valid call succeeds. Constructors and plans are checked in-process; engine
receivers in-process on a real receiver; the train actor, its fleet and the
coordinator on a real local Ray, where a wrong target is a plain object or the
handle of an actor that is not a receiver.

``tests/test_bad_input.py`` covers the cache, buckets and manifests.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import ray
import torch
from _fleet_actors import LightEngine, LightTrainer, engine_class, trainer_class
from _waits import within

from asyncsync import (
    ActorDefinitionError,
    AsyncSyncError,
    BucketCache,
    ConfigError,
    FleetError,
    InvalidStepError,
    ManifestMismatchError,
    PayloadError,
    SessionError,
    SessionIdReusedError,
    SyncCoordinator,
    SyncPlan,
    UnknownSessionError,
    pack,
)
from asyncsync.actor import train_actor
from asyncsync.client import Deadlines
from asyncsync.fleet import EngineFleet, Health

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
            SessionIdReusedError,
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
            ManifestMismatchError,
            ("NoneType",),
        ),
        (
            "manifest-entry",
            lambda: engine.begin("f", 2, [7], 10.0),
            ManifestMismatchError,
            ("entry 0",),
        ),
        (
            "index-str",
            lambda: engine.receive("open", "0", buckets[0]),
            ManifestMismatchError,
            ("'0'",),
        ),
        ("index-out", lambda: engine.receive("open", 4, buckets[0]), ManifestMismatchError, ("4",)),
        ("payload", lambda: engine.receive("open", 0, "bytes"), PayloadError, ("str",)),
        (
            "receive-unknown",
            lambda: engine.receive("nope", 0, buckets[0]),
            UnknownSessionError,
            ("'nope'",),
        ),
        (
            "receive-id-list",
            lambda: engine.receive(["open"], 0, buckets[0]),
            UnknownSessionError,
            ("['open']",),
        ),
        ("commit-unknown", lambda: engine.commit("nope"), UnknownSessionError, ("'nope'",)),
        ("commit-id-list", lambda: engine.commit(["open"]), UnknownSessionError, ("['open']",)),
        ("abort-id-list", lambda: engine.abort(["open"]), UnknownSessionError, ("['open']",)),
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
