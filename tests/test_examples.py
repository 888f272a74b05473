"""The examples and the demo run as a user would run them: each in its own process.

Another Ray cluster runs on the machine meanwhile, recorded where a plain
``ray.init()`` would find and join it (see ``_other_ray``): each must still start
a private Ray of its own and pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from _other_ray import OtherCluster, other_ray_cluster

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLI = str(Path(sys.executable).with_name("asyncsync"))  # the installed console script

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def other_cluster() -> Iterator[OtherCluster]:
    with other_ray_cluster() as cluster:
        yield cluster


def run(
    args: list[str], cwd: Path, other: OtherCluster, timeout_s: float = 280
) -> subprocess.CompletedProcess[str]:
    env = dict(other.env)
    # The outer run's per-test state must not leak into a user's pytest session.
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_CURRENT_TEST", None)
    command = args if args[0] == CLI else [sys.executable, *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )


def test_trio_driver_runs_and_engines_end_on_the_last_step(other_cluster: OtherCluster) -> None:
    proc = run([str(EXAMPLES / "trio_driver.py"), "--steps", "3"], EXAMPLES, other_cluster)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "engines serve step [2.0, 2.0]" in proc.stdout, proc.stdout


def test_async_rl_loop_keeps_the_staleness_bound_and_ends_in_sync(
    other_cluster: OtherCluster,
) -> None:
    proc = run(
        [str(EXAMPLES / "async_rl_loop.py"), "--steps", "4", "--staleness", "1"],
        EXAMPLES,
        other_cluster,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "engines serve step [3, 3]; identical to the trainer's: True" in proc.stdout, proc.stdout
    assert "break the bound" not in proc.stdout


def test_pytest_suite_example_passes(tmp_path: Path, other_cluster: OtherCluster) -> None:
    suite = EXAMPLES / "pytest_suite"
    report = tmp_path / "report.xml"
    proc = run(
        ["-m", "pytest", "-p", "no:cacheprovider", "-q", f"--junitxml={report}", str(suite)],
        suite,
        other_cluster,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cases = list(ET.parse(report).getroot().iter("testcase"))
    names = sorted(c.get("name", "") for c in cases)
    assert names == [
        "test_a_build_may_run_while_a_session_streams",
        "test_a_trio_or_asyncio_driver[asyncio]",
        "test_a_trio_or_asyncio_driver[trio]",
        "test_engine_serves_the_step_it_was_synced",
    ]
    assert all(len(c) == 0 for c in cases), "a test of the example suite did not pass"


def test_the_demo_passes_and_draws_the_run(other_cluster: OtherCluster, tmp_path: Path) -> None:
    out = tmp_path / "pictures"
    proc = run(
        [CLI, "demo", "--size", "tiny", "--steps", "3", "--out", str(out)], tmp_path, other_cluster
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "engines == trainer snapshot" in proc.stdout
    assert f"timeline: {out / 'timeline.png'}" in proc.stdout
    assert f"trace:    {out / 'trace.json'}" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pictures"]  # nothing else written
    assert (out / "timeline.png").read_bytes().startswith(b"\x89PNG")
    kinds = {e.get("cat") for e in json.loads((out / "trace.json").read_text())["traceEvents"]}
    assert {"stall", "train", "build", "session", "commit", "generate"} <= kinds
