"""Command line: ``asyncsync demo`` and ``asyncsync bench``."""

from __future__ import annotations

import argparse
import asyncio
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .demo import print_report, run_demo
    from .testing.ray_cluster import local_ray

    console = Console()
    with local_ray(num_cpus=2):
        result = asyncio.run(
            run_demo(args.steps, args.size, args.transport, args.staleness, console=console)
        )
    print_report(result, console)
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncsync", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small Llama and keep two engines in sync")
    demo.add_argument("--steps", type=int, default=12)
    demo.add_argument("--size", choices=["tiny", "small"], default="small")
    demo.add_argument("--transport", choices=["object_store", "shm"], default="object_store")
    demo.add_argument("--staleness", type=int, default=1)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
