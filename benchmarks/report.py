"""Turn a :class:`~benchmarks.runner.BenchResult` into files: JSON, markdown, PNG, trace.

The figures come from :mod:`.summary` (each configuration against the baseline
and the limits of the same run); the plot from :mod:`.plot`. All functions here
are blocking (file I/O, matplotlib); call them outside an event loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

from asyncsync.engines.tensors import copy_threads as _copy_threads
from asyncsync.spans import Lane, write_chrome_trace

from .plot import plot
from .records import BuildBreakdown
from .runner import BASELINE, DESIGNS, FLEET, NODES, SLOW, BenchResult
from .summary import (
    QUIET_PSI,
    SESSION_TARGETS,
    TARGETS,
    limits,
    median,
    quiet,
    rows_of,
    summarize,
    usage_stats,
)
from .workload import format_bytes

__all__ = [
    "TARGETS",
    "markdown",
    "plot",
    "publish",
    "summarize",
    "to_json",
    "trace_processes",
    "write_outputs",
]

_TARGET_FORMAT = {
    "stall_x": "{:.1f}x",
    "sync_x": "{:.1f}x",
    "build_frac": "{:.0%}",
    "build_quiet": "{:.0%}",
    "session_frac": "{:.0%}",
    "stall_copy_x": "{:.2f}x",
    "apply_frac": "{:.0%}",
    "lag_p99_ms": "{:.1f} ms",
    "resident_frac": "{:.0%} of bound",
}

# The lanes of each configuration in the trace, top to bottom: span kind -> lane name.
_LANES = {
    "train": "train",
    "build": "build",
    "session": "session",
    "stall": "train loop waits (driver)",
}

Row = dict[str, Any]


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become ``None``; tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(result: BenchResult) -> dict[str, Any]:
    """The whole result (every sample and span) plus the summary rows, JSON-ready."""
    data = dataclasses.asdict(result)
    data["copy_limit_gbps"] = result.copy_limit_gbps
    data["checksum_limit_gbps"] = result.checksum_limit_gbps
    data["summary"] = summarize(result)
    data["ok"] = result.ok
    cleaned: dict[str, Any] = _clean(data)
    return cleaned


def _f(value: float | None, fmt: str = "{:.0f}", none: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return fmt.format(value)


def _pct(value: float | None) -> str:
    return _f(value * 100 if value is not None else None, "{:.0f}%")


def _mark(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "n/a"}[ok]


def _psi(machine: dict[str, Any]) -> str:
    value = machine.get("cpu_pressure_some_avg60")
    return "n/a" if value is None else f"{value:.0f}%"


def _load(machine: dict[str, Any]) -> str:
    return "/".join(f"{v:.1f}" for v in machine["load_average"])


def _transports(used: dict[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in sorted(used.items())) or "n/a"


def markdown(
    result: BenchResult, *, image: str | None = "bench.png", command: str | None = None
) -> str:
    """The report as markdown: machine, limits, section tables, targets, breakdowns, checks."""
    rows = summarize(result)
    out = _header(result, command)
    out += _limits_section(result)
    out += _designs_section(result, rows)
    if image:
        out += [
            f"![stall, throughput and limits per design; fleet, slow engine, nodes]({image})",
            "",
        ]
    out += _engine_section(result, rows)
    out += _fleet_section(result, rows)
    out += _slow_section(result, rows)
    out += _nodes_section(result, rows)
    if result.delta is not None:
        from .delta import delta_markdown

        out += delta_markdown(result.delta)
    out += _targets_section(result, rows)
    out += _breakdown_section(result)
    out += _correctness_section(result)
    return "\n".join(out)


def _header(result: BenchResult, command: str | None) -> list[str]:
    m = result.machine
    cfg = result.config
    out = ["# asyncsync bench", ""]
    if command:
        shorter = (
            ""
            if command == "make bench"
            else " (`make bench` runs `python -m benchmarks --publish` with its defaults: "
            "a shorter run)"
        )
        out += [f"Regenerate with `{command}`{shorter}.", ""]
    out += [
        f"- machine: {m['cpu_model']}, {m['logical_cores']} logical cores "
        f"({m['physical_cores']} physical), {format_bytes(m['ram_bytes'])} RAM, "
        f"/dev/shm {format_bytes(m['dev_shm_bytes'] or 0)}; {m['platform']}",
        f"- software: Python {m['python']}, torch {m['torch']}, ray {m['ray']}, "
        f"numpy {m['numpy']}; "
        f"CUDA: {m['cuda'] or 'none'}",
        f"- load average (1/5/15 min) at start {_load(m)}, at end {_load(result.machine_end)}; "
        f"CPU pressure (share of time some task waited for a CPU, avg 60 s) at start "
        f"{_psi(m)}, at end {_psi(result.machine_end)}. Other processes on the same cores make "
        f"every figure noisy: compare the ratios (to the baseline, to the limits of this run), "
        f"not the absolute times, across runs.",
        f"- workload: {cfg.steps} measured steps per configuration after {cfg.warmup} warm-up "
        f"steps, {cfg.train_gflop:g} GFLOP of fp32 "
        f"matmuls per training step (1 torch thread), buckets of {format_bytes(cfg.bucket_bytes)}, "
        f"staleness {cfg.staleness}, {cfg.max_inflight_buckets} buckets in flight per engine",
        f"- took {result.seconds:.0f} s"
        + (
            f" for the limits, designs and fleet sections; the nodes section ran afterwards "
            f"on a {result.nodes}-node local cluster"
            if result.node_runs
            else ""
        ),
        "",
    ]
    models = sorted({(r.model_bytes, r.model) for r in result.all_runs})
    out += ["Models:", ""] + [f"- {text}" for _, text in models] + [""]
    return out


def _limits_section(result: BenchResult) -> list[str]:
    measured = result.limits
    h0, h1, s, d = measured.host_start, measured.host_end, measured.object_store, measured.device
    out = [
        "## Limits (measured in this run, one thread)",
        "",
        "| limit | start | end |",
        "| --- | --- | --- |",
        f"| `copy_` into a touched buffer ({format_bytes(h0.nbytes)}, best of 5) "
        f"| {h0.copy_gbps:.2f} GB/s | {h1.copy_gbps:.2f} GB/s |",
        f"| `copy_` into a fresh buffer (page faults) "
        f"| {h0.fresh_copy_gbps:.2f} GB/s | {h1.fresh_copy_gbps:.2f} GB/s |",
        f"| xxh3-64 checksum | {h0.checksum_gbps:.2f} GB/s | {h1.checksum_gbps:.2f} GB/s |",
        f"| `copy_` split over {h0.copy_threads} threads at once (engine apply's "
        f"`copy_into`), bytes of all per second "
        f"| {h0.parallel_copy_gbps:.2f} GB/s | {h1.parallel_copy_gbps:.2f} GB/s |",
        f"| `ray.put` of a numpy buffer: best of 8 / first (fresh store pages) | "
        f"{s.put_gbps:.2f} / {s.put_fresh_gbps:.2f} GB/s | |",
        f"| `ray.get` + copy out, other process | {s.get_copy_gbps:.2f} GB/s | |",
    ]
    if d.skipped:
        out.append(f"| device-to-host into pinned buffers | skipped: {d.skipped} | |")
    else:
        out.append(
            f"| device-to-host into pinned / pageable buffers ({d.device}) | "
            f"{_f(d.pinned_gbps, '{:.2f}')} / {_f(d.pageable_gbps, '{:.2f}')} GB/s | |"
        )
    lf = result.limits.lag_floor
    out.append(
        f"| event-loop lag p99 (max) of an idle asyncio loop; while 1 / 2 other processes copy "
        f"| {_f(lf.idle_p99_ms, '{:.1f}')} ({_f(lf.idle_max_ms, '{:.0f}')}) ms; "
        f"{_f(lf.one_busy_p99_ms, '{:.1f}')} ({_f(lf.one_busy_max_ms, '{:.0f}')}) / "
        f"{_f(lf.two_busy_p99_ms, '{:.1f}')} ({_f(lf.two_busy_max_ms, '{:.0f}')}) ms | |"
    )
    copy, hash_ = result.copy_limit_gbps, result.checksum_limit_gbps
    out += [
        "",
        f"Limits of each configuration come from these bandwidths (means of start and end: "
        f"copy {copy:.2f} GB/s, checksum {hash_:.2f} GB/s) and the machine's "
        f"{result.cores} cores:",
        "",
        "- **build**: read the weights once, write the buckets once, hash what was just "
        "written: one fused pass, `max(copy, checksum)` of the model; builds are also given as "
        "a fraction of *one copy*;",
        "- **same-node session to k engines**: no payload moves (each engine maps the "
        "snapshot); each engine verifies it (one checksum pass) and copies it into its weights "
        "(one copy), up to one engine per core at once: "
        "`k x (model/checksum + model/copy) / min(k, cores)`; one engine's limit is one "
        "checksum pass then one copy, whatever the cores (compare the split copy above: "
        "where memory bandwidth is the limit, a second thread adds little);",
        "- **trainer stall**: against the pure copy time of the model (the least a build takes).",
        "",
        "| model | one copy ms | one checksum ms | build limit (fused) ms "
        "| same-node session limit, 1 engine ms | 8 engines ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for nbytes in sorted({r.model_bytes for r in result.all_runs}):
        model = limits(result, nbytes)
        out.append(
            f"| {format_bytes(nbytes)} | {model.copy_s * 1e3:.1f} | {model.hash_s * 1e3:.1f} "
            f"| {model.build_s * 1e3:.1f} | {model.session_s(1) * 1e3:.1f} "
            f"| {model.session_s(8) * 1e3:.1f} |"
        )
    return [*out, ""]


def _designs_section(result: BenchResult, rows: list[Row]) -> list[str]:
    out = [
        "## Designs: the serialized baseline and asyncsync by transport (medians over the steps)",
        "",
        "| model, engines | design | stall/step ms | stall x | stall / pure copy | end-to-end ms "
        "| session s | sync GB/s | sync x | session % of same-node limit | build ms "
        "| build % of one copy | build % of fused limit |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: |",
    ]
    section = rows_of(rows, DESIGNS)
    for row in section:
        if row["error"]:
            out.append(
                f"| {row['config']} | {row['design']} | failed: {row['error']} |" + " |" * 10
            )
            continue
        out.append(
            f"| {row['config']} | {row['design']} | {_f(row['stall_ms'])} "
            f"| {_f(row['stall_x'], '{:.1f}x', '')} | {_f(row['stall_copy_x'], '{:.2f}x')} "
            f"| {_f(row['e2e_ms'])} | {_f(row['session_s'], '{:.3f}')} "
            f"| {_f(row['sync_gbps'], '{:.2f}')} "
            f"| {_f(row['sync_x'], '{:.1f}x', '')} | {_pct(row['session_frac'])} "
            f"| {_f(row['build_ms'])} | {_pct(row['build_frac'])} "
            f"| {_pct(row['build_fused_frac'])} |"
        )
    out += [
        "",
        "*stall/step*: how long the train loop waited on weight sync per step (baseline: build "
        "+ sync; asyncsync: build + staleness wait), *stall x* the baseline's over this one; "
        "*end-to-end*: from the end of a training step until every engine committed it (or a "
        "newer step); *session*: one session (all engines served) and its snapshot bytes per "
        "second; *session % of same-node limit*: the limit for this many engines over the "
        "session's time (a same-node-only figure: the object store and the collective move "
        "payload bytes besides, so they cannot reach it).",
        "",
        "| model, engines | design | loop lag p99 ms in builds (max) / elsewhere "
        "| ping in build ms | max lock hold ms | peak RSS (private) trainer / engine "
        "| steady cache / bound | train step ms | run s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in section:
        if row["error"]:
            continue
        out.append(
            f"| {row['config']} | {row['design']} "
            f"| {_f(row['lag_p99_ms'], '{:.1f}', 'n/a (sync actor)')}"
            f"{_f(row['lag_max_ms'], ' ({:.0f})', '')}"
            f"{_f(row['other_lag_p99_ms'], ' / {:.1f}', '')} "
            f"| {_f(row['ping_ms'])} | {_f(row['lock_hold_ms'], '{:.1f}')} "
            f"| {format_bytes(row['trainer_rss_bytes'])} "
            f"({format_bytes(row['trainer_private_bytes'])}) / "
            f"{format_bytes(row['engine_rss_bytes'])} "
            f"({format_bytes(row['engine_private_bytes'])}) "
            f"| {format_bytes(row['resident_bytes'])} "
            f"/ {format_bytes(row['resident_bound_bytes'])} "
            f"| {_f(row['train_ms'])} | {row['run_s']:.1f} |"
        )
    out += [
        "",
        "*loop lag* is measured inside the train actor by a task sleeping 2 ms, over the "
        "wake-ups during measured builds and, after the slash, over all its other wake-ups (the "
        "OS scheduling noise floor); *ping in build*: how long the train actor took to answer a "
        "no-op call sent during a build; *peak RSS* is sampled every 20 ms inside each actor "
        "(the largest engine shown) and counts mapped object-store and shared-memory pages, "
        "*private* leaves those out; *steady cache*: the most the cache held after the second "
        "build (baseline: old snapshot + the build).",
        "",
    ]
    return out


def _engine_section(result: BenchResult, rows: list[Row]) -> list[str]:
    measured = [r for r in rows if not r["error"] and math.isfinite(r["engine_apply_ms"])]
    if not measured:
        return []
    out = [
        "## Engine side: receive, verify, apply (per engine and session, medians)",
        "",
        f"Measured inside each engine by the receiver (`ReceiverStats`): *load* gets a bucket's "
        f"bytes from its payload (the shared snapshot: a view of the train actor's buffer, "
        f"mapped once and kept between sessions; the object store: `ray.get`; the "
        f"collective: receive it; the baseline: write `/dev/shm` and `torch.load`), *verify* "
        f"checks it against the manifest (one checksum pass), *apply* copies it into the "
        f"engine's weights. Fractions are of the single-thread limits "
        f"(checksum {result.checksum_limit_gbps:.2f} GB/s, "
        f"copy {result.copy_limit_gbps:.2f} GB/s); "
        f"with more engines than cores they share the cores. Load and verify are summed over "
        f"a session's buckets, and up to {result.config.max_inflight_buckets} buckets load and "
        f"verify at once in separate threads: their sums can exceed the wall time (the "
        f"sessions table below has the stream's wall time); apply is one pass, split over "
        f"up to {_copy_threads()} threads (`copy_into`): on a machine whose memory bandwidth "
        f"one core already fills, more threads do not copy faster.",
        "",
        "| section | model, engines | design | load ms | verify ms | verify GB/s (% of checksum) "
        "| apply ms | apply GB/s (% of copy) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in measured:
        out.append(
            f"| {row['section']} | {row['config']} | {row['design']} "
            f"| {_f(row['engine_load_ms'], '{:.1f}')} "
            f"| {_f(row['engine_verify_ms'], '{:.1f}')} "
            f"| {_f(row['engine_verify_gbps'], '{:.2f}')} ({_pct(row['verify_frac'])}) "
            f"| {_f(row['engine_apply_ms'], '{:.1f}')} "
            f"| {_f(row['engine_apply_gbps'], '{:.2f}')} ({_pct(row['apply_frac'])}) |"
        )
    return [*out, ""]


def _fleet_section(result: BenchResult, rows: list[Row]) -> list[str]:
    section = rows_of(rows, FLEET)
    if not section:
        return []
    cfg = result.config
    out = [
        "## Fleet: sessions to more engines, by commit policy "
        f"({format_bytes(section[0]['model_bytes'])}, "
        f"transport {cfg.fleet_transport})",
        "",
        "Light engines (`TensorEngine`: plain tensors, one copy at commit), one set of actors "
        "reset between configurations. *fleet* commits only once every engine is prepared (two "
        "phases); *per_engine* commits each engine as soon as it is prepared and returns once "
        "`min_engines` (1) committed and the rest had as long again.",
        "",
        "| policy | engines | session s | same-node limit s | session % of limit | stall/step ms "
        "| stall / pure copy | end-to-end ms | engine sessions by transport |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in section:
        if row["error"]:
            out.append(
                f"| {row['policy']} | {row['engines']} | failed: {row['error']} |" + " |" * 6
            )
            continue
        out.append(
            f"| {row['policy']} | {row['engines']} | {_f(row['session_s'], '{:.3f}')} "
            f"| {_f(row['session_limit_s'], '{:.3f}')} | {_pct(row['session_frac'])} "
            f"| {_f(row['stall_ms'])} | {_f(row['stall_copy_x'], '{:.2f}x')} | {_f(row['e2e_ms'])} "
            f"| {_transports(row['transports_used'])} |"
        )
    return [*out, ""]


def _slow_section(result: BenchResult, rows: list[Row]) -> list[str]:
    section = rows_of(rows, SLOW)
    if not section:
        return []
    cfg = result.config
    fleet = {(r["policy"], r["engines"]): r for r in rows_of(rows, FLEET) if not r["error"]}
    out = [
        f"## One slow engine: what each policy costs ({cfg.slow_engines} engines, one "
        f"{cfg.slow_factor:g}x slower at receiving and applying)",
        "",
        "Same workload and engines as the fleet rows; `engine0` sleeps "
        f"{cfg.slow_factor - 1:g}x as long as each receive and apply took. *plain* is the fleet "
        "row with the same policy and engine count and no slow engine (when it ran).",
        "",
        "| policy | session s: slow / plain | stall/step ms: slow / plain "
        "| worst stall ms: slow / plain | end-to-end ms: slow / plain | sessions for the steps "
        "| of them returned without the slow engine | engine sessions by transport |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in section:
        if row["error"]:
            out.append(f"| {row['policy']} | failed: {row['error']} |" + " |" * 4)
            continue
        plain = fleet.get((row["policy"], row["engines"]))

        def pair(key: str, fmt: str, plain: Row | None = plain, row: Row = row) -> str:
            return f"{_f(row[key], fmt)} / {_f(plain[key], fmt) if plain else 'n/a'}"

        out.append(
            f"| {row['policy']} | {pair('session_s', '{:.3f}')} | {pair('stall_ms', '{:.0f}')} "
            f"| {pair('stall_max_ms', '{:.0f}')} | {pair('e2e_ms', '{:.0f}')} "
            f"| {row['sessions']} for {cfg.steps} | {row['left_behind']} "
            f"| {_transports(row['transports_used'])} |"
        )
    out += [
        "",
        "Under *fleet* every session waits for the slow engine, and the train loop waits once "
        "the engines fall more than the staleness bound behind: every step. Under *per_engine* "
        "a session returns once the others committed and the slow engine had as long again; "
        "the slow engine goes on in the background (reported `catching_up`, out of the "
        "staleness count). When it has committed that older step it serves again and counts "
        "toward the staleness bound: the train loop then waits (the worst stall) until a "
        "session leaves it behind once more.",
        "",
    ]
    return out


def _nodes_section(result: BenchResult, rows: list[Row]) -> list[str]:
    section = rows_of(rows, NODES)
    if not section:
        return []
    cfg = result.config
    out = [
        f"## Nodes: the same engines on more nodes ({result.nodes}-node local cluster, "
        f"{cfg.node_engines} engines, {format_bytes(section[0]['model_bytes'])}, transport "
        f"{cfg.fleet_transport})",
        "",
        "The train actor runs on the head (node 0); the engines run round robin on the nodes "
        "listed. All nodes share this machine's cores and memory: what grows with the nodes is "
        "what crosses between them (each node pulls every bucket it needs once into its own "
        "object store), not compute. *bytes in* is what arrived in the object stores of the "
        "engines' nodes other than the head per session, read from the raylets' object-store "
        "usage (a lower bound: see `StoreWatch.risen`); *expected* is one model per such node.",
        "",
        "| engines on nodes | nodes in all | policy | session s | sync GB/s | stall/step ms "
        "| engine sessions by transport | bytes in per session (expected) |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for row in section:
        nodes = row["nodes"]
        used = sorted(set(nodes) | {0})
        if row["error"]:
            out.append(
                f"| {nodes} | {len(used)} | {row['policy']} | failed: {row['error']} |" + " |" * 4
            )
            continue
        remote = [n for n in set(nodes) if n != 0]
        arrived = sum(row["node_bytes"][n] for n in remote) if row["node_bytes"] else float("nan")
        per = arrived / row["sessions"] if row["sessions"] else float("nan")
        expected = len(remote) * row["model_bytes"]
        out.append(
            f"| {', '.join(map(str, nodes))} | {len(used)} | {row['policy']} "
            f"| {_f(row['session_s'], '{:.3f}')} | {_f(row['sync_gbps'], '{:.2f}')} "
            f"| {_f(row['stall_ms'])} | {_transports(row['transports_used'])} "
            f"| {format_bytes(per) if math.isfinite(per) else 'n/a'} ({format_bytes(expected)}) |"
        )
    return [*out, ""]


def _targets_section(result: BenchResult, rows: list[Row]) -> list[str]:
    calm = quiet(result.machine)
    engines = " and ".join(f"{k} engine" + ("s" if k > 1 else "") for k in SESSION_TARGETS)
    out = [
        "## Targets",
        "",
        f"Reported, not enforced. The quiet-machine build target is judged only when the CPU "
        f"pressure at the start was below {QUIET_PSI:g}% (it was {_psi(result.machine)}); the "
        f"same-node session target for {engines} "
        f"only where every engine session used the shared snapshot; engine apply for 1 engine.",
        "",
        "| model, engines | design | " + " | ".join(t for t, _ in TARGETS.values()) + " |",
        "| --- | --- |" + " --- |" * len(TARGETS),
    ]
    if calm is None:
        out[2] += " (CPU pressure unknown here)"
    for row in rows:
        if not row["targets"]:
            continue
        marks = " | ".join(
            f"{_mark(row['targets'][k])} ({_f(row[k], _TARGET_FORMAT[k])})" for k in TARGETS
        )
        out.append(f"| {row['config']} | {row['design']} | {marks} |")
    lf = result.limits.lag_floor
    out += [
        "",
        f"The loop-lag target is judged against the machine: an asyncio loop that shares "
        f"nothing with the build (the bench driver's) shows p99 {_f(lf.idle_p99_ms, '{:.1f}')} ms "
        f"when idle, {_f(lf.one_busy_p99_ms, '{:.1f}')} ms while one other *process* copies memory "
        f"and {_f(lf.two_busy_p99_ms, '{:.1f}')} ms while two do: an in-build p99 near those "
        f"figures is the OS scheduling the loop's thread, not the build blocking the loop.",
        "",
    ]
    return out


def _breakdown_section(result: BenchResult) -> list[str]:
    out = ["## Where the time goes", ""]
    limit = result.copy_limit_gbps
    for run in result.runs:
        b = run.breakdown
        if b is None:
            continue
        in_run = median(run.build_s)

        def line(name: str, seconds: float, note: str = "", b: BuildBreakdown = b) -> str:
            rate = f"{b.nbytes / 1e9 / seconds:.2f} GB/s" if seconds > 0 else ""
            share = f"{seconds / b.quiet_build_s * 100:.0f}%" if b.quiet_build_s > 0 else ""
            return f"| {name} | {seconds * 1e3:.1f} | {rate} | {share} | {note} |"

        out += [
            f"### Build of {format_bytes(b.nbytes)} ({b.buckets} buckets), measured on a quiet "
            f"train actor (best of {b.reps})",
            "",
            "| part | ms | GB/s | % of quiet build | note |",
            "| --- | ---: | ---: | ---: | --- |",
            line("group + layout (`TensorStream`, `layout`)", b.group_s),
            line(
                "flat `copy_` of as many bytes, bucket-sized touched buffers",
                b.flat_copy_s,
                "the copy limit, in this process, now",
            ),
            line(
                "`fill_buffer`: the copy alone, into the cache's shared buffers",
                b.copy_s,
                f"limits table: {limit:.2f} GB/s",
            ),
            line("xxh3 checksum of the payloads, a second pass", b.checksum_s),
            line(
                "`fill_and_hash`: copy and checksum in one pass",
                b.fused_s,
                "the cache's worker, per bucket",
            ),
            line(f"thread hops ({b.hops} x `asyncio.to_thread`)", b.hop_s),
            line(
                "page faults of fresh buffers (first build only)",
                b.alloc_fault_s,
                "fresh copy - touched copy",
            ),
            line("real build, pooled buffers, nothing else running", b.quiet_build_s),
            line("first build of the run (fresh buffers)", b.first_build_s),
            line("median build during the run", in_run, "competes with sessions and training"),
            "",
            "Against the copy limit measured here "
            f"({_f(b.nbytes / b.flat_copy_s / 1e9, '{:.2f}')} GB/s): "
            f"copy then checksum in two passes would reach {_serial_fraction(b):.0f}%, the fused "
            f"pass reaches {_fraction(b.nbytes, b.fused_s, b.flat_copy_s):.0f}% (the copy alone "
            f"{_fraction(b.nbytes, b.copy_s, b.flat_copy_s):.0f}%); the quiet build "
            f"{_fraction(b.nbytes, b.quiet_build_s, b.flat_copy_s):.0f}% "
            f"(the rest is the event loop, the thread hops and the lock) and the median build "
            f"during the run {_fraction(b.nbytes, in_run, b.flat_copy_s):.0f}% (it shares the "
            f"cores with the sessions of the previous step and the engines).",
            "",
            "Loop lag of the train actor during these quiet builds: "
            f"p99 {_f(b.quiet_lag.p99_ms, '{:.1f}')} ms "
            f"(max {_f(b.quiet_lag.max_ms, '{:.1f}')} ms, {b.quiet_lag.samples} wake-ups); "
            f"during an idle 0.3 s just before: p99 {_f(b.idle_lag.p99_ms, '{:.1f}')} ms "
            f"(max {_f(b.idle_lag.max_ms, '{:.1f}')} ms).",
            "",
        ]
    sessions = [
        r for r in result.all_runs if r.design != BASELINE and not r.error and r.session_parts_s
    ]
    if sessions:
        out += [
            "### Sessions, seen by the train actor (medians; seconds per session)",
            "",
            "*begin*: the engines accepted the manifest; *stream*: every bucket acknowledged "
            "(staged and verified) by the slowest engine; *commit*: its apply.",
            "",
            "| section | model, engines | design | session s | begin | stream | commit |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for run in sessions:
            p = run.session_parts_s
            out.append(
                f"| {run.section} | {run.config_label} | {run.label} | {median(run.session_s):.3f} "
                f"| {p['begin']:.3f} | {p['transfer']:.3f} | {p['commit']:.3f} |"
            )
        out.append("")
    measured = [r for r in result.runs if not r.error and r.usage and r.section == DESIGNS]
    if measured:
        out += [
            "### Builds and sessions in the run, seen by the train process (`getrusage`, medians)",
            "",
            "Process CPU counts every thread of the train actor (a session overlapping a build "
            "is included); *fresh MiB* is minor page faults x 4 KiB; *preempted* is involuntary "
            "context switches of the thread that ran the call (asyncsync: the event loop's); "
            "*pool hits* counts measured builds that found a snapshot's worth of pooled buffers.",
            "",
            "| model, engines | design | build wall ms | build CPU user/sys ms | build fresh MiB "
            "| build preempted | pool hits | session wall ms | session CPU user/sys ms "
            "| session fresh MiB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for run in measured:
            bu, ss = usage_stats(run, "build"), usage_stats(run, "session")
            if not bu:
                continue
            pool = "n/a" if run.design == BASELINE else f"{bu['pool_hits']:.0f}/{bu['count']:.0f}"
            sess = (
                f"{ss['wall_ms']:.0f} | {ss['user_ms']:.0f}/{ss['sys_ms']:.0f} "
                f"| {ss['fault_mib']:.0f}"
                if ss
                else "| |"
            )
            out.append(
                f"| {run.config_label} | {run.label} | {bu['wall_ms']:.0f} "
                f"| {bu['user_ms']:.0f}/{bu['sys_ms']:.0f} "
                f"| {bu['fault_mib']:.0f} | {bu['loop_preemptions']:.0f} | {pool} | {sess} |"
            )
        out.append("")
    return out


def _serial_fraction(b: BuildBreakdown) -> float:
    return _fraction(b.nbytes, b.copy_s + b.checksum_s, b.flat_copy_s)


def _fraction(nbytes: int, seconds: float, limit_s: float) -> float:
    """Percent of the copy limit (``nbytes`` copied flat in ``limit_s``) ``seconds`` reaches."""
    if not seconds > 0 or not limit_s > 0:
        return float("nan")
    return limit_s / seconds * 100


def _correctness_section(result: BenchResult) -> list[str]:
    out = ["## Correctness", ""]
    if result.failures:
        out += [f"- **{f}**" for f in result.failures]
    else:
        out.append(
            "- every engine of every configuration serves the last step and holds the trainer's "
            "weights bit for bit (xxh3 of every tensor), and every design, policy and placement "
            "delivered identical bytes for each model size"
        )
    overlap = [r for r in result.runs if r.design != BASELINE and not r.error]
    if overlap:
        builds = sum(r.builds_during_sessions for r in overlap)
        sessions = sum(r.sessions_during_training for r in overlap)
        out.append(
            f"- overlap (recorded spans, asyncsync): {sessions} sessions ran during a training "
            f"step and {builds} builds during a session; see `trace.json` (chrome://tracing or "
            "ui.perfetto.dev)"
        )
    return [*out, ""]


def trace_processes(result: BenchResult) -> list[tuple[str, list[Lane]]]:
    """The spans of every run for :func:`~asyncsync.spans.chrome_trace`: one process per
    configuration, one lane per span kind (train, build, session, the driver's waits)."""
    processes: list[tuple[str, list[Lane]]] = []
    for run in result.all_runs:
        kinds = [*_LANES, *sorted({s.kind for s in run.spans} - set(_LANES))]
        lanes: list[Lane] = [
            (_LANES.get(kind, kind), [s for s in run.spans if s.kind == kind]) for kind in kinds
        ]
        processes.append((f"{run.section}: {run.config_label} {run.label}", lanes))
    return processes


def write_outputs(result: BenchResult, out_dir: Path | str) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md``, ``bench.png`` and ``trace.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "bench.json",
        "markdown": out / "bench.md",
        "plot": out / "bench.png",
        "trace": out / "trace.json",
    }
    paths["json"].write_text(json.dumps(to_json(result), indent=1, allow_nan=False) + "\n")
    paths["markdown"].write_text(markdown(result, image="bench.png"))
    plot(result, paths["plot"])
    write_chrome_trace(paths["trace"], trace_processes(result), result.started_at)
    return paths


def publish(
    result: BenchResult, plot_path: Path, root: Path | str, command: str
) -> dict[str, Path]:
    """Write ``BENCHMARKS.md`` and ``benchmarks/bench.png`` under ``root`` (the repository)."""
    base = Path(root)
    (base / "benchmarks").mkdir(parents=True, exist_ok=True)
    png = base / "benchmarks" / "bench.png"
    shutil.copyfile(plot_path, png)
    md = base / "BENCHMARKS.md"
    md.write_text(markdown(result, image="benchmarks/bench.png", command=command))
    return {"markdown": md, "plot": png}
