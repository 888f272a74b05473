"""``python -m benchmarks``: the bench's command line (``make bench``, ``make bench-full``).

Run from the repository root. Arguments are checked before Ray starts; a bad one
is one line on stderr and exit code 2. The bench starts a private local Ray for
the run and stops it at the end, unless ``--address`` (or ``RAY_ADDRESS``) names a
cluster to join; ``--nodes`` adds a local multi-node cluster of its own.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from asyncsync.cli import (
    ADDRESS_HELP,
    Parser,
    UsageError,
    int_at_least,
    items,
    last_line,
    positive_float,
    ray_for,
    require,
    run_command,
    writable_dir,
)

__all__ = ["build_parser", "main"]

# Ray workers import this package (its actors) from the driver's working directory,
# which Ray puts on their path: run it from the repository root.
PROG = "python -m benchmarks"

# ---------------------------------------------------------------- argument types


def _size(text: str) -> int:
    from .workload import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size_list(text: str) -> tuple[int, ...]:
    sizes = tuple(_size(item) for item in items(text))
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one size, e.g. 256MiB,1GiB")
    return sizes


def _count_list(text: str) -> tuple[int, ...]:
    counts = tuple(int_at_least(1)(item) for item in items(text))
    if not counts:
        raise argparse.ArgumentTypeError("expected at least one count, e.g. 1,2")
    return counts


def _count_list_or_none(text: str) -> tuple[int, ...]:
    return () if text.strip().lower() == "none" else _count_list(text)


def _float_list_or_none(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    values = tuple(positive_float(item) for item in items(text))
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number, e.g. 1e-6,1e-5")
    return values


def _fractions(text: str) -> tuple[float, ...] | None:
    if text.strip().lower() == "auto":
        return None
    values = tuple(positive_float(item) for item in items(text))
    if not values:
        raise argparse.ArgumentTypeError("give at least one share, or 'auto'")
    for value in values:
        if value > 1:
            raise argparse.ArgumentTypeError(f"a share of the words is at most 1, got {value:g}")
    return values


def _policy_list(text: str) -> tuple[str, ...]:
    from asyncsync.plan import POLICIES

    names = tuple(items(text))
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(map(repr, unknown)) or '(none)'}; "
            f"choose from {', '.join(POLICIES)}"
        )
    return names


def _transport_list(text: str) -> tuple[str, ...]:
    from asyncsync.transport import transport_names

    names = tuple(items(text))
    known = transport_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown transport {', '.join(map(repr, unknown)) or '(none)'}; "
            f"choose from {', '.join(known)}"
        )
    return names


# ---------------------------------------------------------------- the run


def _run(args: argparse.Namespace) -> int:
    require(PROG, {"matplotlib": "bench"})
    from rich.console import Console
    from rich.markup import escape

    from .report import publish, summarize, write_outputs
    from .runner import BenchConfig, default_transports

    if args.address and (args.num_cpus is not None or args.object_store is not None):
        raise UsageError(
            "--num-cpus and --object-store size a private local Ray; not with --address"
        )
    if args.address and args.nodes > 1:
        raise UsageError("--nodes starts a local multi-node cluster; not with --address")
    try:
        config = BenchConfig(
            sizes=args.sizes,
            engines=args.engines,
            steps=args.steps,
            warmup=args.warmup,
            transports=args.transports if args.transports is not None else default_transports(),
            baseline=not args.no_baseline,
            bucket_bytes=args.bucket,
            staleness=args.staleness,
            train_gflop=args.train_gflop,
            limit_bytes=args.limit_size,
            fleet_engines=args.fleet_engines,
            policies=args.policies,
            fleet_size=args.fleet_size,
            slow_engines=args.slow_engines,
            slow_factor=args.slow_factor,
            node_engines=args.node_engines,
        )
        delta = _delta_config(args, config.transports)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    out = writable_dir("--out", args.out)
    publish_dir = writable_dir("--publish-dir", args.publish_dir) if args.publish else None
    console = Console()
    result = _measure_bench(args, config, delta, console)
    paths = write_outputs(result, out)
    for row in summarize(result):
        if row["error"]:
            continue
        console.print(
            f"{row['section']}: {row['config']} {row['design']}: stall {row['stall_ms']:.0f} ms, "
            f"session {row['session_s']:.3f} s ({row['session_frac'] * 100:.0f}% of its limit), "
            f"build {row['build_frac'] * 100:.0f}% of one copy",
            highlight=False,
        )
    if result.delta is not None:
        from .delta import delta_summary_lines

        for line in delta_summary_lines(result.delta):
            console.print(line, highlight=False)
    console.print(
        f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False, soft_wrap=True
    )
    if publish_dir is not None:
        command = _command_line(args)
        published = publish(result, paths["plot"], publish_dir, command)
        console.print(
            f"published {', '.join(str(p) for p in published.values())}",
            highlight=False,
            soft_wrap=True,
        )
    for failure in result.failures:
        console.print(f"[red]check failed:[/] {escape(failure)}")
    for run in result.all_runs:
        if run.error:
            console.print(f"[red]{run.config_label} {run.label} failed:[/] {escape(run.error)}")
    return 0 if result.ok else 1


def _delta_config(args: argparse.Namespace, transports: tuple[str, ...]) -> Any:
    """The delta section's configuration, or ``None`` when it has nothing to run."""
    from .delta import DeltaConfig

    if not args.delta_lrs and not args.delta_engines:
        return None
    return DeltaConfig(
        lrs=args.delta_lrs,
        size=args.delta_size,
        fractions=args.delta_fraction,
        overlap=args.delta_overlap,
        engines=args.delta_engines,
        transports=transports,
        steps=args.delta_steps,
        node_engines=args.node_engines,
    )


def _command_line(args: argparse.Namespace) -> str:
    """The ``python -m benchmarks`` command that reproduces this run, for the published report:
    ``make bench`` when run with the defaults, else the options given."""
    import shlex

    given: list[str] = []
    skip = False
    for arg in args.argv:
        # Where the files go does not change what is measured.
        if skip or arg == "--publish" or arg.startswith(("--out=", "--publish-dir=")):
            skip = False
            continue
        if arg in ("--out", "--publish-dir"):
            skip = True
            continue
        given.append(arg)
    if not given:
        return "make bench"
    return shlex.join(["python", "-m", "benchmarks", "--publish", *given])


def _measure_bench(args: argparse.Namespace, config: Any, delta: Any, console: Any) -> Any:
    """Run the bench on a private Ray (or the cluster named), then the delta section (unless
    ``delta`` is ``None``), then the nodes sections, if asked, on a local multi-node cluster
    of its own; one progress bar follows every configuration."""
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    from .delta import run_delta, run_delta_nodes
    from .runner import add_node_runs, run_bench, run_nodes

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        tasks: list[TaskID] = []  # one bar, created when the first configuration starts

        def on_step(label: str, done: int, total: int) -> None:
            if not tasks:
                tasks.append(progress.add_task(label, total=total))
            progress.update(tasks[0], description=label, completed=done, total=total)

        def log(line: str) -> None:
            progress.console.print(escape(line), highlight=False)

        with ray_for(
            PROG,
            args.address,
            num_cpus=args.num_cpus,
            object_store_memory=args.object_store,
        ):
            result = asyncio.run(run_bench(config, log=log, progress=on_step))
            if delta is not None:
                result.delta = asyncio.run(run_delta(delta, log=log))
        if args.nodes > 1:
            log(
                f"nodes: a local cluster of {args.nodes} nodes "
                f"(the head and {args.nodes - 1} workers)"
            )
            with _cluster(args.nodes, args.node_object_store) as cluster:
                runs = asyncio.run(run_nodes(config, cluster, log=log, progress=on_step))
                if result.delta is not None and delta.engines:
                    asyncio.run(run_delta_nodes(delta, cluster, result.delta, log=log))
            add_node_runs(result, runs, args.nodes)
    return result


@contextmanager
def _cluster(nodes: int, object_store: int) -> Iterator[Any]:
    """A local multi-node Ray cluster for the bench's nodes section; a failed start is one line."""
    from asyncsync.testing.cluster import local_cluster

    with ExitStack() as stack:
        try:
            cluster = stack.enter_context(
                local_cluster(nodes - 1, object_store_memory=object_store)
            )
        except Exception as exc:
            raise SystemExit(
                f"{PROG}: cannot start a local cluster of {nodes} nodes: {last_line(exc)}"
            ) from None
        yield cluster


# ---------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The bench's argument parser (no side effects: nothing is imported or started)."""
    bench = Parser(
        prog=PROG,
        description=(
            "Measures the machine's limits (copy, checksum, object store), then for each "
            "model size and engine count the serialized baseline and asyncsync with each "
            "transport; then each commit policy to more and more light engines, and with "
            "one engine slowed down; with --nodes, the same engines on more Ray nodes. "
            "Writes bench.json, bench.md, bench.png and trace.json into --out; "
            "with --publish also BENCHMARKS.md and benchmarks/bench.png into --publish-dir."
        ),
    )
    bench.add_argument(
        "--sizes",
        type=_size_list,
        default="256MiB,1GiB",
        help="model sizes, comma-separated (default: %(default)s)",
    )
    bench.add_argument(
        "--engines",
        type=_count_list,
        default="1",
        help="engine counts of the designs rows (baseline and each transport), comma-separated "
        "(default: %(default)s; the published run uses 1,2)",
    )
    bench.add_argument(
        "--steps",
        type=int_at_least(1),
        default=3,
        help="measured training steps per configuration (default: %(default)s)",
    )
    bench.add_argument(
        "--warmup",
        type=int_at_least(0),
        default=2,
        help="unmeasured steps first, while the cache's buffer pool fills (default: %(default)s)",
    )
    bench.add_argument(
        "--transports",
        type=_transport_list,
        default=None,
        help="asyncsync transports, comma-separated (default: object_store,shm, "
        "and collective when installed)",
    )
    bench.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the serialized baseline (default: run it)",
    )
    bench.add_argument(
        "--bucket",
        type=_size,
        default="128MiB",
        help="bucket size of both designs (default: %(default)s)",
    )
    bench.add_argument(
        "--staleness",
        type=int_at_least(0),
        default=1,
        help="asyncsync's staleness bound in steps (default: %(default)s)",
    )
    bench.add_argument(
        "--train-gflop",
        type=positive_float,
        default=8.0,
        help="fp32 matmul work per training step, in GFLOP (default: %(default)s)",
    )
    bench.add_argument(
        "--fleet-engines",
        type=_count_list_or_none,
        default="1,4,8",
        help="engine counts of the fleet rows (light engines, each commit policy), "
        "comma-separated, or 'none' (default: %(default)s; the published run uses 1,2,4,8,16)",
    )
    bench.add_argument(
        "--policies",
        type=_policy_list,
        default="all_or_nothing,per_engine",
        help="commit policies of the fleet, slow-engine and nodes rows (default: %(default)s)",
    )
    bench.add_argument(
        "--fleet-size",
        type=_size,
        default=None,
        help="model size of the fleet, slow-engine and nodes rows "
        "(default: the smallest of --sizes)",
    )
    bench.add_argument(
        "--slow-engines",
        type=int_at_least(0),
        default=4,
        help="engines of the slow-engine rows, one of them --slow-factor times slower; "
        "0 for none (default: %(default)s)",
    )
    bench.add_argument(
        "--slow-factor",
        type=positive_float,
        default=10.0,
        help="how much slower the slowed engine receives and applies (default: %(default)s)",
    )
    bench.add_argument(
        "--nodes",
        type=int_at_least(1),
        default=1,
        help="also run the nodes rows on a local cluster of this many Ray nodes (the head and "
        "N-1 workers), after the rest (default: %(default)s, no nodes rows)",
    )
    bench.add_argument(
        "--node-engines",
        type=int_at_least(1),
        default=6,
        help="engines of the nodes rows (default: %(default)s)",
    )
    bench.add_argument(
        "--node-object-store",
        type=_size,
        default="1GiB",
        help="object store of each node of the --nodes cluster (default: %(default)s)",
    )
    bench.add_argument(
        "--delta-lrs",
        type=_float_list_or_none,
        default="1e-6,1e-5,1e-4",
        help="delta section: learning rates at which a real AdamW step of a small transformers "
        "Llama is measured (share of bf16 weights changed, delta bytes), comma-separated, or "
        "'none' (default: %(default)s)",
    )
    bench.add_argument(
        "--delta-engines",
        type=_count_list_or_none,
        default="1",
        help="delta section: engine counts of the delta-against-full sessions per transport, "
        "comma-separated, or 'none'; with --nodes also --node-engines engines on the worker "
        "nodes ('none' for neither, with --delta-lrs none: no delta section) "
        "(default: %(default)s; the published run uses 1,8: its delta section, learning "
        "rates and sessions at two shares, took 318 s on two cores)",
    )
    bench.add_argument(
        "--delta-size",
        type=_size,
        default="256MiB",
        help="delta section: model size of the sessions (default: %(default)s)",
    )
    bench.add_argument(
        "--delta-fraction",
        type=_fractions,
        default="auto",
        help="delta section: shares of the weights' 2-byte words each training step changes, "
        "comma-separated, one set of sessions each; 'auto': the shares measured at lr 1e-6 "
        "and 1e-5, else 0.02 (default: %(default)s)",
    )
    bench.add_argument(
        "--delta-overlap",
        action="store_true",
        help="delta section: build each step while the previous session streams (a train "
        "step of no compute, the stall's worst case) instead of after it ended "
        "(default: off)",
    )
    bench.add_argument(
        "--delta-steps",
        type=int_at_least(1),
        default=3,
        help="delta section: measured sessions per configuration, after 3 warm-up ones "
        "(default: %(default)s)",
    )
    bench.add_argument(
        "--limit-size",
        type=_size,
        default="256MiB",
        help="buffer size of the limit measurements (default: %(default)s)",
    )
    bench.add_argument(
        "--object-store",
        type=_size,
        default=None,
        help="object store size of the private local Ray (default: Ray's choice)",
    )
    bench.add_argument(
        "--num-cpus",
        type=int_at_least(1),
        default=None,
        help="CPUs the private local Ray advertises (default: the machine's cores)",
    )
    bench.add_argument("--address", default=None, help=ADDRESS_HELP)
    bench.add_argument(
        "--out",
        default="bench-out",
        help="directory for bench.json, bench.md, bench.png, trace.json (default: %(default)s)",
    )
    bench.add_argument(
        "--publish",
        action="store_true",
        help="also write BENCHMARKS.md and benchmarks/bench.png into --publish-dir, "
        "as `make bench` does (default: off, only --out is written)",
    )
    bench.add_argument(
        "--publish-dir",
        default=".",
        help="where --publish writes (default: %(default)s, the current directory)",
    )
    bench.set_defaults(run=_run, parser=bench)
    return bench


def main(argv: list[str] | None = None) -> int:
    """Run the bench; returns the exit code (1: a check failed, 2: bad arguments)."""
    return run_command(build_parser(), argv)
