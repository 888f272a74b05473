"""A cluster is joined only when the user names it; local_ray always starts its own.

The cluster to join is the test session's own Ray (``ray_local``), named to a
separate program through ``RAY_ADDRESS``, as a user would name theirs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = """
import ray
from asyncsync.testing import connect_or_start_ray, local_ray

def gcs():
    return ray.get_runtime_context().gcs_address

with local_ray(num_cpus=1):
    print("local_ray", gcs())
with connect_or_start_ray(num_cpus=1) as info:
    print("connect_or_start_ray", gcs(), info["joined"])
"""


def test_a_cluster_is_joined_only_when_the_user_names_it(
    ray_local: dict[str, Any], tmp_path: Path
) -> None:
    address = ray_local["address"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        env={**env, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    # RAY_ADDRESS names a running cluster: local_ray still starts its own ...
    assert seen["local_ray"] != address
    # ... and connect_or_start_ray joins the named one, as the user asked.
    assert seen["connect_or_start_ray"] == f"{address} True"
