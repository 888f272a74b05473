"""Turn a :class:`~asyncsync.bench.runner.BenchResult` into files: JSON, markdown, PNG, trace.

All functions here are blocking (file I/O, matplotlib); call them outside an event loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .records import BuildBreakdown
from .runner import BASELINE, BenchResult, RunResult
from .workload import format_bytes

__all__ = [
    "TARGETS",
    "chrome_trace",
    "markdown",
    "plot",
    "publish",
    "summarize",
    "to_json",
    "write_outputs",
]

TARGETS = {
    "stall_x": ("trainer stall >= 3x lower than baseline", 3.0),
    "sync_x": ("sync throughput >= 5x baseline", 5.0),
    "build_frac": ("build >= 60% of the copy limit", 0.60),
    "lag_p99_ms": ("event-loop lag p99 during a build < 5 ms", 5.0),
    "resident_frac": ("steady resident cache <= 2x model + 1 bucket", 1.0),
}

_TARGET_FORMAT = {
    "stall_x": "{:.1f}x",
    "sync_x": "{:.1f}x",
    "build_frac": "{:.0%}",
    "lag_p99_ms": "{:.1f} ms",
    "resident_frac": "{:.0%} of bound",
}

_LANES = {"train": 1, "build": 2, "session": 3, "stall": 4}


def _median(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def _baseline_of(run: RunResult, runs: Sequence[RunResult]) -> RunResult | None:
    for other in runs:
        if (
            other.design == BASELINE
            and not other.error
            and other.model_bytes == run.model_bytes
            and other.engines == run.engines
        ):
            return other
    return None


def summarize(result: BenchResult) -> list[dict[str, Any]]:
    """One row of headline figures per configuration (medians over the run's steps).

    Ratios against the baseline of the same model size and engine count
    (``nan`` when there is none); ``targets`` maps each target of :data:`TARGETS`
    to whether an asyncsync run met it (``None`` when not measurable).
    """
    rows = []
    limit = result.copy_limit_gbps
    for run in result.runs:
        base = _baseline_of(run, result.runs) if run.design != BASELINE else None
        stall = _median(run.stalls_s)
        sync = _median(run.session_gbps)
        build_s = _median(run.build_s)
        build_gbps = run.model_bytes / build_s / 1e9 if build_s > 0 else float("nan")
        row: dict[str, Any] = {
            "config": run.config_label,
            "design": run.label,
            "model_bytes": run.model_bytes,
            "engines": run.engines,
            "error": run.error,
            "stall_ms": stall * 1e3,
            "build_wait_ms": _median(run.build_wait_s) * 1e3,
            "stall_x": (_median(base.stalls_s) / stall) if base and stall > 0 else float("nan"),
            "e2e_ms": _median(run.e2e_s) * 1e3,
            "sync_gbps": sync,
            "sync_x": (sync / _median(base.session_gbps)) if base else float("nan"),
            "build_gbps": build_gbps,
            "build_frac": build_gbps / limit if limit > 0 else float("nan"),
            "lag_p99_ms": run.lag.p99_ms if run.lag else float("nan"),
            "lag_max_ms": run.lag.max_ms if run.lag else float("nan"),
            "other_lag_p99_ms": run.other_lag.p99_ms if run.other_lag else float("nan"),
            "ping_ms": _median(run.ping_ms),
            "lock_hold_ms": run.max_lock_hold_s * 1e3,
            "trainer_rss_bytes": run.trainer_rss_peak,
            "engine_rss_bytes": run.engine_rss_peak,
            "trainer_private_bytes": run.trainer_private_peak,
            "engine_private_bytes": run.engine_private_peak,
            "resident_bytes": run.resident_steady_bytes,
            "resident_bound_bytes": run.resident_bound_bytes,
            "resident_frac": run.resident_steady_bytes / run.resident_bound_bytes,
            "train_ms": _median(run.train_s) * 1e3,
            "run_s": run.run_s,
            "sessions": len(run.session_s),
            "steps_synced": run.steps_synced,
            "build_usage": _usage_stats(run, "build"),
            "session_usage": _usage_stats(run, "session"),
            "builds_during_sessions": run.builds_during_sessions,
            "sessions_during_training": run.sessions_during_training,
        }
        row["targets"] = _targets(row) if run.design != BASELINE and not run.error else {}
        rows.append(row)
    return rows


def _usage_stats(run: RunResult, kind: str) -> dict[str, float]:
    """Medians over the measured steps' :class:`~asyncsync.bench.probes.Usage` of ``kind``."""
    usage = [u for u in run.usage if u.kind == kind and u.step >= run.warmup]
    if not usage:
        return {}
    return {
        "count": float(len(usage)),
        "wall_ms": _median([u.wall_s for u in usage]) * 1e3,
        "user_ms": _median([u.user_s for u in usage]) * 1e3,
        "sys_ms": _median([u.sys_s for u in usage]) * 1e3,
        "fault_mib": _median([u.minor_faults * 4096 / 2**20 for u in usage]),
        "loop_preemptions": _median([float(u.loop_preemptions) for u in usage]),
        "pool_hits": float(sum(1 for u in usage if u.pooled_before >= run.model_bytes)),
        "pooled_before_mib": _median([u.pooled_before / 2**20 for u in usage]),
    }


def _targets(row: dict[str, Any]) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for key, (_, bound) in TARGETS.items():
        value = row[key]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out[key] = None
        elif key in ("lag_p99_ms",):
            out[key] = value < bound
        elif key == "resident_frac":
            out[key] = value <= bound
        else:
            out[key] = value >= bound
    return out


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
    data["summary"] = summarize(result)
    data["ok"] = result.ok
    cleaned: dict[str, Any] = _clean(data)
    return cleaned


def _f(value: float | None, fmt: str = "{:.0f}", none: str = "n/a") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return none
    return fmt.format(value)


def _mark(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "n/a"}[ok]


def markdown(
    result: BenchResult, *, image: str | None = "bench.png", command: str | None = None
) -> str:
    """The report as markdown: machine, limits, results table, targets, time breakdowns, checks."""
    m = result.machine
    cfg = result.config
    rows = summarize(result)
    out = ["# asyncsync bench", ""]
    if command:
        out += [f"Regenerate with `{command}`.", ""]
    out += [
        f"- machine: {m['cpu_model']}, {m['logical_cores']} logical cores "
        f"({m['physical_cores']} physical), {format_bytes(m['ram_bytes'])} RAM, "
        f"/dev/shm {format_bytes(m['dev_shm_bytes'] or 0)}; {m['platform']}",
        f"- software: Python {m['python']}, torch {m['torch']}, ray {m['ray']}, numpy {m['numpy']}; "
        f"CUDA: {m['cuda'] or 'none'}",
        f"- load average (1/5/15 min) at start {_load(m)}, at end {_load(result.machine_end)}; "
        f"CPU pressure (share of time some task waited for a CPU, avg 60 s) at start "
        f"{_psi(m)}, at end {_psi(result.machine_end)}. Other processes on the same cores make "
        f"every figure noisy.",
        f"- workload: {cfg.steps} measured steps per configuration after {cfg.warmup} warm-up "
        f"steps, {cfg.train_gflop:g} GFLOP of fp32 "
        f"matmuls per training step (1 torch thread), buckets of {format_bytes(cfg.bucket_bytes)}, "
        f"staleness {cfg.staleness}, {cfg.max_inflight_buckets} buckets in flight per engine",
        f"- took {result.seconds:.0f} s",
        "",
    ]
    models = sorted({(r.model_bytes, r.model) for r in result.runs})
    out += ["Models:", ""] + [f"- {text}" for _, text in models] + [""]

    h0, h1, s, d = result.host_start, result.host_end, result.object_store, result.device
    out += [
        "## Limits (measured in this run, one thread)",
        "",
        "| limit | start | end |",
        "| --- | --- | --- |",
        f"| `copy_` into a touched buffer ({format_bytes(h0.nbytes)}, best of 5) | {h0.copy_gbps:.2f} GB/s | {h1.copy_gbps:.2f} GB/s |",
        f"| `copy_` into a fresh buffer (page faults) | {h0.fresh_copy_gbps:.2f} GB/s | {h1.fresh_copy_gbps:.2f} GB/s |",
        f"| xxh3-64 checksum | {h0.checksum_gbps:.2f} GB/s | {h1.checksum_gbps:.2f} GB/s |",
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
    lf = result.lag_floor
    out.append(
        f"| event-loop lag p99 (max) of an idle asyncio loop; while 1 / 2 other processes copy "
        f"| {_f(lf.idle_p99_ms, '{:.1f}')} ({_f(lf.idle_max_ms, '{:.0f}')}) ms; "
        f"{_f(lf.one_busy_p99_ms, '{:.1f}')} ({_f(lf.one_busy_max_ms, '{:.0f}')}) / "
        f"{_f(lf.two_busy_p99_ms, '{:.1f}')} ({_f(lf.two_busy_max_ms, '{:.0f}')}) ms | |"
    )
    out += [
        "",
        f"Copy limit used for the build fraction: {result.copy_limit_gbps:.2f} GB/s (mean of start and end).",
        "",
        "## Results (medians over the steps of each configuration)",
        "",
        "| model, engines | design | stall/step ms | stall x | end-to-end ms | sync GB/s | sync x "
        "| build GB/s | build % copy limit | loop lag p99 ms in builds (max) / elsewhere | ping in build ms "
        "| max lock hold ms | peak RSS (private) trainer / engine | steady cache / bound | train step ms | run s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row["error"]:
            out.append(
                f"| {row['config']} | {row['design']} | failed: {row['error']} |" + " |" * 14
            )
            continue
        out.append(
            f"| {row['config']} | {row['design']} | {_f(row['stall_ms'])} | {_f(row['stall_x'], '{:.1f}x', '')} "
            f"| {_f(row['e2e_ms'])} | {_f(row['sync_gbps'], '{:.2f}')} | {_f(row['sync_x'], '{:.1f}x', '')} "
            f"| {_f(row['build_gbps'], '{:.2f}')} | {_f(row['build_frac'] * 100, '{:.0f}%')} "
            f"| {_f(row['lag_p99_ms'], '{:.1f}', 'n/a (sync actor)')}"
            f"{_f(row['lag_max_ms'], ' ({:.0f})', '')}{_f(row['other_lag_p99_ms'], ' / {:.1f}', '')} | {_f(row['ping_ms'])} | {_f(row['lock_hold_ms'], '{:.1f}')} "
            f"| {format_bytes(row['trainer_rss_bytes'])} ({format_bytes(row['trainer_private_bytes'])}) / "
            f"{format_bytes(row['engine_rss_bytes'])} ({format_bytes(row['engine_private_bytes'])}) "
            f"| {format_bytes(row['resident_bytes'])} / {format_bytes(row['resident_bound_bytes'])} "
            f"| {_f(row['train_ms'])} | {row['run_s']:.1f} |"
        )
    out += [
        "",
        "Columns: *stall/step* is how long the train loop waited on weight sync per step "
        "(baseline: build + sync; asyncsync: build + staleness wait); *end-to-end* is from the end "
        "of a training step until every engine committed it (or a newer step); *sync GB/s* is one "
        "snapshot's bytes per second of a session (all engines served); *build % copy limit* is "
        "the build's GB/s over the single-thread copy limit; *loop lag* is measured inside the "
        "train actor by a task sleeping 2 ms, over the wake-ups during measured builds and, after "
        "the slash, over all its other wake-ups (the OS scheduling noise floor); *ping in build* is "
        "how long the train actor took to answer a no-op call sent during a build; *peak RSS* is "
        "sampled every 20 ms inside each actor (the largest engine shown) and counts mapped "
        "object-store and /dev/shm pages, *private* leaves those out; *steady cache* "
        "is the most the cache held after the second build (baseline: old snapshot + the build).",
        "",
    ]
    if image:
        out += [f"![stall and throughput per design]({image})", ""]
    out += _targets_section(rows)
    lf = result.lag_floor
    out += [
        f"The loop-lag target is judged against the machine: an asyncio loop that shares "
        f"nothing with the build (the bench driver's) shows p99 {_f(lf.idle_p99_ms, '{:.1f}')} ms "
        f"when idle, {_f(lf.one_busy_p99_ms, '{:.1f}')} ms while one other *process* copies memory "
        f"and {_f(lf.two_busy_p99_ms, '{:.1f}')} ms while two do. A build keeps one core busy "
        f"copying and, with its checksums overlapped, a second one hashing: an in-build p99 near "
        f"those figures is the OS scheduling the loop's thread, not the build blocking the loop.",
        "",
    ]
    out += _breakdown_section(result)
    out += ["## Correctness", ""]
    if result.failures:
        out += [f"- **{f}**" for f in result.failures]
    else:
        out.append(
            "- every engine of every configuration serves the last step and holds the trainer's "
            "weights bit for bit (xxh3 of every tensor), and the baseline and asyncsync delivered "
            "identical bytes for each model size"
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
    out.append("")
    return "\n".join(out)


def _psi(machine: dict[str, Any]) -> str:
    value = machine.get("cpu_pressure_some_avg60")
    return "n/a" if value is None else f"{value:.0f}%"


def _load(machine: dict[str, Any]) -> str:
    return "/".join(f"{v:.1f}" for v in machine["load_average"])


def _targets_section(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "## Targets",
        "",
        "| model, engines | design | " + " | ".join(t for t, _ in TARGETS.values()) + " |",
    ]
    out.append("| --- | --- |" + " --- |" * len(TARGETS))
    for row in rows:
        if not row["targets"]:
            continue
        marks = " | ".join(
            f"{_mark(row['targets'][k])} ({_f(row[k], _TARGET_FORMAT[k])})" for k in TARGETS
        )
        out.append(f"| {row['config']} | {row['design']} | {marks} |")
    return [*out, ""]


def _breakdown_section(result: BenchResult) -> list[str]:
    out = ["## Where the time goes", ""]
    limit = result.copy_limit_gbps
    for run in result.runs:
        b = run.breakdown
        if b is None:
            continue
        in_run = _median(run.build_s)

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
                "`copy_` of the model's tensors into touched buffers",
                b.copy_s,
                f"limits table: {limit:.2f} GB/s",
            ),
            line("xxh3 checksum of the payloads", b.checksum_s),
            line("`fill_buffer` into touched buffers", b.fill_s, "the cache's worker, per bucket"),
            line(
                "`fill_buffer` with checksums of earlier buckets in a 2nd thread",
                b.pipelined_s,
                "the cache's schedule, no event loop",
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
            f"Against the copy limit measured here ({_f(b.nbytes / b.flat_copy_s / 1e9, '{:.2f}')} GB/s): "
            f"copy then checksum one after the other would reach {_serial_fraction(b):.0f}%; with "
            f"the checksums overlapped in a second thread {_fraction(b.nbytes, b.pipelined_s, b.flat_copy_s):.0f}% "
            f"(copy and checksum are both memory-bound and share the memory bandwidth and the two "
            f"cores); the quiet build reaches {_fraction(b.nbytes, b.quiet_build_s, b.flat_copy_s):.0f}% "
            f"(the rest is the event loop, the thread hops and the lock) and the median build "
            f"during the run {_fraction(b.nbytes, in_run, b.flat_copy_s):.0f}%.",
            "",
            f"Loop lag of the train actor during these quiet builds: p99 {_f(b.quiet_lag.p99_ms, '{:.1f}')} ms "
            f"(max {_f(b.quiet_lag.max_ms, '{:.1f}')} ms, {b.quiet_lag.samples} wake-ups); during an idle "
            f"0.3 s just before: p99 {_f(b.idle_lag.p99_ms, '{:.1f}')} ms (max {_f(b.idle_lag.max_ms, '{:.1f}')} ms).",
            "",
        ]
    sessions = [
        r for r in result.runs if r.design != BASELINE and not r.error and r.session_parts_s
    ]
    if sessions:
        out += [
            "### Sessions (medians; seconds per session unless noted)",
            "",
            "| model, engines | design | session s | begin | stream (put + receive) | commit (apply) "
            "| engine receive+verify per bucket ms | engine apply per commit ms |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for run in sessions:
            p = run.session_parts_s
            out.append(
                f"| {run.config_label} | {run.label} | {_median(run.session_s):.3f} | {p['begin']:.3f} "
                f"| {p['transfer']:.3f} | {p['commit']:.3f} | {_median(run.engine_receive_s) * 1e3:.0f} "
                f"| {_median(run.engine_apply_s) * 1e3:.0f} |"
            )
        out.append("")
    measured = [r for r in result.runs if not r.error and r.usage]
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
            "| build preempted | pool hits | session wall ms | session CPU user/sys ms | session fresh MiB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for run in measured:
            bu, ss = _usage_stats(run, "build"), _usage_stats(run, "session")
            if not bu:
                continue
            pool = "n/a" if run.design == BASELINE else f"{bu['pool_hits']:.0f}/{bu['count']:.0f}"
            sess = (
                f"{ss['wall_ms']:.0f} | {ss['user_ms']:.0f}/{ss['sys_ms']:.0f} | {ss['fault_mib']:.0f}"
                if ss
                else "| |"
            )
            out.append(
                f"| {run.config_label} | {run.label} | {bu['wall_ms']:.0f} | {bu['user_ms']:.0f}/{bu['sys_ms']:.0f} "
                f"| {bu['fault_mib']:.0f} | {bu['loop_preemptions']:.0f} | {pool} | {sess} |"
            )
        out.append("")
    bases = [r for r in result.runs if r.design == BASELINE and not r.error]
    if bases:
        out += [
            "### Baseline sessions",
            "",
            "| model, engines | session s | build s | engine load (write shm + torch.load) per bucket ms | engine apply per bucket ms |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for run in bases:
            out.append(
                f"| {run.config_label} | {_median(run.session_s):.3f} | {_median(run.build_s):.3f} "
                f"| {_median(run.engine_receive_s) * 1e3:.0f} | {_median(run.engine_apply_s) * 1e3:.0f} |"
            )
        out.append("")
    return out


def _serial_fraction(b: BuildBreakdown) -> float:
    return _fraction(b.nbytes, b.copy_s + b.checksum_s, b.flat_copy_s)


def _fraction(nbytes: int, seconds: float, limit_s: float) -> float:
    """Percent of the copy limit (``nbytes`` copied flat in ``limit_s``) that ``seconds`` reaches."""
    if not seconds > 0 or not limit_s > 0:
        return float("nan")
    return limit_s / seconds * 100


def plot(result: BenchResult, path: Path) -> None:
    """Bar charts of stall per step, sync throughput and build fraction per design (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summarize(result) if not r["error"]]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    designs = list(dict.fromkeys(r["design"] for r in rows))
    by_key = {(r["config"], r["design"]): r for r in rows}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    width = 0.8 / max(1, len(designs))
    panels = [
        ("stall_ms", "trainer stall per step (ms, log)", True),
        ("sync_gbps", "sync throughput (GB/s)", False),
        ("build_frac", "build throughput / copy limit", False),
    ]
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        for i, design in enumerate(designs):
            xs, ys = [], []
            for j, config in enumerate(configs):
                row = by_key.get((config, design))
                value = row[key] if row else float("nan")
                if value is not None and math.isfinite(value):
                    xs.append(j + (i - (len(designs) - 1) / 2) * width)
                    ys.append(value)
            if xs:
                bars = ax.bar(xs, ys, width, label=design)
                fmt = (
                    "{:.0%}"
                    if key == "build_frac"
                    else ("{:.0f}" if key == "stall_ms" else "{:.2f}")
                )
                ax.bar_label(bars, labels=[fmt.format(y) for y in ys], fontsize=7)
        ax.set_xticks(range(len(configs)), configs)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        if key == "build_frac":
            ax.axhline(0.6, color="red", linestyle=":", linewidth=1, label="target 60%")
            ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="copy limit")
    for ax in axes:
        ax.legend(fontsize=7)
    m = result.machine
    fig.suptitle(
        f"asyncsync bench: {m['cpu_model']}, {m['logical_cores']} cores, load {_load(m)}; "
        f"medians of {result.config.steps} steps after {result.config.warmup} warm-up, "
        "per model size x engines",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def chrome_trace(result: BenchResult) -> dict[str, Any]:
    """Chrome-trace / Perfetto JSON: one process per configuration, one lane per span kind."""
    events: list[dict[str, Any]] = []
    origin = result.started_at
    for pid, run in enumerate(result.runs, start=1):
        events.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": pid,
                "tid": 0,
                "args": {"name": f"{run.config_label} {run.label}"},
            }
        )
        events.append(
            {
                "name": "process_sort_index",
                "ph": "M",
                "pid": pid,
                "tid": 0,
                "args": {"sort_index": pid},
            }
        )
        for kind, tid in _LANES.items():
            label = "train loop waits (driver)" if kind == "stall" else kind
            events.append(
                {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}}
            )
        for span in run.spans:
            events.append(
                {
                    "name": f"{span.kind} {span.step}",
                    "cat": span.kind,
                    "ph": "X",
                    "ts": round((span.start - origin) * 1e6, 1),
                    "dur": round(max(0.0, span.end - span.start) * 1e6, 1),
                    "pid": pid,
                    "tid": _LANES.get(span.kind, 9),
                    "args": {"step": span.step, "ok": span.ok},
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


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
    paths["trace"].write_text(json.dumps(_clean(chrome_trace(result)), allow_nan=False))
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
