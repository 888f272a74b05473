"""The repository's bench (``python -m benchmarks``): its command line, checked before
Ray starts, and a fast smoke run on the session's Ray: outputs exist, are
well-formed, and both designs delivered bit-identical weights to their engines."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import pytest

from asyncsync.testing import ray_cluster
from benchmarks.cli import build_parser, main
from benchmarks.probes import lag_probe, lag_summary
from benchmarks.report import TARGETS, publish, summarize, write_outputs
from benchmarks.runner import (
    BASELINE,
    DESIGNS,
    FLEET,
    SLOW,
    BenchConfig,
    check_delivery,
    run_bench,
)
from benchmarks.workload import llama_spec, parse_size

ROOT = Path(__file__).resolve().parent.parent

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


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command tries to start or join Ray."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the bench reached Ray before its arguments were checked")

    monkeypatch.setattr(ray_cluster, "connect_or_start_ray", refuse)


def test_every_option_says_what_it_does_and_its_default() -> None:
    options = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 5
    missing = [a.option_strings[0] for a in options if not a.help or "default" not in a.help]
    assert not missing, f"python -m benchmarks: options without help or default: {missing}"


def test_help_is_plain_text_and_says_each_default_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m benchmarks")
    for leftover in ("``", ":class:", ":func:", ":mod:", "%(default)", "::"):
        assert leftover not in text, leftover
    # One option for publishing, whose help states the default the parser has.
    assert "--no-publish" not in text
    start = text.index("\n  --publish ")
    publish = " ".join(text[start : text.index("\n  --publish-dir", start)].split())
    assert "(default: off" in publish


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--sizes", "12XB"], "--sizes: cannot read size '12XB'"),
        (["--sizes", "lots"], "--sizes: cannot read size 'lots'"),
        (["--bucket", "0"], "--bucket: size must be positive"),
        (["--engines", "1,0"], "--engines: must be >= 1, got 0"),
        (["--steps", "0"], "--steps: must be >= 1, got 0"),
        (["--transports", "carrier-pigeon"], "unknown transport 'carrier-pigeon'"),
        (["--policies", "eventually"], "unknown policy 'eventually'"),
        (["--train-gflop", "-1"], "--train-gflop: must be > 0"),
        (["--delta-fraction", "2"], "--delta-fraction: a share of the words is at most 1"),
        (["--delta-lrs", "1e-5,fast"], "--delta-lrs: expected a number, got 'fast'"),
        (["--address", "auto", "--num-cpus", "2"], "not with --address"),
        (["--address", "auto", "--nodes", "2"], "not with --address"),
        (["--out", "/proc/nope"], "--out: cannot write into '/proc/nope'"),
        (["--publish", "--publish-dir", "/proc/nope"], "--publish-dir: cannot write into"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_code_2_before_ray_starts(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m benchmarks: error: "), lines[0]
    assert says in lines[0]
    assert lines[0].endswith("(see python -m benchmarks --help)")


def test_the_bench_publishes_into_the_repository_only_when_asked() -> None:
    parser = build_parser()
    assert parser.parse_args([]).publish is False
    assert parser.parse_args(["--publish"]).publish is True
    # The documented ways to refresh BENCHMARKS.md publish, through this package.
    makefile = (ROOT / "Makefile").read_text()
    for target in ("bench", "bench-full"):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, re.M)
        assert recipe is not None and "-m benchmarks --publish" in recipe.group(1), target


def test_the_published_command_line_reproduces_the_run() -> None:
    from benchmarks.cli import _command_line

    def line(*argv: str) -> str:
        return _command_line(argparse.Namespace(argv=list(argv)))

    assert line("--publish") == "make bench"
    assert line("--publish", "--out", "x", "--publish-dir=y") == "make bench"
    assert line("--publish", "--engines", "1,2") == ("python -m benchmarks --publish --engines 1,2")


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
    assert fleet == [
        ("all_or_nothing", 1),
        ("all_or_nothing", 2),
        ("per_engine", 1),
        ("per_engine", 2),
    ]
    slow = [r for r in result.runs if r.section == SLOW]
    assert [(r.policy, r.engines, r.slowdown) for r in slow] == [
        ("all_or_nothing", 2, 4.0),
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


async def test_bench_reports_progress_inside_each_configuration(ray_local: Any) -> None:
    calls: list[tuple[str, int, int]] = []
    config = BenchConfig(
        sizes=(1 << 20,),
        engines=(1,),
        steps=2,
        warmup=1,
        transports=("shm",),
        baseline=False,
        limit_bytes=1 << 20,
        profile=False,
    )
    result = await run_bench(config, progress=lambda *call: calls.append(call))
    assert result.ok, (result.failures, [r.error for r in result.runs])
    assert [(done, total) for _, done, total in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    labels = {label for label, _, _ in calls}
    assert len(labels) == 1 and re.fullmatch(r"\[1/1\] .+ x1 asyncsync/shm", labels.pop())


async def test_delta_section_measures_a_real_step_and_sends_less_than_full(
    ray_local: Any,
) -> None:
    from benchmarks.delta import DeltaConfig, delta_markdown, run_delta

    config = DeltaConfig(
        lrs=(1e-5,),
        hidden=64,
        layers=1,
        vocab=256,
        batch=1,
        seq=8,
        lr_warmup=1,
        lr_steps=1,
        pack_bytes=64 << 10,
        size=1 * MIB,
        engines=(1,),
        transports=("object_store",),
        warmup=2,  # the store's base copy, then the engine's first offer (refused, it keeps)
        steps=1,
        bucket_bytes=256 << 10,
    )
    result = await run_delta(config)

    # A real AdamW step changes some, not all, of the bf16 weights, and the library's
    # encoding of it is smaller than the snapshot.
    (row,) = result.fraction_rows
    assert len(row.changed) == 1 and 0 < row.changed[0] < 1
    assert 0 < row.delta_bytes[0] < row.full_bytes
    assert row.sparse_buckets + row.bitmap_buckets > 0  # not all dense
    # The sessions' share is the one measured (lr 1e-6 was not, here).
    assert result.fractions == [(row.changed[0], "measured at lr 1e-05")]

    # The delta session sent the delta to the engine, fewer bytes than the full one sent.
    assert result.ok, (result.failures, [r.error for r in result.session_rows])
    full, delta = result.session_rows
    assert (full.mode, delta.mode) == ("full", "delta")
    assert full.delta_engines == [0] and delta.delta_engines == [1]
    assert full.sent_bytes == [full.snapshot_bytes] and full.snapshot_bytes > 0
    assert 0 < delta.sent_bytes[0] < full.sent_bytes[0]
    assert delta.fraction == full.fraction == row.changed[0]
    assert delta.changed and abs(delta.changed[0] - delta.fraction) < 0.5 * delta.fraction
    assert all(s > 0 for s in (*full.session_s, *delta.session_s, *full.build_s, *delta.apply_s))

    text = "\n".join(delta_markdown(result))
    assert "## Delta sync" in text and f"| object_store x1 @{delta.fraction * 100:.2f}% |" in text
