"""Nothing depends on what else runs on the machine: the demo and the helpers start their own Ray.

Another cluster, started by ``ray start``, runs meanwhile and is recorded where a
plain ``ray.init()`` would find and join it (see ``_other_ray``). The demo must
still start a private Ray and pass; joining a cluster happens only when asked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _other_ray import OtherCluster, other_ray_cluster

pytestmark = pytest.mark.slow

CLI = str(Path(sys.executable).with_name("asyncsync"))  # the installed console script


@pytest.fixture(scope="module")
def other_cluster() -> Iterator[OtherCluster]:
    with other_ray_cluster() as cluster:
        yield cluster


def run(
    args: list[str], other: OtherCluster, cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    command = args if args[0] == CLI else [sys.executable, *args]
    return subprocess.run(
        command,
        cwd=cwd,
        env={**other.env, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_the_demo_starts_its_own_ray_and_draws_the_run(
    other_cluster: OtherCluster, tmp_path: Path
) -> None:
    out = tmp_path / "pictures"
    proc = run(
        [CLI, "demo", "--size", "tiny", "--steps", "3", "--out", str(out)],
        other_cluster,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "engines == trainer snapshot" in proc.stdout
    assert f"timeline: {out / 'timeline.png'}" in proc.stdout
    assert f"trace:    {out / 'trace.json'}" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pictures"]  # nothing else written
    kinds = {e.get("cat") for e in json.loads((out / "trace.json").read_text())["traceEvents"]}
    assert {"train", "build", "session", "commit", "generate"} <= kinds


SCRIPT = """
import os, ray
from asyncsync.testing import connect_or_start_ray, local_ray

def gcs():
    return ray.get_runtime_context().gcs_address

with local_ray(num_cpus=1):
    print("local_ray", gcs())
with connect_or_start_ray(num_cpus=1) as info:
    print("connect_or_start_ray", gcs(), info["joined"])
"""


def test_a_cluster_is_joined_only_when_the_user_names_it(
    other_cluster: OtherCluster, tmp_path: Path
) -> None:
    proc = run(["-c", SCRIPT], other_cluster, cwd=tmp_path, RAY_ADDRESS=other_cluster.address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    # RAY_ADDRESS names the other cluster: local_ray still starts its own ...
    assert seen["local_ray"] != other_cluster.address
    # ... and connect_or_start_ray joins it, as the user asked.
    assert seen["connect_or_start_ray"] == f"{other_cluster.address} True"
