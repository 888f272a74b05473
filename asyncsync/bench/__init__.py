"""``asyncsync bench``: asyncsync against the serialized design and the machine's limits.

One process tree on a local Ray: the limits (single-thread copy, checksum, object
store put/get, device-to-host when a GPU is present), then for every model size
and engine count the serialized baseline (:mod:`.baseline`) and asyncsync with
each transport (:mod:`.actors`), then each commit policy to more and more light
engines and with one engine slowed down, all on the same workload
(:mod:`.workload`). :func:`run_bench` measures on an already started Ray;
:func:`run_nodes` the nodes section on a multi-node local cluster;
:mod:`.summary` holds each figure against its limit, :mod:`.report` writes the
JSON, markdown, plot and Chrome trace.
"""

from __future__ import annotations

from .runner import (
    BenchConfig,
    BenchResult,
    RunResult,
    add_node_runs,
    default_transports,
    run_bench,
    run_nodes,
)

__all__ = [
    "BenchConfig",
    "BenchResult",
    "RunResult",
    "add_node_runs",
    "default_transports",
    "run_bench",
    "run_nodes",
]
