"""Run the bench on an already started Ray: limits, the serialized baseline, asyncsync.

:func:`run_bench` measures the limits, then the *designs* section (the baseline
and each transport, fresh actors per configuration) and the *fleet* section
(each commit policy to more and more light engines, then with one engine slowed
down; one set of engine actors, reset between configurations). :func:`run_nodes`
runs the *nodes* section on a multi-node :func:`~asyncsync.testing.local_cluster`.
Actors ask for ``num_cpus=0``, so any cluster size fits. Neither function starts
or stops Ray: the CLI does, the tests run them on the session's Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncsync.coordinator import SyncCoordinator
from asyncsync.fleet import Health
from asyncsync.plan import POLICIES, Outcome, SyncPlan
from asyncsync.spans import Span
from asyncsync.testing.cluster import LocalCluster, StoreWatch
from asyncsync.transport import AUTO, backend

from .actors import bench_engine_actor, bench_trainer_actor
from .baseline import baseline_engine_actor, baseline_trainer_actor
from .limits import (
    DeviceLimits,
    LagFloor,
    MachineLimits,
    ObjectStoreLimits,
    limits_probe_actor,
)
from .machine import machine_info
from .probes import LagSummary, Usage, lag_probe, lag_summary
from .records import BuildBreakdown, EngineRecord, EngineSession, TrainerRecord
from .workload import ModelSpec, format_bytes, llama_spec

__all__ = [
    "BASELINE",
    "DESIGNS",
    "FLEET",
    "NODES",
    "SLOW",
    "BenchConfig",
    "BenchResult",
    "RunResult",
    "add_node_runs",
    "check_delivery",
    "default_transports",
    "run_bench",
    "run_nodes",
]

BASELINE = "baseline"
"""Design name of the serialized baseline (``RunResult.design``)."""


def default_transports() -> tuple[str, ...]:
    """``object_store`` and ``shm``, plus ``collective`` when its module is installed."""
    names = ["object_store", "shm"]
    if importlib.util.find_spec("asyncsync.transport.collective") is not None:
        names.append("collective")
    return tuple(names)


@dataclass(frozen=True)
class BenchConfig:
    """What to run.

    Three sections, each on the same workload. *Designs*: every (size, engines)
    pair runs the baseline and each transport. *Fleet*: for the ``fleet_size``
    model, each commit policy with each of ``fleet_engines`` light engines, then
    (``slow_factor`` > 1) each policy with ``slow_engines`` engines of which one
    is ``slow_factor`` times slower. *Nodes* (only with a multi-node cluster, see
    :func:`run_nodes`): ``node_engines`` engines placed on more and more nodes.
    The fleet and slow-engine rows are off unless asked for (``fleet_engines``,
    ``slow_engines``); ``python -m benchmarks`` asks for them.

    Args:
        sizes: model sizes in bytes (a Llama-style model close to each, see
            :func:`~benchmarks.workload.llama_spec`).
        engines: numbers of engines of the designs section.
        steps: measured training steps per configuration (K).
        warmup: steps run first and left out of every figure (the cache's
            buffer pool fills over the first two builds; before that, builds
            fault in fresh memory). They still appear in the trace.
        transports: asyncsync transports of the designs section.
        baseline: also run the serialized baseline.
        bucket_bytes: bucket budget of both designs.
        staleness: the coordinator's staleness bound (asyncsync).
        train_gflop: fixed matmul work per training step.
        seed: weights and compute seed (same in every design).
        limit_bytes: buffer size of the limit measurements.
        profile: measure a build breakdown once per size (first asyncsync run).
        max_inflight_buckets: asyncsync's unacknowledged buckets per engine.
        fleet_engines: engine counts of the fleet section (empty: no fleet rows).
        policies: commit policies of the fleet, slow-engine and nodes sections.
        fleet_size: model size of the fleet, slow-engine and nodes sections
            (``None``: the smallest of ``sizes``).
        fleet_transport: transport of those sections (``"auto"``: by topology).
        slow_engines: engines of the slow-engine rows, one of them slowed down
            (0: no slow-engine rows).
        slow_factor: how much slower the slowed engine is (> 1).
        node_engines: engines of the nodes section.
    """

    sizes: tuple[int, ...] = (256 << 20, 1 << 30)
    engines: tuple[int, ...] = (1, 2)
    steps: int = 3
    warmup: int = 2
    transports: tuple[str, ...] = field(default_factory=default_transports)
    baseline: bool = True
    bucket_bytes: int = 128 << 20
    staleness: int = 1
    train_gflop: float = 8.0
    seed: int = 0
    limit_bytes: int = 256 << 20
    profile: bool = True
    max_inflight_buckets: int = 2
    fleet_engines: tuple[int, ...] = ()
    policies: tuple[str, ...] = POLICIES
    fleet_size: int | None = None
    fleet_transport: str = "auto"
    slow_engines: int = 0
    slow_factor: float = 10.0
    node_engines: int = 6

    def __post_init__(self) -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError(f"sizes must be positive byte counts, got {self.sizes}")
        if not self.engines or any(n < 1 for n in self.engines):
            raise ValueError(f"engines must be >= 1, got {self.engines}")
        if any(n < 1 for n in self.fleet_engines):
            raise ValueError(f"fleet engines must be >= 1, got {self.fleet_engines}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.transports and not self.baseline and not self.fleet_engines:
            raise ValueError("nothing to run: no transports, no baseline, no fleet rows")
        if self.bucket_bytes <= 0 or self.limit_bytes <= 0:
            raise ValueError("bucket_bytes and limit_bytes must be positive")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ValueError(f"policies must be some of {POLICIES}, got {self.policies}")
        if self.fleet_size is not None and self.fleet_size <= 0:
            raise ValueError(f"fleet_size must be positive, got {self.fleet_size}")
        if self.slow_engines < 0 or (self.slow_engines and not self.slow_factor > 1):
            raise ValueError(
                f"slow_engines must be >= 0 and slow_factor > 1, got {self.slow_engines} "
                f"and {self.slow_factor}"
            )
        if self.node_engines < 1:
            raise ValueError(f"node_engines must be >= 1, got {self.node_engines}")

    @property
    def fleet_bytes(self) -> int:
        """Model size of the fleet, slow-engine and nodes sections."""
        return self.fleet_size if self.fleet_size is not None else min(self.sizes)

    @property
    def slow(self) -> bool:
        """Whether to run the slow-engine rows."""
        return self.slow_engines > 0


DESIGNS, FLEET, SLOW, NODES = "designs", "fleet", "slow", "nodes"
"""Sections of a bench run (``RunResult.section``)."""


@dataclass
class RunResult:
    """One configuration (section x design x transport x policy x size x engines), as measured.

    Times are seconds, wall-clock spans are ``time.time()`` seconds. Per-step
    figures cover the measured steps only (``warmup`` <= step < ``warmup`` +
    ``steps``); ``spans`` and ``usage`` cover every step. ``stalls_s``: per step, how
    long the train loop waited on weight sync (build + sync for the baseline; build
    + staleness wait for asyncsync). ``e2e_s``: per step, from the end of its
    training step until every engine committed it or a newer step.
    ``engine_sessions``: what each engine measured in each measured session it
    committed (the slowed engine left out). ``nodes``: the cluster nodes the engines
    were placed on, round robin (empty: wherever Ray put them, on a one-node Ray). ``slowdown``: how
    much slower ``engine0`` was. ``transports_used``: engine sessions per transport
    (what ``"auto"`` chose). ``left_behind``: measured sessions that returned
    while an engine was still catching up (``per_engine``). ``node_bytes``:
    object-store bytes that arrived on each node during the measured steps
    (nodes section only; see :class:`~asyncsync.testing.StoreWatch`). ``error`` is
    set (and most figures empty) when the configuration failed.
    """

    design: str
    transport: str
    size_bytes: int
    model: str
    model_bytes: int
    engines: int
    steps: int
    warmup: int
    bucket_bytes: int
    resident_bound_bytes: int
    section: str = DESIGNS
    policy: str = "all_or_nothing"
    slowdown: float = 1.0
    nodes: tuple[int, ...] = ()
    stalls_s: list[float] = field(default_factory=list)
    build_wait_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    build_s: list[float] = field(default_factory=list)
    session_s: list[float] = field(default_factory=list)
    session_gbps: list[float] = field(default_factory=list)
    session_parts_s: dict[str, float] = field(default_factory=dict)
    e2e_s: list[float] = field(default_factory=list)
    steps_synced: list[int] = field(default_factory=list)
    ping_ms: list[float] = field(default_factory=list)
    run_s: float = 0.0
    lag: LagSummary | None = None
    other_lag: LagSummary | None = None
    usage: list[Usage] = field(default_factory=list)
    max_lock_hold_s: float = 0.0
    trainer_rss_peak: int = 0
    engine_rss_peak: int = 0
    trainer_private_peak: int = 0
    engine_private_peak: int = 0
    resident_steady_bytes: int = 0
    builds_during_sessions: int = 0
    sessions_during_training: int = 0
    trainer_digest: str = ""
    engine_digests: list[str] = field(default_factory=list)
    engine_versions: list[int | None] = field(default_factory=list)
    engine_sessions: list[EngineSession] = field(default_factory=list)
    transports_used: dict[str, int] = field(default_factory=dict)
    left_behind: int = 0
    node_bytes: tuple[int, ...] = ()
    spans: list[Span] = field(default_factory=list)
    breakdown: BuildBreakdown | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        if self.design == BASELINE:
            return BASELINE
        if self.section == DESIGNS:
            return f"asyncsync/{self.transport}"
        return f"asyncsync/{self.transport} {self.policy}"

    @property
    def config_label(self) -> str:
        label = f"{format_bytes(self.model_bytes)} x{self.engines}"
        if self.slowdown > 1:
            label += f" (1 at 1/{self.slowdown:g} speed)"
        if self.nodes:
            label += f" on nodes {','.join(map(str, self.nodes))}"
        return label

    @property
    def sessions(self) -> int:
        return len(self.session_s)


@dataclass
class BenchResult:
    """Everything one bench run measured; ``failures`` lists failed correctness checks.

    ``node_runs`` are the nodes section's configurations (empty unless the run had
    a multi-node part, see :func:`run_nodes`); ``nodes`` the cluster's node count.
    """

    config: BenchConfig
    machine: dict[str, Any]
    machine_end: dict[str, Any]
    limits: MachineLimits
    runs: list[RunResult]
    failures: list[str]
    started_at: float
    seconds: float
    node_runs: list[RunResult] = field(default_factory=list)
    nodes: int = 1
    delta: Any = None
    """The delta section (a :class:`~benchmarks.delta.DeltaResult`), if it ran."""

    @property
    def copy_limit_gbps(self) -> float:
        return self.limits.copy_gbps

    @property
    def checksum_limit_gbps(self) -> float:
        return self.limits.checksum_gbps

    @property
    def cores(self) -> int:
        return int(self.machine.get("logical_cores") or 1)

    @property
    def all_runs(self) -> list[RunResult]:
        return [*self.runs, *self.node_runs]

    @property
    def ok(self) -> bool:
        delta_ok = self.delta is None or self.delta.ok
        return delta_ok and not self.failures and not any(r.error for r in self.all_runs)


Log = Callable[[str], None]
StepProgress = Callable[[str, int, int], None]
"""``progress(label, steps_done, steps_total)``: called as each configuration starts
(``steps_done == 0``) and after each of its steps, warm-up steps included."""
Stepped = Callable[[int, int], None]


async def run_bench(
    config: BenchConfig, *, log: Log | None = None, progress: StepProgress | None = None
) -> BenchResult:
    """Measure the limits, then the designs and fleet sections of ``config``, on the running Ray.

    Never raises for a failing configuration: its :attr:`RunResult.error` says
    why and the run goes on. Correctness checks (engines hold the trainer's
    weights bit for bit; every design delivered the same weights) are in
    :attr:`BenchResult.failures`. ``log`` gets one line per phase and finished
    configuration; ``progress`` follows the steps inside each configuration.
    The nodes section needs a cluster of its own: :func:`run_nodes`.
    """
    say = log or (lambda _: None)
    tick = progress or (lambda label, done, total: None)
    started = time.time()
    machine = await asyncio.to_thread(machine_info)
    probe, other = limits_probe_actor().remote(), limits_probe_actor().remote()
    try:
        say(
            "limits: copy, checksum and object store with "
            f"{format_bytes(config.limit_bytes)} buffers"
        )
        host_start = await probe.host.remote(config.limit_bytes)
        store = await _object_store_limits(probe, other, config.limit_bytes)
        device = await _device_limits(config.limit_bytes)
        lag_floor = await _lag_floor(probe, other, config.limit_bytes)
        await _kill([other])
        runner = _Runner(config, say, tick, _planned(config))
        for size in config.sizes:
            spec = llama_spec(size)
            say(f"model: {spec.describe()}")
            await runner.designs(spec, size)
        await runner.fleet()
        host_end = await probe.host.remote(config.limit_bytes)
    finally:
        await _kill([probe, other])
    limits = MachineLimits(host_start, host_end, store, device, lag_floor)
    machine_end = await asyncio.to_thread(machine_info)
    runs, failures = runner.runs, check_delivery(runner.runs)
    return BenchResult(
        config, machine, machine_end, limits, runs, failures, started, time.time() - started
    )


async def run_nodes(
    config: BenchConfig,
    cluster: LocalCluster,
    *,
    log: Log | None = None,
    progress: StepProgress | None = None,
) -> list[RunResult]:
    """The nodes section on a running :func:`~asyncsync.testing.local_cluster`.

    The train actor runs on the head (node 0). ``config.node_engines`` engines run,
    for each policy, first all on the head (one node in all), then spread round
    robin over 1, 2, ... of the worker nodes; the object-store bytes that arrive on
    each node during the measured steps are in :attr:`RunResult.node_bytes`.
    Add the result to a :class:`BenchResult` with :func:`add_node_runs`.
    """
    say = log or (lambda _: None)
    tick = progress or (lambda label, done, total: None)
    workers = len(cluster.nodes) - 1
    placements = [(0,)] + [tuple(range(1, k + 1)) for k in range(1, workers + 1)]
    runner = _Runner(config, say, tick, len(placements) * len(config.policies), cluster)
    await runner.nodes(placements)
    return runner.runs


def add_node_runs(result: BenchResult, runs: list[RunResult], nodes: int) -> None:
    """Put the nodes section into ``result`` and check delivery across every run again."""
    result.node_runs = list(runs)
    result.nodes = nodes
    result.failures = check_delivery(result.all_runs)


def _planned(config: BenchConfig) -> int:
    designs = len(config.sizes) * len(config.engines) * (len(config.transports) + config.baseline)
    fleet = len(config.policies) * (len(config.fleet_engines) + config.slow)
    return designs + fleet


class _Runner:
    """Runs the configurations of one section after another; keeps their results in order."""

    def __init__(
        self,
        config: BenchConfig,
        say: Log,
        tick: StepProgress,
        planned: int,
        cluster: LocalCluster | None = None,
    ) -> None:
        self.config = config
        self.say = say
        self.tick = tick
        self.planned = planned
        self.cluster = cluster
        self.runs: list[RunResult] = []

    def _new(
        self, section: str, design: str, transport: str, spec: ModelSpec, size: int, engines: int
    ) -> RunResult:
        config = self.config
        return RunResult(
            design=design,
            transport=transport,
            size_bytes=size,
            model=spec.describe(),
            model_bytes=spec.nbytes,
            engines=engines,
            steps=config.steps,
            warmup=config.warmup,
            bucket_bytes=config.bucket_bytes,
            resident_bound_bytes=_resident_bound(spec, config.bucket_bytes),
            section=section,
        )

    async def _measure(self, run: RunResult, work: Callable[[Stepped], Awaitable[None]]) -> None:
        label = f"[{len(self.runs) + 1}/{self.planned}] {run.config_label} {run.label}"
        steps = self.config.warmup + self.config.steps
        self.tick(label, 0, steps)
        try:
            await work(functools.partial(self.tick, label))
        except Exception as exc:
            text = str(exc).strip()
            run.error = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
        self.runs.append(run)
        self.say(f"[{len(self.runs)}/{self.planned}] {_progress_line(run)}")

    async def designs(self, spec: ModelSpec, size: int) -> None:
        """The baseline and each transport, for each engine count.

        For one engine count, engines are kept across the transports whose engine
        side keeps no state between sessions (no engine-side set-up) and reset
        before each; the others get fresh engines.
        """
        config = self.config
        profiled = False
        for engines in config.engines:
            if config.baseline:
                run = self._new(DESIGNS, BASELINE, "torch.save+ray.get", spec, size, engines)
                await self._measure(run, functools.partial(_run_baseline, run, spec, config))
            pool = _EnginePool(spec)
            try:
                for transport in config.transports:
                    run = self._new(DESIGNS, "asyncsync", transport, spec, size, engines)
                    profile = config.profile and not profiled
                    work = functools.partial(self._designs_run, run, spec, pool, profile)
                    await self._measure(run, work)
                    profiled |= run.breakdown is not None
            finally:
                await pool.close()

    async def _designs_run(
        self, run: RunResult, spec: ModelSpec, pool: _EnginePool, profile: bool, stepped: Stepped
    ) -> None:
        if run.transport == AUTO or backend(run.transport).engine is None:
            handles = await pool.take(run.engines)
            await _run_asyncsync(run, spec, self.config, stepped, handles, profile=profile)
            return
        handles = {f"engine{i}": bench_engine_actor().remote(spec) for i in range(run.engines)}
        try:
            await _run_asyncsync(run, spec, self.config, stepped, handles, profile=profile)
        finally:
            await _kill(list(handles.values()))

    async def fleet(self) -> None:
        """Each policy to more and more light engines, then with one engine slowed down."""
        config = self.config
        if not config.fleet_engines and not config.slow:
            return
        spec = llama_spec(config.fleet_bytes)
        pool = _EnginePool(spec)
        try:
            for policy in config.policies:
                for engines in config.fleet_engines:
                    await self._pooled(FLEET, spec, pool, engines, policy)
            if config.slow:
                for policy in config.policies:
                    await self._pooled(SLOW, spec, pool, config.slow_engines, policy)
        finally:
            await pool.close()

    async def nodes(self, placements: Sequence[tuple[int, ...]]) -> None:
        config = self.config
        spec = llama_spec(config.fleet_bytes)
        pool = _EnginePool(spec, self.cluster)
        try:
            for nodes in placements:
                for policy in config.policies:
                    await self._pooled(NODES, spec, pool, config.node_engines, policy, nodes)
        finally:
            await pool.close()

    async def _pooled(
        self,
        section: str,
        spec: ModelSpec,
        pool: _EnginePool,
        engines: int,
        policy: str,
        nodes: tuple[int, ...] = (),
    ) -> None:
        config = self.config
        run = self._new(
            section, "asyncsync", config.fleet_transport, spec, config.fleet_bytes, engines
        )
        run.policy = policy
        run.nodes = nodes
        run.slowdown = config.slow_factor if section == SLOW else 1.0

        async def work(stepped: Stepped) -> None:
            handles = await pool.take(engines, nodes)
            if run.slowdown > 1:
                await handles["engine0"].set_slowdown.remote(run.slowdown)
            await _run_asyncsync(
                run, spec, config, stepped, handles, cluster=self.cluster, profile=False
            )

        await self._measure(run, work)


class _EnginePool:
    """Engine actors kept across configurations (reset before each), by node."""

    def __init__(self, spec: ModelSpec, cluster: LocalCluster | None = None) -> None:
        self.spec = spec
        self.cluster = cluster
        self._by_node: dict[int | None, list[Any]] = {}

    async def take(self, engines: int, nodes: Sequence[int] = ()) -> dict[str, Any]:
        """``engines`` reset engines named ``engine0``..., placed round robin on ``nodes``."""
        where: list[int | None] = (
            [nodes[i % len(nodes)] for i in range(engines)] if nodes else [None] * engines
        )
        used: dict[int | None, int] = {}
        handles = {}
        for i, node in enumerate(where):
            have = self._by_node.setdefault(node, [])
            k = used.get(node, 0)
            if k == len(have):
                options = self.cluster.placement(node) if self.cluster and node is not None else {}
                have.append(bench_engine_actor(**options).remote(self.spec))
            handles[f"engine{i}"] = have[k]
            used[node] = k + 1
        await asyncio.gather(*(h.reset.remote() for h in handles.values()))
        return handles

    async def close(self) -> None:
        await _kill([h for handles in self._by_node.values() for h in handles])
        self._by_node.clear()


def _progress_line(run: RunResult) -> str:
    head = f"{run.config_label} {run.label}"
    if run.error:
        return f"{head}: FAILED: {run.error}"
    return (
        f"{head}: stall {_median(run.stalls_s) * 1e3:.0f} ms/step, sync "
        f"{_median(run.session_gbps):.2f} GB/s, build {_median(run.build_s) * 1e3:.0f} ms, "
        f"run {run.run_s:.1f} s"
    )


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def _object_store_limits(probe: Any, reader: Any, nbytes: int) -> ObjectStoreLimits:
    """``probe`` puts, ``reader`` (another process) gets and copies out."""
    put_gbps, fresh_gbps, refs = await probe.put.remote(nbytes)
    get_gbps = await reader.get_copy.remote(refs)
    del refs
    await probe.release.remote()
    return ObjectStoreLimits(nbytes, put_gbps, fresh_gbps, get_gbps)


async def _lag_floor(probe: Any, other: Any, nbytes: int, seconds: float = 1.0) -> LagFloor:
    """This loop's lag when idle, and while one and two other processes copy memory."""
    size = min(nbytes, 64 << 20)
    lag = lag_probe()
    try:
        await other.busy_copy.remote(size, 0.0)  # started and ready
        lag.start()
        t0 = time.time()
        await asyncio.sleep(seconds / 2)
        t1 = time.time()
        await probe.busy_copy.remote(size, seconds)
        t2 = time.time()
        await asyncio.gather(
            probe.busy_copy.remote(size, seconds), other.busy_copy.remote(size, seconds)
        )
        t3 = time.time()
    finally:
        await lag.stop()
    idle, one, two = (lag_summary(lag, [w]) for w in ((t0, t1), (t1, t2), (t2, t3)))
    return LagFloor(idle.p99_ms, one.p99_ms, two.p99_ms, idle.max_ms, one.max_ms, two.max_ms)


async def _device_limits(nbytes: int) -> DeviceLimits:
    import ray

    gpus = (await asyncio.to_thread(ray.cluster_resources)).get("GPU", 0)
    if gpus < 1:
        return DeviceLimits(
            nbytes,
            skipped="no GPU in this Ray cluster; device-to-host build bandwidth not measured",
        )
    probe = limits_probe_actor(num_gpus=1).remote()
    try:
        result: DeviceLimits = await probe.device_to_host.remote(nbytes)
        return result
    finally:
        await _kill([probe])


async def _kill(handles: Sequence[Any]) -> None:
    import ray

    def kill_all() -> None:
        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:  # already dead: nothing to clean up
                pass

    await asyncio.to_thread(kill_all)


def _resident_bound(spec: ModelSpec, bucket_bytes: int) -> int:
    """Target for steady-state cache bytes: three snapshots plus one bucket.

    With sessions overlapping builds (staleness >= 1) the cache holds, by design
    (see the versioned-reads concept page): the ready snapshot, the pool the next
    build writes into, and the superseded snapshot a session still streams.
    """
    one_bucket = max(min(bucket_bytes, spec.nbytes), spec.largest_tensor_bytes)
    return 3 * spec.nbytes + one_bucket


async def _ping_during(handle: Any, delay_s: float = 0.005) -> float:
    """Milliseconds an actor takes to answer a no-op call sent ``delay_s`` into a build."""
    await asyncio.sleep(delay_s)
    start = time.perf_counter()
    await handle.ping.remote()
    return (time.perf_counter() - start) * 1e3


async def _run_asyncsync(
    run: RunResult,
    spec: ModelSpec,
    config: BenchConfig,
    stepped: Stepped,
    engines: Mapping[str, Any],
    *,
    profile: bool,
    cluster: LocalCluster | None = None,
) -> None:
    options = cluster.placement(0) if cluster is not None else {}
    trainer = bench_trainer_actor(**options).remote(
        spec, seed=config.seed, bucket_bytes=config.bucket_bytes, train_gflop=config.train_gflop
    )
    try:
        await asyncio.gather(
            trainer.start_probes.remote(), *(e.reset_probes.remote() for e in engines.values())
        )
        coordinator = SyncCoordinator(
            trainer,
            dict(engines),
            staleness=config.staleness,
            plan=SyncPlan(
                transport=run.transport,
                policy=run.policy,
                max_inflight_buckets=config.max_inflight_buckets,
                timeout_s=600.0,
                # These rows measure moving whole snapshots (the delta section
                # measures deltas): the default would send deltas across nodes.
                delta="never",
            ),
        )
        trained: list[float] = []
        stall_spans: list[Span] = []
        first = config.warmup
        last = config.warmup + config.steps - 1
        watch: _StoreWatch | None = None
        try:
            start_run = time.time()
            for step in range(config.warmup + config.steps):
                if step == first:
                    start_run = time.time()
                    if cluster is not None:
                        watch = await _StoreWatch.start(cluster)
                await trainer.train_step.remote(step)
                trained.append(time.time())
                wall = time.time()
                start = time.perf_counter()
                pinger = asyncio.create_task(_ping_during(trainer))
                try:
                    await trainer.build_cpu_bucket_cache.remote(step)
                    built = time.perf_counter()
                    waited = await coordinator.after_build(step)
                    ping_ms = await pinger
                finally:
                    pinger.cancel()
                stall_spans.append(Span("stall", step, wall, wall + built - start + waited))
                if step >= first:
                    run.build_wait_s.append(built - start)
                    run.stalls_s.append(built - start + waited)
                    run.ping_ms.append(ping_ms)
                stepped(step + 1, config.warmup + config.steps)
            await coordinator.drain()
            run.run_s = time.time() - start_run
            if watch is not None:
                run.node_bytes = await watch.stop()
                watch = None
            # The train loop's sessions; those that only bring a straggler up to date
            # after it ended are not part of the figures.
            reports = [r for r in coordinator.reports if first <= r.step <= last]
            await _until_all_serve(coordinator, last)
        finally:
            if watch is not None:
                await watch.stop()
            await coordinator.close()
        record: TrainerRecord = await trainer.record.remote(first)
        engine_records: list[EngineRecord] = list(
            await asyncio.gather(*(e.record.remote() for e in engines.values()))
        )
        for report in reports:
            run.session_gbps.append(report.gbps)
            run.session_s.append(report.seconds)
            run.steps_synced.append(report.step)
            for engine in report.engines.values():
                run.transports_used[engine.transport] = (
                    run.transports_used.get(engine.transport, 0) + 1
                )
            run.left_behind += any(
                t.outcome is Outcome.CATCHING_UP for t in report.engines.values()
            )
        run.session_parts_s = {
            "begin": _median([max(t.begin_s for t in r.engines.values()) for r in reports]),
            "transfer": _median([max(t.transfer_s for t in r.engines.values()) for r in reports]),
            "commit": _median([max(t.commit_s for t in r.engines.values()) for r in reports]),
        }
        committed = sorted((r.started_at + r.pin_wait_s + r.seconds, r.step) for r in reports)
        run.e2e_s = [
            next((at for at, step in committed if step >= s), float("nan")) - trained[s]
            for s in range(first, first + config.steps)
        ]
        _fill_common(run, record, engine_records, stall_spans)
        run.lag = record.build_lag
        run.other_lag = record.other_lag
        if profile:
            builds = [s for s in record.spans if s.kind == "build"]
            first_s = builds[0].end - builds[0].start if builds else float("nan")
            run.breakdown = await trainer.profile_build.remote(
                config.warmup + config.steps, first_s
            )
    finally:
        with contextlib.suppress(Exception):
            await trainer.close.remote()
        await _kill([trainer])


async def _until_all_serve(
    coordinator: SyncCoordinator, step: int, timeout_s: float = 120.0
) -> None:
    """Return once every engine of the fleet serves ``step``.

    ``drain`` waits for the serving engines only: under ``per_engine`` an engine
    left behind (slow) finishes in the background, and may then serve an older
    step; this syncs again until it serves ``step`` too.
    """
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                view = await coordinator.refresh()
                behind = [s for s in view.engines.values() if s.version != step]
                if not behind:
                    return
                if all(s.health is not Health.SERVING for s in behind):
                    await asyncio.sleep(0.1)  # still catching up in the background
                else:
                    await coordinator.sync(min_step=step)
    except TimeoutError:
        raise TimeoutError(
            f"engines did not all serve step {step} within {timeout_s:g}s: {coordinator.view!r}"
        ) from None


class _StoreWatch:
    """:meth:`LocalCluster.watch_store` entered and left off the event loop (it blocks)."""

    def __init__(self, manager: Any, watch: StoreWatch) -> None:
        self._manager = manager
        self._watch = watch

    @classmethod
    async def start(cls, cluster: LocalCluster) -> _StoreWatch:
        manager = cluster.watch_store()
        return cls(manager, await asyncio.to_thread(manager.__enter__))

    async def stop(self) -> tuple[int, ...]:
        await asyncio.to_thread(self._manager.__exit__, None, None, None)
        return self._watch.risen


async def _run_baseline(
    run: RunResult, spec: ModelSpec, config: BenchConfig, stepped: Stepped
) -> None:
    trainer = baseline_trainer_actor().remote(
        spec, seed=config.seed, bucket_bytes=config.bucket_bytes, train_gflop=config.train_gflop
    )
    engines = [baseline_engine_actor().remote(spec) for _ in range(run.engines)]
    try:
        await asyncio.gather(
            trainer.start_probes.remote(), *(e.reset_probes.remote() for e in engines)
        )
        stall_spans: list[Span] = []
        first = config.warmup
        start_run = time.time()
        for step in range(config.warmup + config.steps):
            if step == first:
                start_run = time.time()
            await trainer.train_step.remote(step)
            trained = time.time()
            start = time.perf_counter()
            pinger = asyncio.create_task(_ping_during(trainer))
            try:
                await trainer.build_cache.remote(step)
                built = time.perf_counter()
                sent = await trainer.sync_weights.remote(engines)
                done = time.perf_counter()
                ping_ms = await pinger
            finally:
                pinger.cancel()
            stall_spans.append(Span("stall", step, trained, trained + done - start))
            if step >= first:
                run.build_wait_s.append(built - start)
                run.stalls_s.append(done - start)
                run.e2e_s.append(time.time() - trained)
                run.steps_synced.append(sent)
                run.ping_ms.append(ping_ms)
            stepped(step + 1, config.warmup + config.steps)
        run.run_s = time.time() - start_run
        record: TrainerRecord = await trainer.record.remote(first)
        engine_records: list[EngineRecord] = list(
            await asyncio.gather(*(e.record.remote() for e in engines))
        )
        sessions = [s for s in record.spans if s.kind == "session" and (s.step or 0) >= first]
        run.session_s = [s.end - s.start for s in sessions]
        run.session_gbps = [spec.nbytes / d / 1e9 for d in run.session_s if d > 0]
        run.session_parts_s = {"serialize+send+apply": _median(run.session_s)}
        _fill_common(run, record, engine_records, stall_spans)
    finally:
        await _kill([trainer, *engines])


def _fill_common(
    run: RunResult, record: TrainerRecord, engines: list[EngineRecord], stall_spans: list[Span]
) -> None:
    spans = [s for s in record.spans if s.ok]

    def measured(kind: str) -> list[Span]:
        return [s for s in spans if s.kind == kind and (s.step or 0) >= run.warmup]

    builds, sessions = measured("build"), measured("session")
    run.train_s = [s.end - s.start for s in measured("train")]
    run.build_s = [s.end - s.start for s in builds]
    run.spans = sorted(spans + stall_spans, key=lambda s: s.start)
    run.usage = record.usage
    run.builds_during_sessions = sum(1 for b in builds if any(b.overlaps(s) for s in sessions))
    run.sessions_during_training = sum(
        1 for s in sessions if any(t.overlaps(s) for t in measured("train"))
    )
    run.max_lock_hold_s = record.max_lock_hold_s
    run.trainer_rss_peak = record.rss_peak
    run.engine_rss_peak = max((e.rss_peak for e in engines), default=0)
    run.trainer_private_peak = record.private_peak
    run.engine_private_peak = max((e.private_peak for e in engines), default=0)
    # Steady state: once the warm-up builds are done and the pool holds a snapshot.
    warm = [s for s in spans if s.kind == "build" and (s.step or 0) == run.warmup - 1]
    since = warm[0].end if warm else float("-inf")
    steady = [b for t, b in record.resident if t >= since]
    run.resident_steady_bytes = max(steady, default=0)
    run.trainer_digest = record.digest
    run.engine_digests = [e.digest for e in engines]
    run.engine_versions = [e.version for e in engines]
    # The slowed engine's sessions measure the slowdown, not the engine.
    counted = engines[1:] if run.slowdown > 1 else engines
    run.engine_sessions = [s for e in counted for s in e.sessions if s.step >= run.warmup]


def check_delivery(runs: Sequence[RunResult]) -> list[str]:
    """Correctness of what was delivered; one message per failed check.

    Every engine of every configuration serves the last step and holds the
    trainer's weights bit for bit, and every design trained the same weights for
    a given model size (so all engines of that size hold identical bytes).
    """
    failures = []
    by_size: dict[int, set[str]] = {}
    for run in runs:
        if run.error:
            continue
        where = f"{run.config_label} {run.label}"
        for i, (version, digest) in enumerate(
            zip(run.engine_versions, run.engine_digests, strict=True)
        ):
            last = run.warmup + run.steps - 1
            if version != last:
                failures.append(f"{where}: engine{i} serves version {version}, expected {last}")
            if digest != run.trainer_digest:
                failures.append(
                    f"{where}: engine{i} weights {digest} != trainer's {run.trainer_digest}"
                )
        by_size.setdefault(run.model_bytes, set()).add(run.trainer_digest)
    for nbytes, digests in by_size.items():
        if len(digests) > 1:
            failures.append(
                f"{format_bytes(nbytes)}: the designs trained different weights ({sorted(digests)})"
            )
    return failures
