"""Command line: ``asyncsync demo`` and ``asyncsync bench``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

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


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.markup import escape

    from .bench import BenchConfig, default_transports, run_bench
    from .bench.report import publish, summarize, write_outputs
    from .bench.workload import parse_size
    from .testing.ray_cluster import local_ray

    console = Console()

    def items(text: str) -> list[str]:
        return [item.strip() for item in text.split(",") if item.strip()]

    try:
        config = BenchConfig(
            sizes=tuple(parse_size(s) for s in items(args.sizes)),
            engines=tuple(int(n) for n in items(args.engines)),
            steps=args.steps,
            warmup=args.warmup,
            transports=tuple(items(args.transports)) if args.transports else default_transports(),
            baseline=not args.no_baseline,
            bucket_bytes=parse_size(args.bucket),
            staleness=args.staleness,
            train_gflop=args.train_gflop,
            limit_bytes=parse_size(args.limit_size),
        )
        store = parse_size(args.object_store) if args.object_store else None
    except ValueError as exc:
        console.print(f"[red]asyncsync bench:[/] {escape(str(exc))}")
        return 2
    with local_ray(num_cpus=args.num_cpus, object_store_memory=store):
        result = asyncio.run(run_bench(config, log=lambda line: console.print(escape(line))))
    paths = write_outputs(result, Path(args.out))
    for row in summarize(result):
        if row["error"]:
            continue
        console.print(
            f"{row['config']:>12} {row['design']:<24} stall {row['stall_ms']:8.0f} ms  "
            f"sync {row['sync_gbps']:6.2f} GB/s  build {row['build_frac'] * 100:4.0f}% of copy limit"
        )
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if not args.no_publish:
        published = publish(result, paths["plot"], Path(args.publish_dir), "make bench")
        console.print(f"wrote {', '.join(str(p) for p in published.values())}")
    for failure in result.failures:
        console.print(f"[red]check failed:[/] {escape(failure)}")
    for run in result.runs:
        if run.error:
            console.print(f"[red]{run.config_label} {run.label} failed:[/] {escape(run.error)}")
    return 0 if result.ok else 1


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="measure asyncsync against the serialized design and the machine's limits",
        description=(
            "Runs on a local Ray started in-process. Writes bench.json, bench.md, bench.png "
            "and trace.json into --out, and BENCHMARKS.md + benchmarks/bench.png into "
            "--publish-dir unless --no-publish."
        ),
    )
    bench.add_argument(
        "--sizes", default="256MiB,1GiB", help="model sizes, comma-separated (default: 256MiB,1GiB)"
    )
    bench.add_argument(
        "--engines", default="1,2", help="engine counts, comma-separated (default: 1,2)"
    )
    bench.add_argument(
        "--steps", type=int, default=3, help="measured training steps per configuration"
    )
    bench.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="unmeasured steps first (the cache's buffer pool fills)",
    )
    bench.add_argument(
        "--transports",
        default=None,
        help="asyncsync transports, comma-separated (default: object_store,shm "
        "and collective when installed)",
    )
    bench.add_argument("--no-baseline", action="store_true", help="skip the serialized baseline")
    bench.add_argument("--bucket", default="128MiB", help="bucket size of both designs")
    bench.add_argument("--staleness", type=int, default=1)
    bench.add_argument(
        "--train-gflop", type=float, default=8.0, help="fp32 matmul work per training step"
    )
    bench.add_argument(
        "--limit-size", default="256MiB", help="buffer size of the limit measurements"
    )
    bench.add_argument(
        "--object-store", default=None, help="Ray object store size (default: Ray's)"
    )
    bench.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray advertises")
    bench.add_argument("--out", default="bench-out", help="output directory")
    bench.add_argument(
        "--publish-dir",
        default=".",
        help="where BENCHMARKS.md and benchmarks/bench.png are written",
    )
    bench.add_argument("--no-publish", action="store_true", help="do not write BENCHMARKS.md")
    bench.set_defaults(run=_bench)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncsync", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small Llama and keep two engines in sync")
    demo.add_argument("--steps", type=int, default=12)
    demo.add_argument("--size", choices=["tiny", "small"], default="small")
    demo.add_argument("--transport", choices=["object_store", "shm"], default="object_store")
    demo.add_argument("--staleness", type=int, default=1)
    demo.set_defaults(run=_demo)
    _add_bench(sub)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
