"""The demo's program, small, on the session's Ray: its checks pass, and its pictures say so."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from asyncsync.demo import DemoResult, overlap_summary, print_report, run_demo, write_outputs
from asyncsync.spans import Span

# Read here, not in the async test: file I/O stays off the event loop.
DEMO_PAGE_TEXT = (Path(__file__).resolve().parent.parent / "docs" / "demo.md").read_text()


def trace_spans(trace: dict[str, Any], process: str) -> list[Span]:
    names = {
        e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"
    }
    return [
        Span(e["cat"], e["args"]["step"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6)
        for e in trace["traceEvents"]
        if e["ph"] == "X" and names[e["pid"]] == process
    ]


async def test_demo_runs_its_checks_pass_and_it_draws_the_run(
    ray_local: Any, tmp_path: Path
) -> None:
    console = Console(record=True, width=200)
    result: DemoResult = await run_demo(steps=4, size="tiny", transport="shm", console=console)
    assert result.failures == []
    assert [r.step for r in result.reports][-1] == 3
    assert result.served == {"engine0": 3, "engine1": 3}
    assert all(result.generations.values())
    assert result.sessions_during_training >= 1  # sessions streamed while training ran
    print_report(result, console)
    text = console.export_text()
    assert "engines == trainer snapshot" in text
    # The last progress frame and the table agree on what the engines serve.
    assert "engines serve v3 (done)" in text
    assert text.count("serves v3") == 2
    # Every line of the table is explained in the docs' page on the demo.
    explained = DEMO_PAGE_TEXT
    labels = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
    labels = [label for label in labels if label]
    assert len(labels) >= 8
    missing = [label for label in labels if label not in explained]
    assert not missing, f"docs/demo.md does not explain {missing}"
    # The overlap line is the recorded spans' and explains itself when nothing overlapped.
    summary = overlap_summary(result)
    assert f"{result.builds_during_sessions} of 4 builds ran while a session streamed" in summary
    assert ("none this time" in summary) == (result.builds_during_sessions == 0)

    paths = await asyncio.to_thread(write_outputs, result, tmp_path / "out")
    png = paths["timeline"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    trace = json.loads(paths["trace"].read_text())
    trainer = trace_spans(trace, "trainer")
    builds = [s for s in trainer if s.kind == "build"]
    sessions = [s for s in trainer if s.kind == "session"]
    assert sorted(s.step for s in builds) == [0, 1, 2, 3]
    assert sorted(s.step for s in sessions) == [r.step for r in result.reports]
    # The trace shows the same overlap as the run reported.
    assert result.builds_during_sessions == sum(
        1 for b in builds if any(b.overlaps(s) for s in sessions)
    )
    for engine in ("engine0", "engine1"):
        commits = [s for s in trace_spans(trace, engine) if s.kind == "commit"]
        assert [s.step for s in commits][-1] == 3


def test_the_trace_writer_keeps_process_and_lane_order() -> None:
    from asyncsync.spans import chrome_trace

    a, b = Span("train", 0, 10.0, 10.5), Span("build", 0, 10.5, 10.502, ok=False)
    trace = chrome_trace([("trainer", [("train", [a]), ("build", [b])]), ("engine0", [])], 10.0)
    meta = [(e["name"], e["pid"], e["tid"], e["args"]) for e in trace["traceEvents"]]
    assert ("process_name", 2, 0, {"name": "engine0"}) in meta
    assert ("thread_name", 1, 2, {"name": "build"}) in meta
    (build,) = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "build"]
    assert build == {
        "name": "build 0",
        "cat": "build",
        "ph": "X",
        "ts": 500000.0,
        "dur": 2000.0,
        "pid": 1,
        "tid": 2,
        "args": {"step": 0, "ok": False},
    }
