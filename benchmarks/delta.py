"""The bench's delta-sync section: what a real optimizer step changes, and what delta sessions save.

Three parts, each answering one question:

- *Changed fraction* (:func:`measure_changed_fraction`, in this process, no Ray): a
  transformers ``LlamaForCausalLM`` (built from a config, no download) trains with
  ``torch.optim.AdamW`` on fp32 master weights with a causal-LM loss on random
  tokens; the served weights are the master weights cast to bf16 after each step
  (as Megatron's mixed precision serves them). For each learning rate, after a few
  warm-up steps: the share of bf16 elements that differ between consecutive served
  snapshots, and the library's own delta encoding (:func:`asyncsync.delta.encode_bucket`
  on :func:`asyncsync.buckets.pack` buckets) against the full bytes.
- *Sessions* (:func:`run_delta`, on the running Ray): a train actor whose step changes
  a given share of its bf16 words (sparse, spread over every tensor; the shares
  measured at lr 1e-6 and 1e-5 by default) syncs the bench's engines, per transport
  and engine count, once with deltas (``delta_sync=True``, ``SyncPlan(delta="always")``)
  and once with full snapshots only (``delta_sync=False``, ``delta="never"``): session
  time, engine apply time, bytes sent per engine, and the trainer's build time (its
  stall).
- *Nodes* (:func:`run_delta_nodes`, on a multi-node local cluster): the object-store
  session, delta against full, with the engines spread over the worker nodes.

The train loop: step ``s`` trains (only the sparse change) and builds, then session
``s`` runs, and step ``s + 1`` starts once it ended, as when a train step on an
accelerator outlasts a session; the session waits for its step's delta, computed
after the build returned. With ``overlap`` (``--delta-overlap``) the loop overlaps
like the designs section's with staleness 1 instead: each build runs while the
previous session streams and its delta is computed, the worst case for the stall
on a machine whose cores the trainer, the engines and the delta share.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncsync import Deadlines
from asyncsync.actor import WeightSyncActor, train_actor
from asyncsync.plan import SyncPlan
from asyncsync.transport import backend

from .workload import ModelSpec, combined_digest, format_bytes, llama_spec, materialize

__all__ = [
    "DeltaConfig",
    "DeltaResult",
    "FractionRow",
    "SessionRow",
    "delta_markdown",
    "delta_summary_lines",
    "measure_changed_fraction",
    "run_delta",
    "run_delta_nodes",
]

DEFAULT_FRACTION = 0.02
"""Changed share of the sessions' steps when neither learning rate of FRACTION_LRS was
measured."""
FRACTION_LRS = (1e-6, 1e-5)
"""The learning rates whose measured changed fractions the sessions use by default (the
RL range: a small and a large one)."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class DeltaConfig:
    """What the delta section runs (see the module docstring).

    Args:
        lrs: learning rates of the changed-fraction part (empty: skip it).
        hidden, layers, vocab: the transformers Llama model of that part
            (``intermediate`` = 2.6875 x hidden, heads of 64, 4 query heads per KV head).
        batch, seq: random tokens per training step.
        lr_warmup: optimizer steps before measuring (Adam's first steps are large).
        lr_steps: measured optimizer steps (consecutive snapshot pairs) per rate.
        pack_bytes: bucket size of the encoding measurement.
        size: model size of the sessions (a :func:`~benchmarks.workload.llama_spec` model).
        fractions: shares of 2-byte words each training step changes, one set of
            sessions each (``None``: the changed fractions measured at the learning
            rates of :data:`FRACTION_LRS`, else 2%).
        engines: engine counts of the sessions part (empty: skip it).
        transports: transports of the sessions part.
        warmup: unmeasured sessions first (the store's first publish only takes
            its base; an engine keeps a base once a delta was offered to it, and
            takes deltas from the session after: three warm-up sessions).
        steps: measured sessions per configuration.
        bucket_bytes: the train actor's bucket size.
        node_engines: engines of the nodes part.
        seed: weights, tokens and changed positions.
        overlap: build each step while the previous session streams (a train step
            of no compute, the stall's worst case) instead of after it ended.
    """

    lrs: tuple[float, ...] = (1e-6, 1e-5, 1e-4)
    hidden: int = 512
    layers: int = 8
    vocab: int = 32000
    batch: int = 2
    seq: int = 64
    lr_warmup: int = 2
    lr_steps: int = 2
    pack_bytes: int = 64 << 20
    size: int = 256 << 20
    fractions: tuple[float, ...] | None = None
    engines: tuple[int, ...] = (1,)
    transports: tuple[str, ...] = ("shm", "object_store", "collective")
    warmup: int = 3
    steps: int = 3
    overlap: bool = False
    bucket_bytes: int = 128 << 20
    node_engines: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"learning rates must be positive, got {self.lrs}")
        if self.fractions is not None and (
            not self.fractions or any(not 0 < f <= 1 for f in self.fractions)
        ):
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        if any(n < 1 for n in self.engines) or self.node_engines < 1:
            raise ValueError(f"engine counts must be >= 1, got {self.engines}")
        if self.steps < 1 or self.lr_steps < 1 or self.warmup < 0 or self.lr_warmup < 0:
            raise ValueError("steps must be >= 1 and warm-up steps >= 0")
        if min(self.size, self.bucket_bytes, self.pack_bytes, self.hidden, self.layers) <= 0:
            raise ValueError("sizes must be positive")


@dataclass
class FractionRow:
    """One learning rate of the changed-fraction part (per measured step)."""

    lr: float
    params: int
    loss: list[float] = field(default_factory=list)
    changed: list[float] = field(default_factory=list)  # share of bf16 elements that changed
    delta_bytes: list[int] = field(default_factory=list)
    full_bytes: int = 0
    sparse_buckets: int = 0
    bitmap_buckets: int = 0
    dense_buckets: int = 0
    encode_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Delta bytes over full bytes (median over the measured steps)."""
        return _median(self.delta_bytes) / self.full_bytes if self.full_bytes else float("nan")


@dataclass
class SessionRow:
    """One configuration of the sessions (or nodes) part, as measured.

    ``mode``: ``"delta"`` (``delta_sync=True``, ``plan_delta`` as the plan's) or
    ``"full"`` (``delta_sync=False``, ``delta="never"``). Per measured session:
    ``session_s`` (the report's seconds), ``build_s`` (the train actor's build, the
    stall), ``delta_engines`` (engines sent the delta); per engine and session:
    ``apply_s`` (the receiver's ``apply_s`` of that commit: the patch and its check
    included) and ``sent_bytes``. ``compute_s``/``changed``/``delta_bytes``/
    ``resident_bytes``: the train actor's :meth:`delta_stats` after each session.
    """

    transport: str
    engines: int
    mode: str
    plan_delta: str
    model_bytes: int
    fraction: float = DEFAULT_FRACTION
    nodes: tuple[int, ...] = ()
    session_s: list[float] = field(default_factory=list)
    build_s: list[float] = field(default_factory=list)
    delta_engines: list[int] = field(default_factory=list)
    apply_s: list[float] = field(default_factory=list)
    sent_bytes: list[int] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    changed: list[float] = field(default_factory=list)
    delta_bytes: list[int] = field(default_factory=list)
    resident_bytes: int = 0
    snapshot_bytes: int = 0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    error: str | None = None

    @property
    def delta_session_s(self) -> list[float]:
        """Seconds of the sessions that carried the delta to every engine."""
        return [t for t, n in zip(self.session_s, self.delta_engines, strict=True) if n]

    @property
    def config_label(self) -> str:
        """Transport, engines, nodes and changed share (what a full and a delta row share)."""
        where = f" on nodes {','.join(map(str, self.nodes))}" if self.nodes else ""
        return f"{self.transport} x{self.engines}{where} @{self.fraction * 100:.2f}%"

    @property
    def label(self) -> str:
        return f"{self.config_label} {self.mode}"


@dataclass
class DeltaResult:
    """Everything the delta section measured; ``fractions`` are what the sessions used
    (each with where it came from)."""

    config: DeltaConfig
    fractions: list[tuple[float, str]] = field(default_factory=list)
    fraction_rows: list[FractionRow] = field(default_factory=list)
    session_rows: list[SessionRow] = field(default_factory=list)
    node_rows: list[SessionRow] = field(default_factory=list)
    model: str = ""
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        rows = [*self.session_rows, *self.node_rows]
        return not self.failures and not any(r.error for r in rows)


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _load() -> tuple[float, float, float]:
    a, b, c = os.getloadavg()
    return (a, b, c)


# ------------------------------------------------------------------ (a) changed fraction


def measure_changed_fraction(config: DeltaConfig, log: Log | None = None) -> list[FractionRow]:
    """Train a small transformers Llama with AdamW per learning rate; measure each step's delta.

    Blocking (seconds to a minute on two cores at the defaults). Every rate starts
    from the same initial weights and the same token stream.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from asyncsync.buckets import pack
    from asyncsync.delta import encode_bucket
    from asyncsync.sharedmem import SharedBuffer

    say = log or (lambda _: None)
    torch.manual_seed(config.seed)
    heads = max(1, config.hidden // 64)
    llama = LlamaConfig(
        hidden_size=config.hidden,
        intermediate_size=(int(config.hidden * 2.6875) + 63) // 64 * 64,
        num_hidden_layers=config.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        vocab_size=config.vocab,
        max_position_embeddings=max(config.seq, 128),
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(llama)  # fp32 master weights
    model.train()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = sum(p.numel() for p in model.parameters())
    say(
        f"delta: changed fraction on a real AdamW step: transformers Llama h={config.hidden} "
        f"layers={config.layers} vocab={config.vocab}, {params / 1e6:.0f}M params "
        f"({format_bytes(2 * params)} in bf16), batch {config.batch}x{config.seq} tokens"
    )

    def served() -> list[tuple[str, torch.Tensor]]:
        return [(n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters()]

    rows = []
    for lr in config.lrs:
        model.load_state_dict(initial)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)  # weight decay 0.01
        tokens = torch.Generator().manual_seed(config.seed + 1)
        row = FractionRow(lr=lr, params=params)
        previous: list[tuple[str, torch.Tensor]] | None = None
        for step in range(config.lr_warmup + config.lr_steps + 1):
            start = time.perf_counter()
            ids = torch.randint(0, config.vocab, (config.batch, config.seq), generator=tokens)
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            took = time.perf_counter() - start
            now = served()
            # Step lr_warmup gives the first snapshot of a measured pair.
            if step > config.lr_warmup and previous is not None:
                row.loss.append(loss.item())
                row.step_s.append(took)
                changed = sum(
                    int((a.view(torch.int16) != b.view(torch.int16)).sum())
                    for (_, a), (_, b) in zip(previous, now, strict=True)
                )
                row.changed.append(changed / params)
                old_buckets, new_buckets = (
                    pack(previous, config.pack_bytes),
                    pack(now, config.pack_bytes),
                )
                nbytes = 0
                buffers: list[Any] = []
                start = time.perf_counter()
                try:
                    for old, new in zip(old_buckets, new_buckets, strict=True):
                        kind, delta, _, buffer = encode_bucket(
                            old.buffer, new, SharedBuffer.allocate
                        )
                        if buffer is not None:
                            buffers.append(buffer)
                        nbytes += delta.nbytes
                        row.sparse_buckets += kind == "sparse"
                        row.bitmap_buckets += kind == "bitmap"
                        row.dense_buckets += kind == "dense"
                    row.encode_s.append(time.perf_counter() - start)
                finally:
                    for buffer in buffers:
                        buffer.release()
                row.delta_bytes.append(nbytes)
                row.full_bytes = sum(b.nbytes for b in new_buckets)
            previous = now
        rows.append(row)
        say(
            f"delta: lr {lr:g}: {_median(row.changed) * 100:.2f}% of bf16 elements changed per "
            f"step, delta {row.ratio * 100:.1f}% of the full bytes"
        )
    return rows


def session_fractions(config: DeltaConfig, rows: Sequence[FractionRow]) -> list[tuple[float, str]]:
    """The sessions' changed shares: the configured ones, else those measured at the
    learning rates of :data:`FRACTION_LRS`, else 2%."""
    if config.fractions is not None:
        return [(f, "given") for f in config.fractions]
    found = [
        (_median(row.changed), f"measured at lr {row.lr:g}")
        for lr in FRACTION_LRS
        for row in rows
        if abs(row.lr - lr) < 1e-12 and row.changed
    ]
    return found or [(DEFAULT_FRACTION, "fixed")]


# ------------------------------------------------------------------ (b) sessions


class DeltaTrainer(WeightSyncActor):
    """A train rank whose step changes ``fraction`` of its 2-byte words at random positions.

    Each step XORs the lowest bit of ``fraction`` x words of every tensor (positions
    drawn anew each step from ``seed``), so every bucket changes sparsely, as a
    bf16 model served from fp32 master weights does.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        seed: int,
        bucket_bytes: int,
        fraction: float,
        delta_sync: bool,
    ) -> None:
        super().__init__(
            bucket_bytes=bucket_bytes,
            delta_sync=delta_sync,
            metrics=False,
            # Only the bench's sessions move engines: the keeper probes rarely.
            deadlines=Deadlines(probe_interval_s=600.0),
        )
        torch.set_num_threads(1)
        self.weights = materialize(spec, seed)
        self.fraction = fraction
        self.generator = torch.Generator().manual_seed(seed + 7)

    def named_weights(self, step: int) -> list[tuple[str, torch.Tensor]]:
        return list(self.weights.items())

    async def train_step(self, step: int) -> None:
        """The sparse change of ``step``, off the loop."""
        await asyncio.to_thread(self._change)

    def _change(self) -> None:
        with torch.no_grad():
            for tensor in self.weights.values():
                words = tensor.view(-1).view(torch.int16)
                k = max(1, round(self.fraction * words.numel()))
                index = torch.randint(0, words.numel(), (k,), generator=self.generator)
                words[index] = words[index] ^ 1

    async def timed_build(self, step: int) -> float:
        """Build ``step``; the seconds it took, seen on this actor."""
        start = time.perf_counter()
        await self.build_cpu_bucket_cache(step)
        return time.perf_counter() - start

    async def digest(self) -> str:
        """One digest of the live weights (engines must hold the same)."""
        from .workload import weight_digests

        return combined_digest(await asyncio.to_thread(weight_digests, self.weights))


def delta_trainer_actor(**ray_options: Any) -> Any:
    """The remote :class:`DeltaTrainer` class (async, no CPU reserved)."""
    return train_actor(DeltaTrainer, max_concurrency=16, num_cpus=0, **ray_options)


async def run_delta(
    config: DeltaConfig,
    *,
    log: Log | None = None,
    fraction_rows: Sequence[FractionRow] | None = None,
) -> DeltaResult:
    """The changed-fraction part (unless ``fraction_rows`` are given), then the sessions
    part on the running Ray. Never raises for a failing configuration (its ``error``)."""
    say = log or (lambda _: None)
    started = time.time()
    result = DeltaResult(config, load_start=_load())
    if fraction_rows is None:
        fraction_rows = (
            await asyncio.to_thread(measure_changed_fraction, config, say) if config.lrs else []
        )
    result.fraction_rows = list(fraction_rows)
    result.fractions = session_fractions(config, result.fraction_rows)
    if config.engines:
        spec = llama_spec(config.size)
        result.model = spec.describe()
        shares = ", ".join(f"{f * 100:.2f}% ({why})" for f, why in result.fractions)
        say(f"delta: sessions of {format_bytes(spec.nbytes)}, words changed per step: {shares}")
        from .runner import _EnginePool

        pool = _EnginePool(spec)
        try:
            for fraction, _ in result.fractions:
                for engines in config.engines:
                    for transport in config.transports:
                        for mode in ("full", "delta"):
                            row = SessionRow(
                                transport,
                                engines,
                                mode,
                                # "auto" sends deltas across nodes only, up to a size:
                                # "always" measures the delta wherever it would go.
                                "always" if mode == "delta" else "never",
                                spec.nbytes,
                                fraction,
                            )
                            await _measure(row, spec, config, result, pool, say)
        finally:
            await pool.close()
    result.failures = _check(result.session_rows)
    result.load_end = _load()
    result.seconds = time.time() - started
    return result


async def run_delta_nodes(
    config: DeltaConfig, cluster: Any, result: DeltaResult, *, log: Log | None = None
) -> None:
    """The nodes part on a running local cluster: object-store sessions, delta and full,
    the train actor on the head, ``config.node_engines`` engines round robin on the workers."""
    say = log or (lambda _: None)
    from .runner import _EnginePool

    spec = llama_spec(config.size)
    workers = tuple(range(1, len(cluster.nodes)))
    if not workers:
        return
    pool = _EnginePool(spec, cluster)
    try:
        for fraction, _ in result.fractions or [(DEFAULT_FRACTION, "fixed")]:
            for mode in ("full", "delta"):
                row = SessionRow(
                    "object_store",
                    config.node_engines,
                    mode,
                    "always" if mode == "delta" else "never",
                    spec.nbytes,
                    fraction,
                    nodes=workers,
                )
                await _measure(row, spec, config, result, pool, say, cluster=cluster)
    finally:
        await pool.close()
    result.failures = _check([*result.session_rows, *result.node_rows])


async def _measure(
    row: SessionRow,
    spec: ModelSpec,
    config: DeltaConfig,
    result: DeltaResult,
    pool: Any,
    say: Log,
    cluster: Any = None,
) -> None:
    from .runner import _EnginePool

    # Engines that set up transport state with their train actor start fresh.
    fresh = backend(row.transport).engine is not None
    own = _EnginePool(spec, cluster) if fresh else None
    try:
        handles = await (own or pool).take(row.engines, row.nodes)
        await _sessions(row, spec, config, row.fraction, handles, cluster)
    except Exception as exc:
        text = str(exc).strip()
        row.error = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
    finally:
        if own is not None:
            await own.close()
    (result.node_rows if row.nodes else result.session_rows).append(row)
    say(f"delta: {_line(row)}")


async def _sessions(
    row: SessionRow,
    spec: ModelSpec,
    config: DeltaConfig,
    fraction: float,
    engines: Mapping[str, Any],
    cluster: Any,
) -> None:
    from .runner import _kill

    options = cluster.placement(0) if cluster is not None else {}
    trainer = delta_trainer_actor(**options).remote(
        spec,
        seed=config.seed,
        bucket_bytes=config.bucket_bytes,
        fraction=fraction,
        delta_sync=row.mode == "delta",
    )
    names = list(engines)
    try:
        for name, handle in engines.items():
            await trainer.fleet_add.remote(name, handle)
        plan_base = SyncPlan(transport=row.transport, delta=row.plan_delta, timeout_s=600.0)
        previous: asyncio.Task[None] | None = None
        seen: dict[int, Any] = {}
        total = config.warmup + config.steps

        async def start(step: int) -> asyncio.Task[None]:
            """Submit the session of ``step`` now (it pins ``step`` before the next build
            publishes); the task awaits and records it."""
            before = await asyncio.gather(*(engines[n].receiver_stats.remote() for n in names))
            plan = SyncPlan(
                transport=plan_base.transport,
                delta=plan_base.delta,
                timeout_s=plan_base.timeout_s,
                min_step=step,
            )
            return asyncio.create_task(finish(step, before, trainer.run_sync_session.remote(plan)))

        async def finish(step: int, before: list[Any], ref: Any) -> None:
            report = await ref
            after = await asyncio.gather(*(engines[n].receiver_stats.remote() for n in names))
            if report.step != step or set(report.committed) != set(names):
                raise RuntimeError(
                    f"session of step {step} sent step {report.step}, committed "
                    f"{sorted(report.committed)} of {names}"
                )
            if step < config.warmup:
                return
            row.session_s.append(report.seconds)
            row.snapshot_bytes = report.nbytes
            row.delta_engines.append(sum(e.delta for e in report.engines.values()))
            row.sent_bytes += [report.engines[n].sent_bytes for n in names]
            row.apply_s += [a.apply_s - b.apply_s for a, b in zip(after, before, strict=True)]
            # The next step's delta may already be computed: keep each step's own.
            stats = await trainer.delta_stats.remote()
            if stats is not None and stats.step is not None:
                seen.setdefault(stats.step, stats)
                row.resident_bytes = max(row.resident_bytes, stats.resident_bytes)

        for step in range(total):
            await trainer.train_step.remote(step)
            build_s = await trainer.timed_build.remote(step)
            if step >= config.warmup:
                row.build_s.append(build_s)
            if previous is not None:
                await previous
            previous = await start(step)
            if not config.overlap:
                await previous
                previous = None
        if previous is not None:
            await previous
        row.load = _load()
        for step in range(config.warmup, total):
            if (stats := seen.get(step)) is not None:
                row.compute_s.append(stats.last_compute_s)
                row.changed.append(stats.changed_fraction)
                row.delta_bytes.append(stats.nbytes)
        want = await trainer.digest.remote()
        records = await asyncio.gather(*(engines[n].record.remote() for n in names))
        wrong = [n for n, r in zip(names, records, strict=True) if r.digest != want]
        if wrong:
            raise RuntimeError(f"engines {wrong} do not hold the train actor's weights")
    finally:
        with contextlib.suppress(Exception):
            await trainer.close.remote()
        await _kill([trainer])


def _check(rows: Sequence[SessionRow]) -> list[str]:
    """Deltas went where they should: never in a full run; in a delta run, to every engine
    of the sessions that carried one, and in at least one session. (A delta session may
    send the full snapshot instead, when the train actor's delta of its step was
    superseded: reported, not a failure.)"""
    failures = []
    for row in rows:
        if row.error:
            continue
        if row.mode == "full" and any(row.delta_engines):
            failures.append(f"delta: {row.label}: a full-only run sent deltas {row.delta_engines}")
        if row.mode == "delta" and (
            not any(row.delta_engines) or any(n not in (0, row.engines) for n in row.delta_engines)
        ):
            failures.append(
                f"delta: {row.label}: engines sent the delta per session {row.delta_engines}, "
                f"expected all {row.engines} in some session"
            )
    return failures


def _line(row: SessionRow) -> str:
    if row.error:
        return f"{row.label}: FAILED: {row.error}"
    sent = _median(row.sent_bytes)
    return (
        f"{row.label}: session {_median(row.session_s) * 1e3:.0f} ms, apply "
        f"{_median(row.apply_s) * 1e3:.0f} ms, sent {format_bytes(sent)}/engine, build "
        f"{_median(row.build_s) * 1e3:.0f} ms"
    )


# ------------------------------------------------------------------ report


def _pairs(rows: Sequence[SessionRow]) -> list[tuple[SessionRow, SessionRow]]:
    by = {(r.config_label, r.mode): r for r in rows}
    out = []
    for r in rows:
        if r.mode == "full" and (delta := by.get((r.config_label, "delta"))):
            out.append((r, delta))
    return out


def _ms(values: Sequence[float]) -> str:
    value = _median(values)
    return "n/a" if value != value else f"{value * 1e3:.0f}"


def _ratio(a: Sequence[float], b: Sequence[float]) -> str:
    x, y = _median(a), _median(b)
    return "n/a" if not (x == x and y == y and y > 0) else f"{x / y:.2f}"


def _mib(values: Sequence[float]) -> str:
    value = _median(values)
    return "n/a" if value != value else f"{value / (1 << 20):.1f}"


def _loads(load: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in load)


def delta_summary_lines(result: DeltaResult) -> list[str]:
    """One console line per learning rate and per transport and engine count (ratios)."""
    lines = [
        f"delta: lr {r.lr:g}: {_median(r.changed) * 100:.2f}% changed, delta "
        f"{r.ratio * 100:.1f}% of full bytes"
        for r in result.fraction_rows
    ]
    for full, delta in _pairs([*result.session_rows, *result.node_rows]):
        if full.error or delta.error:
            continue
        lines.append(
            f"delta: {full.config_label}: session delta/full "
            f"{_ratio(delta.session_s, full.session_s)}, apply "
            f"{_ratio(delta.apply_s, full.apply_s)}, sent "
            f"{_ratio(delta.sent_bytes, full.sent_bytes)}, build (stall) delta_sync on/off "
            f"{_ratio(delta.build_s, full.build_s)}"
        )
    return lines


def delta_markdown(result: DeltaResult) -> list[str]:
    """The "Delta sync" section of the report, as markdown lines."""
    cfg = result.config
    out = [
        "## Delta sync",
        "",
        f"Load average (1/5/15 min) at the start of this section {_loads(result.load_start)}, "
        f"at its end {_loads(result.load_end)}; it took {result.seconds:.0f} s. Compare the "
        "ratios, not the absolute times.",
        "",
    ]
    if result.fraction_rows:
        first = result.fraction_rows[0]
        out += [
            f"### Changed fraction of a real optimizer step ({first.params / 1e6:.0f}M-parameter "
            f"transformers Llama, h={cfg.hidden}, {cfg.layers} layers, vocab {cfg.vocab})",
            "",
            f"fp32 master weights, `torch.optim.AdamW` (weight decay 0.01), causal-LM loss on "
            f"{cfg.batch}x{cfg.seq} random tokens per step; served weights: the master weights "
            f"cast to bf16 after each step. {cfg.lr_warmup} warm-up steps, then {cfg.lr_steps} "
            f"measured; the delta is the library's encoder on `pack`ed buckets of "
            f"{format_bytes(cfg.pack_bytes)} (medians).",
            "",
            "| lr | loss | bf16 elements changed | delta / full bytes "
            "| sparse / bitmap / dense buckets (all measured steps) "
            "| encode ms (GB/s of full) | train step ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in result.fraction_rows:
            enc = _median(r.encode_s)
            gbps = r.full_bytes / enc / 1e9 if enc > 0 else float("nan")
            out.append(
                f"| {r.lr:g} | {_median(r.loss):.3f} | {_median(r.changed) * 100:.2f}% | "
                f"{r.ratio * 100:.1f}% | "
                f"{r.sparse_buckets} / {r.bitmap_buckets} / {r.dense_buckets} | "
                f"{enc * 1e3:.0f} ({gbps:.2f}) | {_ms(r.step_s)} |"
            )
        out.append("")
    rows = [*result.session_rows, *result.node_rows]
    if rows:
        out += [
            f"### Sessions: delta against full ({result.model})",
            "",
            "Each training step changes the share of the 2-byte words after `@` ("
            + "; ".join(f"{f * 100:.2f}% {why}" for f, why in result.fractions)
            + "), at random positions in every tensor. *full*: "
            '`delta_sync=False`, `SyncPlan(delta="never")`; *delta*: `delta_sync=True`, '
            '`delta="always"` (the default `"auto"` sends deltas only to engines on other '
            "nodes, and only up to 10% of the full bytes). Medians over "
            f"{cfg.steps} sessions after {cfg.warmup} warm-up ones; *apply*: the engine's "
            "`ReceiverStats.apply_s` per commit (a delta's patch and check included); *sent*: "
            "`EngineReport.sent_bytes` per engine; *build*: the train actor's "
            "`build_cpu_bucket_cache` (the stall). "
            + (
                "Each build runs while the previous session streams and its delta is "
                "computed (a train step of no compute: the worst case for the stall). "
                if cfg.overlap
                else "Each step trains and builds once the previous session ended (a train "
                "step outlasts a session, as on accelerators); a session waits for its "
                "step's delta, computed after the build returned. "
            )
            + "*sessions with the delta*: a delta session "
            "sends the full snapshot when the train actor no longer holds the delta of its "
            "step (the next build's delta replaced it while the session waited).",
            "",
            "| transport, engines, changed | session ms full / delta | delta / full "
            "| sessions with the delta | session ms of those | apply ms full / delta "
            "| delta / full | sent MiB per engine full / delta | build ms off / on | on / off "
            "| delta compute ms | trainer delta store | load after |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
            "| --- |",
        ]
        for full, delta in _pairs(rows):
            label = full.config_label
            if full.error or delta.error:
                out.append(f"| {label} | failed: {full.error or delta.error} " + "| " * 11 + "|")
                continue
            out.append(
                f"| {label} | {_ms(full.session_s)} / {_ms(delta.session_s)} | "
                f"{_ratio(delta.session_s, full.session_s)} | "
                f"{len(delta.delta_session_s)} of {len(delta.session_s)} | "
                f"{_ms(delta.delta_session_s)} | {_ms(full.apply_s)} / "
                f"{_ms(delta.apply_s)} | {_ratio(delta.apply_s, full.apply_s)} | "
                f"{_mib(full.sent_bytes)} / {_mib(delta.sent_bytes)} | {_ms(full.build_s)} / "
                f"{_ms(delta.build_s)} | {_ratio(delta.build_s, full.build_s)} | "
                f"{_ms(delta.compute_s)} | {format_bytes(delta.resident_bytes)} | "
                f"{_loads(delta.load)} |"
            )
        out.append("")
    if result.failures:
        out += ["Delta checks failed:", ""] + [f"- {f}" for f in result.failures] + [""]
    return out
