"""``asyncsync demo``: train a small Llama on the CPU and keep two engines in sync.

A local Ray is started in-process. One train actor (a Llama-style transformers
model trained with AdamW to memorise a fixed token sequence) and two engine actors
(the same architecture, different initial weights) serving greedy generations
the whole time. For each step the driver trains, builds the snapshot, and hands
it to the :class:`~asyncsync.SyncCoordinator`, which streams it in the background
while the next training step runs. At the end the driver checks, bit for bit,
that each engine's weights equal the trainer's published snapshot, that every
generation ran on one version and that versions only moved forward, and exits
non-zero if any check fails.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .actor import WeightSyncActor, train_actor
from .coordinator import SyncCoordinator
from .engines import engine_actor

__all__ = ["DemoTrainer", "demo_config", "run_demo"]


def demo_config(size: str = "small") -> dict[str, Any]:
    """Llama config of the demo model (``"small"``: ~21M params, 84 MB fp32)."""
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
        self.batch = torch.randint(0, config["vocab_size"], (4, 33), generator=gen)

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
        return loss.item()

    async def prompt(self) -> list[int]:
        return [int(t) for t in self.batch[0, :8]]


@dataclass
class DemoResult:
    steps: int
    losses: list[float]
    stalls_s: list[float]
    reports: list[Any]
    generations: dict[str, list[int | None]]
    failures: list[str] = field(default_factory=list)
    builds_during_sessions: int = 0
    sessions_during_training: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures


async def _generate_forever(
    engine: Any, prompt: list[int], seen: list[int | None], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        gen = await engine.generate.remote([prompt], max_new_tokens=4)
        seen.append(gen.version)


async def run_demo(
    steps: int = 12,
    size: str = "small",
    transport: str = "object_store",
    staleness: int = 1,
    console: Any = None,
) -> DemoResult:
    """Run the demo on an already started Ray; return what it measured and checked."""
    from rich.console import Console

    console = console or Console()
    config = demo_config(size)
    trainer: Any = train_actor(DemoTrainer, max_concurrency=16, num_cpus=0).remote(config)
    engine_cls = engine_actor(num_cpus=0)
    engines: dict[str, Any] = {
        f"engine{i}": engine_cls.remote("llama", config, seed=100 + i, num_threads=1)
        for i in range(2)
    }
    console.print("starting 1 train actor and 2 engine actors on a local Ray ...")
    try:
        return await _train_and_sync(trainer, engines, steps, transport, staleness, console)
    finally:
        import ray

        for handle in [trainer, *engines.values()]:
            ray.kill(handle, no_restart=True)


async def _train_and_sync(
    trainer: Any,
    engines: dict[str, Any],
    steps: int,
    transport: str,
    staleness: int,
    console: Any,
) -> DemoResult:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    await asyncio.gather(*(e.ping.remote() for e in engines.values()))
    prompt = await trainer.prompt.remote()

    # Base weights first, so the engines start from the trainer's initialisation.
    await trainer.build_cpu_bucket_cache.remote(-1)
    coordinator = SyncCoordinator(trainer, engines, staleness=staleness, transport=transport)
    await coordinator.sync(-1)

    stop = asyncio.Event()
    seen: dict[str, list[int | None]] = {name: [] for name in engines}
    load = [
        asyncio.create_task(_generate_forever(e, prompt, seen[name], stop))
        for name, e in engines.items()
    ]
    losses: list[float] = []
    stalls: list[float] = []
    columns = (
        TextColumn("[bold]step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=steps, status="")
        for step in range(steps):
            losses.append(await trainer.train_step.remote(step))
            start = time.monotonic()
            await trainer.build_cpu_bucket_cache.remote(step)
            await coordinator.after_build(step)
            stalls.append(time.monotonic() - start)
            progress.update(
                task,
                advance=1,
                status=f"loss {losses[-1]:.3f}  engines at v{coordinator.engine_version}  "
                f"stall {stalls[-1] * 1e3:.0f} ms",
            )
        await coordinator.drain()
    stop.set()
    await asyncio.gather(*load)

    result = DemoResult(steps, losses, stalls, coordinator.reports[1:], seen)
    await _check(result, trainer, engines, steps - 1)
    return result


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
            result.failures.append(f"{name} served no generations during training")
    spans = await trainer.sync_spans.remote()
    sessions = [s for s in spans if s.kind == "session"]
    result.builds_during_sessions = sum(
        1 for b in spans if b.kind == "build" and any(b.overlaps(s) for s in sessions)
    )
    result.sessions_during_training = sum(
        1 for s in sessions if any(t.kind == "train" and t.overlaps(s) for t in spans)
    )


def print_report(result: DemoResult, console: Any) -> None:
    from rich.table import Table

    reports = result.reports
    nbytes = reports[0].nbytes if reports else 0
    table = Table(title="asyncsync demo", show_header=False)
    table.add_row(
        "training steps", f"{result.steps} (loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f})"
    )
    table.add_row("sync sessions", f"{len(reports)} (steps sent: {[r.step for r in reports]})")
    table.add_row(
        "bytes synced",
        f"{sum(r.nbytes for r in reports) / 2**20:.1f} MiB "
        f"({nbytes / 2**20:.1f} MiB per snapshot, x2 engines)",
    )
    table.add_row(
        "trainer stall per step",
        f"median {statistics.median(result.stalls_s) * 1e3:.1f} ms, "
        f"max {max(result.stalls_s) * 1e3:.1f} ms (build + staleness wait)",
    )
    table.add_row(
        "sync throughput",
        f"median {statistics.median([r.gbps for r in reports]):.2f} GB/s "
        f"per engine set ({statistics.median([r.seconds for r in reports]) * 1e3:.0f} ms per session)",
    )
    table.add_row(
        "overlap (recorded spans)",
        f"{result.sessions_during_training} sessions ran "
        f"during a training step; {result.builds_during_sessions} builds during a session",
    )
    for name, versions in result.generations.items():
        distinct = sorted({v for v in versions if v is not None})
        table.add_row(f"{name} generations", f"{len(versions)} on versions {distinct}")
    table.add_row(
        "bit-for-bit check",
        "[green]engines == trainer snapshot[/]"
        if result.ok
        else "[red]" + "; ".join(result.failures) + "[/]",
    )
    console.print(table)
