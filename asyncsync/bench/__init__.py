"""``asyncsync bench``: asyncsync against the serialized design and the machine's limits.

One process tree on a local Ray: the limits (single-thread copy, checksum, object
store put/get, device-to-host when a GPU is present), then for every model size
and engine count the serialized baseline (:mod:`.baseline`) and asyncsync with
each transport (:mod:`.actors`), all on the same workload (:mod:`.workload`).
:func:`run_bench` measures on an already started Ray; :mod:`.report` writes the
JSON, markdown, plot and Chrome trace.
"""

from __future__ import annotations

from .runner import BenchConfig, BenchResult, RunResult, default_transports, run_bench

__all__ = ["BenchConfig", "BenchResult", "RunResult", "default_transports", "run_bench"]
