"""A fast smoke run of ``asyncsync bench`` on the session's Ray: outputs exist, are
well-formed, and both designs delivered bit-identical weights to their engines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from asyncsync.bench import BenchConfig, run_bench
from asyncsync.bench.report import TARGETS, publish, summarize, write_outputs
from asyncsync.bench.runner import BASELINE, DESIGNS, FLEET, SLOW, check_delivery
from asyncsync.bench.workload import llama_spec, parse_size
from asyncsync.cli import main

MIB = 1 << 20


def test_llama_spec_has_realistic_shapes_and_dtypes() -> None:
    spec = llama_spec(256 * MIB)
    assert abs(spec.nbytes - 256 * MIB) < 0.05 * 256 * MIB
    dtypes = {t.dtype for t in spec.tensors}
    assert dtypes == {"bfloat16", "float32"}
    names = [t.name for t in spec.tensors]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert len(names) == len(set(names))
    assert parse_size("1GiB") == 1 << 30 and parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("12 parsecs")


def test_cli_refuses_bad_sizes_before_starting_ray() -> None:
    assert main(["bench", "--sizes", "lots", "--no-publish"]) == 2


async def test_bench_smoke(ray_local: Any, tmp_path: Path) -> None:
    config = BenchConfig(
        sizes=(4 * MIB,),
        engines=(2,),
        steps=2,
        warmup=1,
        transports=("object_store", "shm"),
        bucket_bytes=1 * MIB,
        train_gflop=0.2,
        limit_bytes=8 * MIB,
        fleet_engines=(1, 2),
        slow_engines=2,
        slow_factor=4.0,
    )
    result = await run_bench(config)

    # Every configuration ran, and the comparison is honest: same bytes everywhere.
    designs = [r for r in result.runs if r.section == DESIGNS]
    assert [r.label for r in designs] == [BASELINE, "asyncsync/object_store", "asyncsync/shm"]
    fleet = [(r.policy, r.engines) for r in result.runs if r.section == FLEET]
    assert fleet == [("fleet", 1), ("fleet", 2), ("per_engine", 1), ("per_engine", 2)]
    slow = [r for r in result.runs if r.section == SLOW]
    assert [(r.policy, r.engines, r.slowdown) for r in slow] == [
        ("fleet", 2, 4.0),
        ("per_engine", 2, 4.0),
    ]
    assert [r.error for r in result.runs] == [None] * len(result.runs)
    assert result.failures == [] and result.ok
    digests = {d for r in result.runs for d in (r.trainer_digest, *r.engine_digests)}
    assert len(digests) == 1, digests
    last = config.warmup + config.steps - 1
    assert all(r.engine_versions == [last] * r.engines for r in result.runs)
    assert check_delivery(result.runs) == []

    # Figures are there and plausible.
    for run in result.runs:
        assert len(run.stalls_s) == 2 and all(s > 0 for s in run.stalls_s)
        assert run.build_s and run.session_s and run.session_gbps
        assert run.trainer_rss_peak > 0 and run.engine_rss_peak > 0
        assert run.resident_steady_bytes > 0
        assert {u.kind for u in run.usage} == {"build", "session"}
        assert {"build", "session", "train", "stall"} <= {s.kind for s in run.spans}
        assert run.engine_sessions and all(s.apply_s > 0 for s in run.engine_sessions)
    fast = [r for r in result.runs if r.design != BASELINE]
    assert all(r.lag is not None and r.lag.samples > 0 for r in fast)
    assert all(r.transports_used for r in fast)
    assert all(s.verify_s > 0 for r in fast for s in r.engine_sessions)
    assert fast[0].breakdown is not None and fast[0].breakdown.copy_s > 0
    limits = result.limits
    assert limits.host_start.copy_gbps > 0 and limits.object_store.put_gbps > 0
    assert limits.device.skipped or limits.device.pinned_gbps
    assert limits.lag_floor.two_busy_p99_ms >= 0

    paths = write_outputs(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["ok"] is True
    assert len(data["summary"]) == len(result.runs)
    rows = summarize(result)
    assert set(rows[1]["targets"]) == set(TARGETS)
    assert rows[1]["stall_x"] > 0 and rows[1]["sync_x"] > 0
    assert all(r["session_frac"] > 0 and r["stall_copy_x"] > 0 for r in rows)
    assert all(r["engine_apply_gbps"] > 0 for r in rows)

    text = paths["markdown"].read_text()
    for heading in (
        "## Limits",
        "## Designs",
        "## Engine side",
        "## Fleet",
        "## One slow engine",
        "## Targets",
        "## Where the time goes",
    ):
        assert heading in text, heading
    assert "| model, engines | design | stall/step ms" in text and "asyncsync/shm" in text
    assert "## Nodes" not in text  # only with a multi-node part
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    trace = json.loads(paths["trace"].read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {"build", "session", "train"} <= {e["cat"] for e in spans}
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)

    published = publish(result, paths["plot"], tmp_path / "repo", "make bench")
    assert "benchmarks/bench.png" in published["markdown"].read_text()
    assert published["plot"].exists()


async def test_lag_summary_reads_the_library_probe_by_window() -> None:
    import asyncio
    import time

    from asyncsync.bench.probes import lag_probe, lag_summary

    probe = lag_probe(0.002)
    probe.start()
    await asyncio.sleep(0.05)
    start = time.time()
    time.sleep(0.1)  # noqa: ASYNC251 - blocks this loop on purpose
    await asyncio.sleep(0.01)
    end = time.time()
    await probe.stop()
    inside = lag_summary(probe, [(start, end)])
    outside = lag_summary(probe, [(start, end)], inside=False)
    assert inside.samples >= 1 and inside.max_ms >= 90
    assert outside.samples > 5 and outside.max_ms < 90
