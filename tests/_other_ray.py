"""Another Ray cluster on the machine, as a user may have one: started by ``ray start``.

``ray start`` records its address in ``<ray temp dir>/ray_current_cluster``, and a
plain ``ray.init()`` joins the cluster that file names (then refuses ``num_cpus``).
The cluster started here records itself in a private ray temp dir, and the
environment it yields points ``RAY_TMPDIR`` there, so a program run with that
environment sees exactly what it would see with ``/tmp/ray/ray_current_cluster``
written by a user's ``ray start``, while other programs on the machine (other
test runs among them) see nothing of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OtherCluster:
    address: str
    """GCS address of the other cluster."""
    env: dict[str, str]
    """The environment of a program that must not join it (``RAY_TMPDIR`` points at its record)."""
    base: Path
    """The private directory holding everything the cluster wrote; removed at the end."""


def _ray_processes(marker: str) -> list[int]:
    """Pids of processes whose command line names ``marker`` (our private directory)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()):
                pids.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


@contextmanager
def other_ray_cluster(start_timeout_s: float = 60.0) -> Iterator[OtherCluster]:
    """Run ``ray start --head --block`` (1 CPU, no dashboard) for the block; then stop it.

    Everything it creates lives under one private directory, removed at the end
    with every process of that cluster, even when the block raises.
    """
    base = Path(tempfile.mkdtemp(prefix="aso", dir="/tmp"))  # short: socket paths
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(base)}
    env.pop("RAY_ADDRESS", None)
    record = base / "ray" / "ray_current_cluster"
    ray_cli = Path(sys.executable).with_name("ray")
    log_path = base / "ray-start.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            str(ray_cli),
            "start",
            "--head",
            "--block",
            "--port=0",
            f"--temp-dir={base / 'ray'}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so it can be ended as one
    )
    try:
        deadline = time.monotonic() + start_timeout_s
        while not (record.exists() and record.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"ray start did not record its address in {start_timeout_s} s")
            time.sleep(0.2)
        yield OtherCluster(record.read_text().strip(), env, base)
    finally:
        # SIGTERM makes `ray start --block` stop every process it started.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
        for pid in _ray_processes(str(base)):  # anything that outlived it
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(base, ignore_errors=True)
