"""The ``asyncsync`` command: ``asyncsync demo`` and ``asyncsync bench``.

Arguments are checked before Ray starts; a bad one is one line on stderr and exit
code 2. Both commands start a private local Ray for the run and stop it at the
end, unless ``--address`` (or ``RAY_ADDRESS``) names a cluster to join.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

DESCRIPTION = (
    "asyncio-native Ray actors that move weights from a training actor to rollout "
    "engines. 'asyncsync demo' shows a run end to end; 'asyncsync bench' measures it "
    "against the serialized design and the machine's limits."
)
ADDRESS_HELP = (
    "join the Ray cluster at this address instead of starting a private local Ray "
    "(default: $RAY_ADDRESS if set, else a private local Ray for this run)"
)


class UsageError(Exception):
    """A bad argument found after parsing (a combination argparse cannot check)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``asyncsync demo: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- argument types


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _size(text: str) -> int:
    from .bench.workload import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size_list(text: str) -> tuple[int, ...]:
    sizes = tuple(_size(item) for item in _items(text))
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one size, e.g. 256MiB,1GiB")
    return sizes


def _count_list(text: str) -> tuple[int, ...]:
    counts = tuple(_int_at_least(1)(item) for item in _items(text))
    if not counts:
        raise argparse.ArgumentTypeError("expected at least one count, e.g. 1,2")
    return counts


def _count_list_or_none(text: str) -> tuple[int, ...]:
    return () if text.strip().lower() == "none" else _count_list(text)


def _policy_list(text: str) -> tuple[str, ...]:
    from .session import POLICIES

    names = tuple(_items(text))
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(map(repr, unknown)) or '(none)'}; "
            f"choose from {', '.join(POLICIES)}"
        )
    return names


def _transport_list(text: str) -> tuple[str, ...]:
    from .transport import transport_names

    names = tuple(_items(text))
    known = transport_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown transport {', '.join(map(repr, unknown)) or '(none)'}; "
            f"choose from {', '.join(known)}"
        )
    return names


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# ---------------------------------------------------------------- commands


@contextmanager
def _ray(command: str, address: str | None, **local: Any) -> Iterator[None]:
    """A private local Ray, or the cluster the user named; failing to get one is one line."""
    from .testing.ray_cluster import connect_or_start_ray

    target = address or os.environ.get("RAY_ADDRESS") or None
    with ExitStack() as stack:
        try:
            stack.enter_context(connect_or_start_ray(address, **local))
        except Exception as exc:
            where = f"join the Ray cluster at {target}" if target else "start a local Ray"
            raise SystemExit(f"asyncsync {command}: cannot {where}: {_last_line(exc)}") from None
        yield


def _require(command: str, modules: dict[str, str]) -> None:
    """Exit with one line naming the extra to install if a module the command needs is missing."""
    import importlib.util

    missing = sorted(
        {extra for module, extra in modules.items() if not importlib.util.find_spec(module)}
    )
    if missing:
        raise SystemExit(
            f"asyncsync {command} needs more packages: pip install 'asyncsync[{','.join(missing)}]'"
        )


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _demo(args: argparse.Namespace) -> int:
    _require("demo", {"transformers": "demo", "matplotlib": "demo"})
    from rich.console import Console

    from .demo import print_report, run_demo, write_outputs

    console = Console()
    with _ray("demo", args.address, num_cpus=2):
        result = asyncio.run(
            run_demo(args.steps, args.size, args.transport, args.staleness, console=console)
        )
    print_report(result, console)
    paths = write_outputs(result, args.out)
    # Unwrapped, so the paths can be copied from any terminal width.
    console.print(f"timeline: {paths['timeline']}", highlight=False, soft_wrap=True)
    console.print(
        f"trace:    {paths['trace']} (open in ui.perfetto.dev or chrome://tracing)",
        highlight=False,
        soft_wrap=True,
    )
    return 0 if result.ok else 1


def _bench(args: argparse.Namespace) -> int:
    _require("bench", {"matplotlib": "bench"})
    from rich.console import Console
    from rich.markup import escape

    from .bench import BenchConfig, default_transports
    from .bench.report import publish, summarize, write_outputs

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
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    console = Console()
    result = _measure_bench(args, config, console)
    paths = write_outputs(result, Path(args.out))
    for row in summarize(result):
        if row["error"]:
            continue
        console.print(
            f"{row['section']}: {row['config']} {row['design']}: stall {row['stall_ms']:.0f} ms, "
            f"session {row['session_s']:.3f} s ({row['session_frac'] * 100:.0f}% of its limit), "
            f"build {row['build_frac'] * 100:.0f}% of one copy",
            highlight=False,
        )
    console.print(
        f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False, soft_wrap=True
    )
    if args.publish:
        command = _command_line(args)
        published = publish(result, paths["plot"], Path(args.publish_dir), command)
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


def _command_line(args: argparse.Namespace) -> str:
    """The ``asyncsync bench`` command that reproduces this run, for the published report:
    ``make bench`` when run with the defaults, else the options given."""
    import shlex

    given: list[str] = []
    skip = False
    for arg in args.argv:
        # Where the files go does not change what is measured.
        if skip or arg in ("bench", "--publish") or arg.startswith(("--out=", "--publish-dir=")):
            skip = False
            continue
        if arg in ("--out", "--publish-dir"):
            skip = True
            continue
        given.append(arg)
    if not given:
        return "make bench"
    return shlex.join(["asyncsync", "bench", "--publish", *given])


def _measure_bench(args: argparse.Namespace, config: Any, console: Any) -> Any:
    """Run the bench on a private Ray (or the cluster named), then the nodes section, if asked,
    on a local multi-node cluster of its own; one progress bar follows every configuration."""
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    from .bench import add_node_runs, run_bench, run_nodes

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

        with _ray(
            "bench", args.address, num_cpus=args.num_cpus, object_store_memory=args.object_store
        ):
            result = asyncio.run(run_bench(config, log=log, progress=on_step))
        if args.nodes > 1:
            log(
                f"nodes: a local cluster of {args.nodes} nodes "
                f"(the head and {args.nodes - 1} workers)"
            )
            with _cluster(args.nodes, args.node_object_store) as cluster:
                runs = asyncio.run(run_nodes(config, cluster, log=log, progress=on_step))
            add_node_runs(result, runs, args.nodes)
    return result


@contextmanager
def _cluster(nodes: int, object_store: int) -> Iterator[Any]:
    """A local multi-node Ray cluster for the bench's nodes section; a failed start is one line."""
    from .testing.cluster import local_cluster

    with ExitStack() as stack:
        try:
            cluster = stack.enter_context(
                local_cluster(nodes - 1, object_store_memory=object_store)
            )
        except Exception as exc:
            raise SystemExit(
                f"asyncsync bench: cannot start a local cluster of {nodes} nodes: {_last_line(exc)}"
            ) from None
        yield cluster


# ---------------------------------------------------------------- the parser


def _add_demo(sub: Any) -> None:
    from .demo import SIZES, TRANSPORTS

    demo = sub.add_parser(
        "demo",
        help="train a small Llama and keep two generating engines in sync while it trains",
        description=(
            "Trains a small Llama (AdamW, CPU) in a train actor while two engine actors "
            "generate nonstop, syncing every step to them in the background. Prints a "
            "table of what happened, checks the engines end bit for bit on the trainer's "
            "last snapshot (exit code 1 if not), and writes timeline.png and trace.json "
            "into --out."
        ),
    )
    demo.add_argument(
        "--steps",
        type=_int_at_least(1),
        default=12,
        help="training steps (default: %(default)s)",
    )
    demo.add_argument(
        "--size",
        choices=SIZES,
        default="small",
        help="model size: small ~21M parameters (84 MB), tiny ~0.3M (default: %(default)s)",
    )
    demo.add_argument(
        "--transport",
        choices=TRANSPORTS,
        default="auto",
        help="how buckets reach the engines: auto (the trainer's shared snapshot for "
        "engines on its node, the object store for the others), the object store for all, "
        "or the shared snapshot for all (same node only) (default: %(default)s)",
    )
    demo.add_argument(
        "--staleness",
        type=_int_at_least(0),
        default=1,
        help="how many steps the engines may lag behind the trainer before the "
        "training loop waits (default: %(default)s)",
    )
    demo.add_argument(
        "--out",
        default="demo-out",
        help="directory for timeline.png and trace.json (default: %(default)s)",
    )
    demo.add_argument("--address", default=None, help=ADDRESS_HELP)
    demo.set_defaults(run=_demo, parser=demo)


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure asyncsync against the serialized design and the machine's limits",
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
        type=_int_at_least(1),
        default=3,
        help="measured training steps per configuration (default: %(default)s)",
    )
    bench.add_argument(
        "--warmup",
        type=_int_at_least(0),
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
        type=_int_at_least(0),
        default=1,
        help="asyncsync's staleness bound in steps (default: %(default)s)",
    )
    bench.add_argument(
        "--train-gflop",
        type=_positive_float,
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
        default="fleet,per_engine",
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
        type=_int_at_least(0),
        default=4,
        help="engines of the slow-engine rows, one of them --slow-factor times slower; "
        "0 for none (default: %(default)s)",
    )
    bench.add_argument(
        "--slow-factor",
        type=_positive_float,
        default=10.0,
        help="how much slower the slowed engine receives and applies (default: %(default)s)",
    )
    bench.add_argument(
        "--nodes",
        type=_int_at_least(1),
        default=1,
        help="also run the nodes rows on a local cluster of this many Ray nodes (the head and "
        "N-1 workers), after the rest (default: %(default)s, no nodes rows)",
    )
    bench.add_argument(
        "--node-engines",
        type=_int_at_least(1),
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
        type=_int_at_least(1),
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
        "as `make bench` does (default: off)",
    )
    bench.add_argument(
        "--no-publish",
        dest="publish",
        action="store_false",
        help="do not publish; the default, accepted for scripts written before --publish "
        "(default: on)",
    )
    bench.add_argument(
        "--publish-dir",
        default=".",
        help="where --publish writes (default: %(default)s, the current directory)",
    )
    bench.set_defaults(run=_bench, parser=bench)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("asyncsync")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``asyncsync`` argument parser (no side effects: nothing is imported or started)."""
    parser = _Parser(prog="asyncsync", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench}")
    _add_demo(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``asyncsync``; returns the exit code (2: bad arguments, 130: interrupted).

    ``--help`` and ``--version`` print and return 0; usage errors print one line
    on stderr and return 2. Other failures to start are one line and code 1.
    """
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the subcommand's parser, which names the subcommand
            args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as exc:  # argparse exits after --help, --version or a usage error
        return exc.code if isinstance(exc.code, int) else 0
    try:
        args.argv = list(sys.argv[1:] if argv is None else argv)
        code: int = args.run(args)
    except UsageError as exc:
        sub = f"{parser.prog} {args.command}"
        print(f"{sub}: error: {exc} (see {sub} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"asyncsync {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
