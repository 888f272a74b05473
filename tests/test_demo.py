"""The demo's program, small, on the session's Ray: it must keep passing its own checks."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from asyncsync.demo import print_report, run_demo


async def test_demo_runs_and_its_checks_pass(ray_local: Any) -> None:
    console = Console(record=True, width=120)
    result = await run_demo(steps=4, size="tiny", transport="shm", console=console)
    assert result.failures == []
    assert [r.step for r in result.reports][-1] == 3
    assert result.sessions_during_training >= 1  # sessions streamed while training ran
    assert all(result.generations.values())
    print_report(result, console)
    text = console.export_text()
    assert "engines == trainer snapshot" in text
