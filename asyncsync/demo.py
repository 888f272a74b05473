"""``asyncsync demo``: train a small Llama on the CPU and keep two engines in sync.

One train actor (a Llama-style transformers model trained with AdamW to memorise
a fixed token sequence) and two engine actors (the same architecture, different
initial weights) that serve greedy generations the whole time, each routed by a
:class:`~asyncsync.FleetRouter` to an engine at most `staleness` steps behind the
trainer and stamped with the version it ran on. The engines first
receive the trainer's initial weights (version -1, the base weights). Then, for
each step, the driver trains, builds the step's snapshot, and hands it to a
`SyncCoordinator`, which streams it to both engines in the background while the
next training step runs; the driver waits only when the engines would fall more
than `staleness` steps behind.

The trainer's recorded spans (train, build, session) show what overlapped: a
session streaming while the next step trains, and the next build running while
a session still streams. The engines record each commit themselves. At the end
the driver checks, bit for bit, that each engine's weights equal the trainer's
last snapshot, that every generation ran on one version and that versions only
moved forward; :func:`write_outputs` draws the run as a timeline PNG and a
Chrome/Perfetto trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .actor import WeightSyncActor, train_actor
from .buckets import Bucket
from .coordinator import SyncCoordinator
from .engines import HFEngine
from .plan import SyncPlan
from .router import FleetRouter, Rule, StalenessFilter
from .spans import Lane, Span, SpanLog, write_chrome_trace

__all__ = [
    "DemoEngine",
    "DemoResult",
    "DemoTrainer",
    "demo_config",
    "overlap_summary",
    "plot_timeline",
    "print_report",
    "run_demo",
    "trace_processes",
    "write_outputs",
]

SIZES = ("tiny", "small")
TRANSPORTS = ("auto", "object_store", "shm")
# Tokens per generation. A commit waits for the generations in flight on that
# engine, so long generations make the engines slower to take new weights than
# the trainer is to build them: the next build then starts while a session
# still streams, which is the overlap the demo is there to show.
GENERATION_TOKENS = 16
SERVE_ONE_S = (
    30.0  # how long the rollout load may go on after training for every engine to serve one
)


def demo_config(size: str = "small") -> dict[str, Any]:
    """Llama config of the demo model: ``"small"`` ~21M params (84 MB fp32), ``"tiny"`` ~0.3M."""
    if size == "tiny":
        return dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
    if size != "small":
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )


class DemoTrainer(WeightSyncActor):
    """One train rank: a transformers Llama, AdamW, a toy memorisation objective."""

    def __init__(self, config: dict[str, Any], *, seed: int = 0, bucket_bytes: int = 16 << 20):
        super().__init__(bucket_bytes=bucket_bytes)
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.set_num_threads(1)
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            AutoConfig.for_model("llama", **config)
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed + 1)
        self.batch = torch.randint(0, config["vocab_size"], (2, 17), generator=gen)
        # The weights as a bf16 engine would serve them, and per step the share of
        # their words the optimizer step changed (what a delta would carry).
        self._served: list[torch.Tensor] = []
        self.bf16_changed: list[float] = []

    def named_weights(self, step: int) -> Any:
        # Runs in a worker thread; the driver awaits the build before the next
        # optimizer step, so these tensors do not change while they are copied.
        return self.model.state_dict().items()

    async def train_step(self, step: int) -> float:
        """One AdamW step, off the event loop so sessions keep streaming."""
        with self.sync_span_log.span("train", step):
            return await asyncio.to_thread(self._train_step)

    def _train_step(self) -> float:
        self.model.train()
        inputs, labels = self.batch[:, :-1], self.batch[:, 1:]
        logits = self.model(input_ids=inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self._measure_bf16_changes()
        return loss.item()

    def _measure_bf16_changes(self) -> None:
        served = [p.detach().to(torch.bfloat16).view(torch.int16) for p in self.model.parameters()]
        if self._served:
            changed = sum(int((a != b).sum()) for a, b in zip(served, self._served, strict=True))
            self.bf16_changed.append(changed / sum(t.numel() for t in served))
        self._served = served

    async def changed_fractions(self) -> list[float]:
        """Per training step, the share of bf16 weight words it changed."""
        return list(self.bf16_changed)

    async def prompt(self) -> list[int]:
        return [int(t) for t in self.batch[0, :8]]


class DemoEngine(HFEngine):
    """The reference engine, recording when each commit made a version visible.

    A commit span starts when the engine begins to apply the staged weights
    (waiting first for the generations in flight) and ends when the new
    version is served. Its step is that version.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commit_log = SpanLog()

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        with self.commit_log.span("commit", version):
            await super().apply(buckets, version)

    async def commit_spans(self) -> list[Span]:
        return self.commit_log.snapshot()


@dataclass
class DemoResult:
    """What one demo run did, measured and checked.

    ``trainer_spans`` are the train actor's (``train``, ``build``, ``session``),
    ``commit_spans`` each engine's own, ``generation_spans`` the driver's view of
    each ``generate`` call (its step is the version the engine reported for it).
    ``stall_spans`` are the driver's waits after each training step (the build,
    then the staleness bound). ``reports`` are the sessions after the base
    weights' one; ``served`` is the version each engine reported at the end.
    Times are ``time.time()`` seconds; ``origin`` is when the training loop started.
    """

    steps: int
    size: str
    transport: str
    staleness: int
    losses: list[float]
    stall_spans: list[Span]
    reports: list[Any]
    trainer_spans: list[Span]
    commit_spans: dict[str, list[Span]]
    generation_spans: dict[str, list[Span]]
    served: dict[str, int | None]
    origin: float
    requests_by_version: dict[int | None, int] = field(default_factory=dict)
    rollouts_refused: int = 0
    bf16_changed: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def stalls_s(self) -> list[float]:
        """Per step, how long the train loop waited (build + staleness bound), in seconds."""
        return [s.end - s.start for s in self.stall_spans]

    def spans(self, kind: str) -> list[Span]:
        """The trainer's completed spans of one kind for steps >= 0, oldest first.

        The base weights' build and session (step -1) ran before training started.
        """
        return sorted(
            (s for s in self.trainer_spans if s.kind == kind and s.ok and (s.step or 0) >= 0),
            key=_start,
        )

    @property
    def builds_during_sessions(self) -> int:
        """Builds that ran while a session streamed (the overlap the cache exists for)."""
        sessions = self.spans("session")
        return sum(1 for b in self.spans("build") if any(b.overlaps(s) for s in sessions))

    @property
    def sessions_during_training(self) -> int:
        """Sessions that streamed while a training step ran."""
        trains = self.spans("train")
        return sum(1 for s in self.spans("session") if any(t.overlaps(s) for t in trains))

    @property
    def generations(self) -> dict[str, list[int | None]]:
        """Per engine, the version each generation ran on, in order."""
        return {name: [s.step for s in spans] for name, spans in self.generation_spans.items()}


def _start(span: Span) -> float:
    return span.start


async def _generate_forever(
    router: FleetRouter,
    prompt: list[int],
    spans: dict[str, list[Span]],
    step: list[int],
    keep: StalenessFilter,
    stop: asyncio.Event,
    served: dict[str, asyncio.Event],
) -> None:
    """Rollouts routed by version until ``stop``; each is checked against the bound
    for the step being trained (``step[0]``) and recorded on its engine's lane;
    ``served[engine]`` is set once that engine answered one."""
    while not stop.is_set():
        start = time.time()
        routed = await router.call("generate", [prompt], max_new_tokens=GENERATION_TOKENS)
        stamp = routed.value.stamp
        keep.admit(stamp, step[0])
        spans[routed.engine].append(Span("generate", stamp.version, start, time.time()))
        served[routed.engine].set()


async def run_demo(
    steps: int = 12,
    size: str = "small",
    transport: str = "auto",
    staleness: int = 1,
    console: Any = None,
) -> DemoResult:
    """Run the demo on an already started Ray; return what it measured and checked.

    Raises ``ValueError`` for ``steps < 1``, ``staleness < 0``, an unknown size
    or transport, before any actor starts.
    """
    from rich.console import Console

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    config = demo_config(size)
    console = console or Console()
    import ray

    trainer: Any = train_actor(DemoTrainer, max_concurrency=16, num_cpus=0).remote(config)
    engine_cls = ray.remote(DemoEngine).options(max_concurrency=16, num_cpus=0)
    engines: dict[str, Any] = {
        f"engine{i}": engine_cls.remote("llama", config, seed=100 + i, num_threads=1)
        for i in range(2)
    }
    console.print("starting 1 train actor and 2 engine actors ...")
    try:
        return await _train_and_sync(trainer, engines, steps, size, transport, staleness, console)
    finally:
        # Close the train actor first: its fleet keeper, transports and cache stop
        # on purpose, not when the process dies.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(trainer.close.remote(), 30)

        def kill_all() -> None:
            for handle in [trainer, *engines.values()]:
                ray.kill(handle, no_restart=True)

        await asyncio.to_thread(kill_all)


async def _train_and_sync(
    trainer: Any,
    engines: dict[str, Any],
    steps: int,
    size: str,
    transport: str,
    staleness: int,
    console: Any,
) -> DemoResult:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    await asyncio.gather(*(e.ping.remote() for e in engines.values()))
    prompt = await trainer.prompt.remote()

    # The base weights (version -1) first, so the engines start from the trainer's
    # initialisation and every generation below runs on a version of the trainer's.
    await trainer.build_cpu_bucket_cache.remote(-1)
    coordinator = SyncCoordinator(
        trainer, engines, staleness=staleness, plan=SyncPlan(transport=transport)
    )
    await coordinator.sync(-1)
    console.print("engines serve the base weights (version -1); training starts")

    stop = asyncio.Event()
    gen_spans: dict[str, list[Span]] = {name: [] for name in engines}
    answered = {name: asyncio.Event() for name in engines}
    # Rollouts at most `staleness` steps behind the trainer, as the coordinator keeps
    # the engines; before training step s the newest built step is s - 1.
    router = FleetRouter(trainer, rule=Rule.within(staleness))
    await router.__aenter__()
    keep = StalenessFilter(max_steps=staleness + 1)
    training = [0]
    load = [
        asyncio.create_task(
            _generate_forever(router, prompt, gen_spans, training, keep, stop, answered)
        )
        for _ in engines
    ]
    losses: list[float] = []
    stalls: list[Span] = []
    columns = (
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    origin = time.time()
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("train", total=steps, status="")
            for step in range(steps):
                training[0] = step
                losses.append(await trainer.train_step.remote(step))
                start = time.time()
                await trainer.build_cpu_bucket_cache.remote(step)
                await coordinator.after_build(step)
                stalls.append(Span("stall", step, start, time.time()))
                progress.update(
                    task,
                    advance=1,
                    status=f"loss {losses[-1]:.3f}  engines at v{coordinator.engine_version}  "
                    f"stall {(stalls[-1].end - stalls[-1].start) * 1e3:.0f} ms",
                )
            progress.update(task, status=f"loss {losses[-1]:.3f}  final sync ...")
            await coordinator.drain()
            # A short run (a few tiny steps) can end before the router sent a rollout
            # to every engine: the load goes on, bounded, until each served one, so
            # the check below judges the routing, not how long training took.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(e.wait() for e in answered.values())), SERVE_ONE_S
                )
            served = dict(
                zip(
                    engines,
                    await asyncio.gather(*(e.served_version.remote() for e in engines.values())),
                    strict=True,
                )
            )
            progress.update(
                task, status=f"loss {losses[-1]:.3f}  engines serve {_versions(served)} (done)"
            )
    finally:
        stop.set()
        await asyncio.gather(*load, return_exceptions=True)
        await router.__aexit__(None, None, None)
        await coordinator.close()

    commits = await asyncio.gather(*(e.commit_spans.remote() for e in engines.values()))
    result = DemoResult(
        steps=steps,
        size=size,
        transport=transport,
        staleness=staleness,
        losses=losses,
        stall_spans=stalls,
        reports=coordinator.reports[1:],
        trainer_spans=await trainer.sync_spans.remote(),
        commit_spans=dict(zip(engines, commits, strict=True)),
        generation_spans=gen_spans,
        served=served,
        origin=origin,
        requests_by_version=dict(sorted(router.stats.by_version.items())),
        rollouts_refused=keep.refused,
        bf16_changed=await trainer.changed_fractions.remote(),
    )
    await _check(result, trainer, engines, steps - 1)
    return result


def _versions(served: dict[str, int | None]) -> str:
    """``v11`` when every engine serves one version, else ``engine0 v11, engine1 v10``."""
    distinct = set(served.values())
    if len(distinct) == 1:
        return f"v{distinct.pop()}"
    return ", ".join(f"{name} v{v}" for name, v in served.items())


async def _check(result: DemoResult, trainer: Any, engines: dict[str, Any], last: int) -> None:
    step, want = await trainer.ready_snapshot_digests.remote()
    if step != last:
        result.failures.append(f"trainer's ready step is {step}, expected {last}")
    for name, engine in engines.items():
        version, have = await engine.state_digests.remote()
        if version != step:
            result.failures.append(f"{name} serves version {version}, trainer published {step}")
        differ = sorted(n for n in want if have.get(n) != want[n])
        if differ:
            result.failures.append(f"{name}: {len(differ)} tensors differ, e.g. {differ[0]!r}")
        versions = [v for v in result.generations[name] if v is not None]
        if versions != sorted(versions):
            result.failures.append(f"{name}: generation versions went backwards: {versions}")
        if not result.generations[name]:
            result.failures.append(f"{name} served no generations in {SERVE_ONE_S:g}s of load")


# ---------------------------------------------------------------- the report


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def overlap_summary(result: DemoResult) -> str:
    """One sentence on what overlapped, from the recorded spans; says so when nothing did."""
    builds, sessions = result.spans("build"), result.spans("session")
    trains = result.spans("train")
    during = result.builds_during_sessions
    text = (
        f"{result.sessions_during_training} of {len(sessions)} sessions streamed while a "
        f"training step ran; {during} of {len(builds)} builds ran while a session streamed"
    )
    if during == 0 and result.staleness == 0:
        text += " (none: with staleness 0 the loop waits for each session before the next step)"
    elif during == 0 and sessions and trains:
        text += (
            " (none this time: every session, median "
            f"{_ms(statistics.median(s.end - s.start for s in sessions))}, ended before the "
            "next training step, median "
            f"{_ms(statistics.median(t.end - t.start for t in trains))}, finished)"
        )
    return text


def print_report(result: DemoResult, console: Any) -> None:
    """The table that ends ``asyncsync demo``; every term is explained in the docs' demo page."""
    from rich.table import Table

    reports = result.reports
    nbytes = reports[0].nbytes if reports else 0
    engines = len(result.served)
    table = Table(title="asyncsync demo", show_header=False)
    table.add_row(
        "training steps", f"{result.steps} (loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f})"
    )
    table.add_row(
        "sync sessions",
        f"{len(reports)} after the base weights' (steps sent: {[r.step for r in reports]})",
    )
    table.add_row(
        "bytes synced",
        f"{sum(r.nbytes for r in reports) * engines / 2**20:.1f} MiB "
        f"({nbytes / 2**20:.1f} MiB per snapshot, x{engines} engines)",
    )
    table.add_row(
        "trainer stall per step",
        f"median {statistics.median(result.stalls_s) * 1e3:.1f} ms, "
        f"max {max(result.stalls_s) * 1e3:.1f} ms (build + wait for the staleness bound)",
    )
    if reports:
        table.add_row(
            "session time",
            f"median {_ms(statistics.median([r.seconds for r in reports]))}, "
            f"{statistics.median([r.gbps for r in reports]):.2f} GB/s "
            f"(one snapshot to all {engines} engines at once)",
        )
    table.add_row("overlap (recorded spans)", overlap_summary(result))
    table.add_row(
        "rollouts (routed by version)",
        f"requests per version {result.requests_by_version}; refused by the staleness "
        f"bound: {result.rollouts_refused}",
    )
    if result.bf16_changed:
        table.add_row(
            "changed per step (bf16)",
            f"median {statistics.median(result.bf16_changed):.1%} of the weights' bf16 words "
            f"(AdamW, lr 3e-3; what a delta would carry: see Delta sync)",
        )
    for name, versions in result.generations.items():
        distinct = sorted({v for v in versions if v is not None})
        table.add_row(
            f"{name}",
            f"{len(versions)} generations on versions {distinct}; "
            f"serves v{result.served.get(name)}",
        )
    table.add_row(
        "bit-for-bit check",
        "[green]engines == trainer snapshot[/]"
        if result.ok
        else "[red]" + "; ".join(result.failures) + "[/]",
    )
    console.print(table)


# ---------------------------------------------------------------- pictures

# Lanes of the timeline and the trace, top to bottom: (process, lane).
_TRAINER_LANES = ("train", "build", "session")
_COLORS = {
    "stall": "#8c8c8c",
    "train": "#4c72b0",
    "build": "#dd8452",
    "session": "#55a868",
    "commit": "#c44e52",
}


# What each kind of mark is, for the timeline's legend (docs/demo.md says more).
_LEGEND = {
    "stall": "driver waits after a step: the build, then the staleness bound "
    "(a thin mark: only the build)",
    "train": "train step (forward, backward, AdamW)",
    "build": "build: the step's snapshot into CPU buckets (a few ms: a thin mark)",
    "session": "sync session: the snapshot streamed to both engines",
    "commit": "engine commit: waits for the generation in flight, applies, serves",
    "generate": "generation, coloured and labelled by the version it ran on",
}


def _lanes(result: DemoResult) -> list[tuple[str, str, list[Span]]]:
    lanes = [("driver", "stall", result.stall_spans)]
    lanes += [("trainer", kind, result.spans(kind)) for kind in _TRAINER_LANES]
    for name in result.served:
        lanes.append((name, "commit", sorted(result.commit_spans.get(name, []), key=_start)))
        lanes.append((name, "generate", sorted(result.generation_spans.get(name, []), key=_start)))
    return lanes


_LANE_LABELS = {
    "stall": "waits (build + bound)",
    "train": "train step",
    "build": "build snapshot",
    "session": "sync session",
    "commit": "commit (apply)",
    "generate": "generate (version)",
}


# Spans shorter than this fraction of the time axis (builds: a few ms; waits that were
# only the build) are drawn this wide, so that each one shows as a thin mark.
_MIN_WIDTH = 1 / 300


def plot_timeline(result: DemoResult, path: Path) -> None:
    """A timeline PNG: train steps, builds, sessions, and per engine commits and generations.

    Spans are labelled with their step (commits and generations: the version) when
    wide enough; spans shorter than 1/300 of the axis are drawn that wide. Generations
    are coloured by the version they ran on. A legend names every kind of mark.
    Blocking: call it outside an event loop.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    lanes = _lanes(result)
    start = result.origin
    end = max((s.end for _, _, spans in lanes for s in spans), default=start + 1)
    versions = sorted({s.step for s in _all_generations(result) if s.step is not None})
    cmap = plt.get_cmap("viridis")
    shade: dict[int | None, Any] = {
        v: cmap(i / max(1, len(versions) - 1)) for i, v in enumerate(versions)
    }
    fig, ax = plt.subplots(figsize=(14, 0.55 * len(lanes) + 2.1))
    min_width = (end - start) * _MIN_WIDTH
    for row, (_, lane, spans) in enumerate(lanes):
        for span in spans:
            if span.end < start:
                continue  # before the training loop: the base weights' build and session
            x0, width = span.start - start, max(span.end - span.start, min_width)
            color = shade.get(span.step, "#999999") if lane == "generate" else _COLORS[lane]
            ax.broken_barh([(x0, width)], (row - 0.4, 0.8), facecolors=color, edgecolor="white")
            if width > (end - start) / 80:
                ink = "white" if sum(to_rgb(color)) < 1.5 else "black"
                ax.text(
                    x0 + width / 2,
                    row,
                    str(span.step),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=ink,
                )
    ax.set_yticks(range(len(lanes)), [f"{who}: {_LANE_LABELS[lane]}" for who, lane, _ in lanes])
    ax.invert_yaxis()
    ax.set_xlim(0, end - start)
    ax.set_xlabel("seconds since training started")
    ax.grid(axis="x", linestyle=":", linewidth=0.5)
    middle = cmap(0.5) if versions else "#999999"
    handles = [Patch(facecolor=_COLORS[lane], label=_LEGEND[lane]) for lane in _COLORS]
    handles.append(Patch(facecolor=middle, label=_LEGEND["generate"]))
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.13),
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    ax.set_title(
        f"asyncsync demo: {result.steps} steps, {result.size} model, {result.transport}, "
        f"staleness {result.staleness}; {result.builds_during_sessions} builds during a "
        f"session, {result.sessions_during_training} sessions during a training step",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _all_generations(result: DemoResult) -> list[Span]:
    return [s for spans in result.generation_spans.values() for s in spans]


def trace_processes(result: DemoResult) -> list[tuple[str, list[Lane]]]:
    """The run's spans for :func:`~asyncsync.spans.chrome_trace`: the driver, the trainer
    and each engine, one lane per kind of span (the timeline's rows)."""
    processes: dict[str, list[Lane]] = {}
    for who, lane, spans in _lanes(result):
        processes.setdefault(who, []).append((lane, spans))
    return list(processes.items())


def write_outputs(result: DemoResult, out_dir: Path | str) -> dict[str, Path]:
    """Write ``timeline.png`` and ``trace.json`` into ``out_dir`` (created if missing).

    Blocking (matplotlib, file I/O): call it outside an event loop, or in a thread.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"timeline": out / "timeline.png", "trace": out / "trace.json"}
    plot_timeline(result, paths["timeline"])
    write_chrome_trace(paths["trace"], trace_processes(result), result.origin)
    return paths
