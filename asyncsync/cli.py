"""The ``asyncsync`` command: ``asyncsync demo`` and ``asyncsync status``.

Arguments are checked before Ray starts; a bad one is one line on stderr and exit
code 2. The demo starts a private local Ray for the run and stops it at the end,
unless ``--address`` (or ``RAY_ADDRESS``) names a cluster to join.

Building the parser imports neither torch nor Ray (nor the demo): ``--help`` and
``--version`` answer at once, and each command imports what it needs when it runs.
The repository's bench (``python -m benchmarks``, not in the wheel) builds its
command line from the same pieces: the argument types, :func:`run_command`,
:func:`ray_for`, :func:`require`, :func:`writable_dir`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

DESCRIPTION = (
    "asyncio-native Ray actors that move weights from a training actor to rollout "
    "engines. 'asyncsync demo' shows a run end to end."
)
# The demo's choices, here so that building the parser does not import the demo
# (torch, transformers); asyncsync.demo checks them again and tests/test_cli.py
# checks that both agree.
DEMO_SIZES = ("tiny", "small")
DEMO_TRANSPORTS = ("auto", "object_store", "shm")
ADDRESS_HELP = (
    "join the Ray cluster at this address instead of starting a private local Ray "
    "(default: $RAY_ADDRESS if set, else a private local Ray for this run)"
)


class UsageError(Exception):
    """A bad argument found after parsing (a combination argparse cannot check)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: ``asyncsync demo: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- argument types


def int_at_least(low: int) -> Callable[[str], int]:
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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def items(text: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated list."""
    return [item.strip() for item in text.split(",") if item.strip()]


# ---------------------------------------------------------------- commands


@contextmanager
def ray_for(prog: str, address: str | None, **local: Any) -> Iterator[None]:
    """A private local Ray, or the cluster the user named; failing to get one is one line.

    ``prog`` names the command in that line; ``local`` goes to
    :func:`~asyncsync.testing.connect_or_start_ray`.
    """
    from .testing import ray_cluster

    target = address or os.environ.get("RAY_ADDRESS") or None
    with ExitStack() as stack:
        try:
            stack.enter_context(ray_cluster.connect_or_start_ray(address, **local))
        except Exception as exc:
            where = f"join the Ray cluster at {target}" if target else "start a local Ray"
            raise SystemExit(f"{prog}: cannot {where}: {last_line(exc)}") from None
        yield


def require(prog: str, modules: dict[str, str]) -> None:
    """Exit with one line naming the extra to install if a module the command needs is missing."""
    import importlib.util

    missing = sorted(
        {extra for module, extra in modules.items() if not importlib.util.find_spec(module)}
    )
    if missing:
        raise SystemExit(
            f"{prog} needs more packages: pip install 'asyncsync[{','.join(missing)}]'"
        )


def writable_dir(option: str, path: str | Path) -> Path:
    """Create ``path`` if missing and check that files can be written in it.

    Called before Ray starts, so that a run is not lost to an output directory it
    cannot write at the end. Raises :class:`UsageError` naming ``option``.
    """
    import tempfile

    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UsageError(f"{option}: cannot write into {str(out)!r}: {reason}") from None
    return out


def last_line(exc: BaseException) -> str:
    """``ErrorType: <the last non-empty line of its message>``, for one-line failures."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _demo(args: argparse.Namespace) -> int:
    require("asyncsync demo", {"transformers": "demo", "matplotlib": "demo"})
    out = writable_dir("--out", args.out)
    import asyncio

    from rich.console import Console

    from .demo import print_report, run_demo, write_outputs

    console = Console()
    with ray_for("asyncsync demo", args.address, num_cpus=2):
        result = asyncio.run(
            run_demo(args.steps, args.size, args.transport, args.staleness, console=console)
        )
    print_report(result, console)
    paths = write_outputs(result, out)
    # Unwrapped, so the paths can be copied from any terminal width.
    console.print(f"timeline: {paths['timeline']}", highlight=False, soft_wrap=True)
    console.print(
        f"trace:    {paths['trace']} (open in ui.perfetto.dev or chrome://tracing)",
        highlight=False,
        soft_wrap=True,
    )
    return 0 if result.ok else 1


# ---------------------------------------------------------------- the parser


def _add_demo(sub: Any) -> None:
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
        type=int_at_least(1),
        default=12,
        help="training steps (default: %(default)s)",
    )
    demo.add_argument(
        "--size",
        choices=DEMO_SIZES,
        default="small",
        help="model size: small ~21M parameters (84 MB), tiny ~0.3M (default: %(default)s)",
    )
    demo.add_argument(
        "--transport",
        choices=DEMO_TRANSPORTS,
        default="auto",
        help="how buckets reach the engines: auto (the trainer's shared snapshot for "
        "engines on its node, the object store for the others), the object store for all, "
        "or the shared snapshot for all (same node only) (default: %(default)s)",
    )
    demo.add_argument(
        "--staleness",
        type=int_at_least(0),
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


def _status(args: argparse.Namespace) -> int:
    import json
    import logging

    import ray
    from rich.console import Console

    from . import status

    target = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=target, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as exc:
        raise SystemExit(
            f"asyncsync status: cannot join the Ray cluster at {target}: {last_line(exc)}"
        ) from None
    try:

        def source() -> list[status.Found]:
            return status.fetch(args.namespace, timeout_s=args.timeout)

        if args.json:
            print(json.dumps(status.to_json(source()), indent=2, allow_nan=False))
            return 0
        console = Console()
        if args.once:
            console.print(status.render(source()))
            return 0
        status.watch(source, console, args.interval)
        return 0
    finally:
        ray.shutdown()


def _add_status(sub: Any) -> None:
    cmd = sub.add_parser(
        "status",
        help="show the train actors of a running cluster and their fleets, live",
        description=(
            "Joins a running Ray cluster and shows every named train actor's fleet: each "
            "engine's node, health, served version, steps behind the ready step and "
            "quarantines, and the last session's time and rate. A train actor is found by "
            "its Ray name: create it with name= (and namespace=) in train_actor's options. "
            "Redraws every --interval seconds until interrupted."
        ),
    )
    cmd.add_argument(
        "--address",
        default=None,
        help="the Ray cluster to join (default: $RAY_ADDRESS if set, else 'auto': the "
        "cluster started on this machine with 'ray start')",
    )
    cmd.add_argument(
        "--namespace", default=None, help="only train actors in this Ray namespace (default: all)"
    )
    out = cmd.add_mutually_exclusive_group()
    out.add_argument(
        "--once", action="store_true", help="print one table and exit (default: redraw live)"
    )
    out.add_argument(
        "--json", action="store_true", help="print one JSON document and exit (default: a table)"
    )
    cmd.add_argument(
        "--interval",
        type=positive_float,
        default=2.0,
        help="seconds between redraws (default: %(default)s)",
    )
    cmd.add_argument(
        "--timeout",
        type=positive_float,
        default=10.0,
        help="seconds a train actor may take to answer (default: %(default)s)",
    )
    cmd.set_defaults(run=_status, parser=cmd)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("asyncsync")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``asyncsync`` argument parser (no side effects: nothing is imported or started)."""
    parser = Parser(prog="asyncsync", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,status}")
    _add_demo(sub)
    _add_status(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``asyncsync``; returns the exit code (2: bad arguments, 130: interrupted).

    ``--help`` and ``--version`` print and return 0; usage errors print one line
    on stderr and return 2. Other failures to start are one line and code 1.
    """
    return run_command(build_parser(), argv)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) with ``parser`` and run the command chosen.

    The parser (or the subcommand's) sets ``run`` (a function of the parsed
    arguments that returns the exit code) and ``parser`` (itself, which names the
    command in messages) as defaults; ``args.argv`` holds the arguments as given.
    Returns 2 after a usage error (argparse's or a :class:`UsageError`), 130 when
    interrupted, else what ``run`` returned.
    """
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
        prog = args.parser.prog
        print(f"{prog}: error: {exc} (see {prog} --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.parser.prog}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
