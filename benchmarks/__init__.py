"""``python -m benchmarks``: asyncsync against the serialized design and the machine's limits.

Run from the repository root (``make bench``, ``make bench-full``); not part of
the wheel. One process tree on a local Ray: the limits (single-thread copy, checksum, object
store put/get, device-to-host when a GPU is present), then for every model size
and engine count the serialized baseline (:mod:`.baseline`) and asyncsync with
each transport (:mod:`.actors`), then each commit policy to more and more light
engines and with one engine slowed down, all on the same workload
(:mod:`.workload`). :func:`run_bench` measures on an already started Ray;
:func:`run_nodes` the nodes section on a multi-node local cluster;
:mod:`.summary` holds each figure against its limit, :mod:`.report` writes the
JSON, markdown, plot and Chrome trace; :mod:`.cli` is the command line.

Nothing is imported here, so that ``python -m benchmarks --help`` answers at once:
import :class:`~benchmarks.runner.BenchConfig` and :func:`~benchmarks.runner.run_bench`
from :mod:`benchmarks.runner`.
"""
