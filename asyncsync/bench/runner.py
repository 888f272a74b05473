"""Run the bench on an already started Ray: limits, the serialized baseline, asyncsync.

:func:`run_bench` is the whole measurement. It creates its actors (``num_cpus=0``,
so it fits any cluster size), runs every configuration one after another, kills
the actors of each configuration before the next starts, and returns a
:class:`BenchResult`. It does not start or stop Ray: the CLI wraps it in
:func:`~asyncsync.testing.local_ray`, the tests run it on the session's Ray.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..coordinator import SyncCoordinator
from ..spans import Span
from .actors import bench_engine_actor, bench_trainer_actor
from .baseline import baseline_engine_actor, baseline_trainer_actor
from .limits import DeviceLimits, HostLimits, LagFloor, ObjectStoreLimits, limits_probe_actor
from .machine import machine_info
from .probes import LagSampler, LagSummary, Usage
from .records import BuildBreakdown, EngineRecord, TrainerRecord
from .workload import ModelSpec, format_bytes, llama_spec

__all__ = ["BASELINE", "BenchConfig", "BenchResult", "RunResult", "default_transports", "run_bench"]

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
    """What to run. Every (size, engines) pair runs the baseline and each transport.

    Args:
        sizes: model sizes in bytes (a Llama-style model close to each, see
            :func:`~asyncsync.bench.workload.llama_spec`).
        engines: numbers of engines.
        steps: measured training steps per configuration (K).
        warmup: steps run first and left out of every figure (the cache's
            buffer pool fills over the first two builds; before that, builds
            fault in fresh memory). They still appear in the trace.
        transports: asyncsync transports to measure.
        baseline: also run the serialized baseline.
        bucket_bytes: bucket budget of both designs.
        staleness: the coordinator's staleness bound (asyncsync).
        train_gflop: fixed matmul work per training step.
        seed: weights and compute seed (same in every design).
        limit_bytes: buffer size of the limit measurements.
        profile: measure a build breakdown once per size (first asyncsync run).
        max_inflight_buckets: asyncsync's unacknowledged buckets per engine.
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

    def __post_init__(self) -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError(f"sizes must be positive byte counts, got {self.sizes}")
        if not self.engines or any(n < 1 for n in self.engines):
            raise ValueError(f"engines must be >= 1, got {self.engines}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.transports and not self.baseline:
            raise ValueError("nothing to run: no transports and no baseline")
        if self.bucket_bytes <= 0 or self.limit_bytes <= 0:
            raise ValueError("bucket_bytes and limit_bytes must be positive")


@dataclass
class RunResult:
    """One configuration (design x transport x size x engines), as measured.

    Times are seconds, wall-clock spans are ``time.time()`` seconds. Per-step
    figures cover the measured steps only (``warmup`` <= step < ``warmup`` +
    ``steps``); ``spans`` and ``usage`` cover every step. ``stalls_s``: per step, how long the train loop waited on weight sync (build + sync for the
    baseline; build + staleness wait for asyncsync). ``e2e_s``: per step, from
    the end of its training step until every engine committed it or a newer step.
    ``error`` is set (and most figures empty) when the configuration failed.
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
    engine_receive_s: list[float] = field(default_factory=list)
    engine_apply_s: list[float] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    breakdown: BuildBreakdown | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return BASELINE if self.design == BASELINE else f"asyncsync/{self.transport}"

    @property
    def config_label(self) -> str:
        return f"{format_bytes(self.model_bytes)} x{self.engines}"


@dataclass
class BenchResult:
    """Everything one bench run measured; ``failures`` lists failed correctness checks."""

    config: BenchConfig
    machine: dict[str, Any]
    machine_end: dict[str, Any]
    host_start: HostLimits
    host_end: HostLimits
    object_store: ObjectStoreLimits
    device: DeviceLimits
    lag_floor: LagFloor
    runs: list[RunResult]
    failures: list[str]
    started_at: float
    seconds: float

    @property
    def copy_limit_gbps(self) -> float:
        """The copy limit: mean of the measurements at the start and the end of the run."""
        return (self.host_start.copy_gbps + self.host_end.copy_gbps) / 2

    @property
    def ok(self) -> bool:
        return not self.failures and not any(r.error for r in self.runs)


Log = Callable[[str], None]
StepProgress = Callable[[str, int, int], None]
"""``progress(label, steps_done, steps_total)``: called as each configuration starts
(``steps_done == 0``) and after each of its steps, warm-up steps included."""


async def run_bench(
    config: BenchConfig, *, log: Log | None = None, progress: StepProgress | None = None
) -> BenchResult:
    """Measure the limits, then every configuration of ``config``, on the running Ray.

    Never raises for a failing configuration: its :attr:`RunResult.error` says
    why and the run goes on. Correctness checks (engines hold the trainer's
    weights bit for bit; every design delivered the same weights) are in
    :attr:`BenchResult.failures`. ``log`` gets one line per phase and finished
    configuration; ``progress`` follows the steps inside each configuration.
    """
    say = log or (lambda _: None)
    tick = progress or (lambda label, done, total: None)
    started = time.time()
    machine = await asyncio.to_thread(machine_info)
    probe = limits_probe_actor().remote()
    try:
        say(
            f"limits: copy, checksum and object store with {format_bytes(config.limit_bytes)} buffers"
        )
        host_start = await probe.host.remote(config.limit_bytes)
        store = await _object_store_limits(probe, config.limit_bytes)
        device = await _device_limits(config.limit_bytes)
        lag_floor = await _lag_floor(probe, config.limit_bytes)
        runs: list[RunResult] = []
        total = len(config.sizes) * len(config.engines) * (len(config.transports) + config.baseline)
        for size in config.sizes:
            spec = llama_spec(size)
            say(f"model: {spec.describe()}")
            profiled = False
            for engines in config.engines:
                designs = ([(BASELINE, "torch.save+ray.get")] if config.baseline else []) + [
                    ("asyncsync", t) for t in config.transports
                ]
                for design, transport in designs:
                    profile = config.profile and design != BASELINE and not profiled
                    label = (
                        f"[{len(runs) + 1}/{total}] {format_bytes(spec.nbytes)} x{engines} "
                        f"{BASELINE if design == BASELINE else 'asyncsync/' + transport}"
                    )
                    steps = config.warmup + config.steps
                    tick(label, 0, steps)
                    run = await _run_one(
                        design,
                        transport,
                        spec,
                        size,
                        engines,
                        config,
                        profile,
                        functools.partial(tick, label),
                    )
                    profiled |= run.breakdown is not None
                    runs.append(run)
                    say(f"[{len(runs)}/{total}] {_progress_line(run)}")
        host_end = await probe.host.remote(config.limit_bytes)
    finally:
        await _kill([probe])
    machine_end = await asyncio.to_thread(machine_info)
    return BenchResult(
        config=config,
        machine=machine,
        machine_end=machine_end,
        host_start=host_start,
        host_end=host_end,
        object_store=store,
        device=device,
        lag_floor=lag_floor,
        runs=runs,
        failures=check_delivery(runs),
        started_at=started,
        seconds=time.time() - started,
    )


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


async def _object_store_limits(probe: Any, nbytes: int) -> ObjectStoreLimits:
    reader = limits_probe_actor().remote()
    try:
        put_gbps, fresh_gbps, refs = await probe.put.remote(nbytes)
        get_gbps = await reader.get_copy.remote(refs)
        del refs
        await probe.release.remote()
    finally:
        await _kill([reader])
    return ObjectStoreLimits(nbytes, put_gbps, fresh_gbps, get_gbps)


async def _lag_floor(probe: Any, nbytes: int, seconds: float = 1.0) -> LagFloor:
    """This loop's lag when idle, and while one and two other processes copy memory."""
    other = limits_probe_actor().remote()
    size = min(nbytes, 64 << 20)
    lag = LagSampler()
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
        lag.stop()
        await _kill([other])
    idle, one, two = (lag.summary([w]) for w in ((t0, t1), (t1, t2), (t2, t3)))
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
    """Target for steady-state cache bytes: two snapshots plus one bucket."""
    one_bucket = max(min(bucket_bytes, spec.nbytes), spec.largest_tensor_bytes)
    return 2 * spec.nbytes + one_bucket


async def _run_one(
    design: str,
    transport: str,
    spec: ModelSpec,
    size: int,
    engines: int,
    config: BenchConfig,
    profile: bool,
    stepped: Callable[[int, int], None],
) -> RunResult:
    run = RunResult(
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
    )
    try:
        if design == BASELINE:
            await _run_baseline(run, spec, config, stepped)
        else:
            await _run_asyncsync(run, spec, config, profile, stepped)
    except Exception as exc:
        run.error = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        )
    return run


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
    profile: bool,
    stepped: Callable[[int, int], None],
) -> None:
    trainer = bench_trainer_actor().remote(
        spec, seed=config.seed, bucket_bytes=config.bucket_bytes, train_gflop=config.train_gflop
    )
    engines = {f"engine{i}": bench_engine_actor().remote(spec) for i in range(run.engines)}
    try:
        await asyncio.gather(
            trainer.start_probes.remote(), *(e.reset_probes.remote() for e in engines.values())
        )
        coordinator = SyncCoordinator(
            trainer,
            engines,
            staleness=config.staleness,
            transport=run.transport,
            max_inflight_buckets=config.max_inflight_buckets,
            timeout_s=600.0,
        )
        trained: list[float] = []
        stall_spans: list[Span] = []
        first = config.warmup
        try:
            start_run = time.time()
            for step in range(config.warmup + config.steps):
                if step == first:
                    start_run = time.time()
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
        finally:
            await coordinator.close()
        record: TrainerRecord = await trainer.record.remote(first)
        engine_records: list[EngineRecord] = list(
            await asyncio.gather(*(e.record.remote() for e in engines.values()))
        )
        reports = [r for r in coordinator.reports if r.step >= first]
        for report in reports:
            run.session_gbps.append(report.gbps)
            run.session_s.append(report.seconds)
            run.steps_synced.append(report.step)
        run.session_parts_s = {
            "begin": _median([max(t.begin_s for t in r.targets.values()) for r in reports]),
            "transfer": _median([max(t.transfer_s for t in r.targets.values()) for r in reports]),
            "commit": _median([max(t.commit_s for t in r.targets.values()) for r in reports]),
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
        await _kill([trainer, *engines.values()])


async def _run_baseline(
    run: RunResult, spec: ModelSpec, config: BenchConfig, stepped: Callable[[int, int], None]
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
    run.engine_receive_s = [t for e in engines for step, t in e.receive_s if step >= run.warmup]
    run.engine_apply_s = [t for e in engines for step, t in e.apply_s if step >= run.warmup]


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
