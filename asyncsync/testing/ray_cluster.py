"""Start and stop a small local Ray cluster tuned for tests on small machines."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["local_ray"]


@contextmanager
def local_ray(
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    *,
    pythonpath: list[str] | None = None,
    **init_kwargs: Any,
) -> Iterator[dict[str, Any]]:
    """Run a local Ray for the duration of the block, then shut it down and clean up.

    No dashboard; ``RAY_AUTH_MODE=disabled`` so no token file is written under the
    home directory; a short private temp dir (Ray's socket paths must stay under
    107 bytes) removed afterwards. ``num_cpus`` defaults to the machine's cores.
    ``pythonpath`` entries are prepended to ``PYTHONPATH`` for the cluster's
    workers, so actor classes defined in test modules can be imported there.
    Yields ``ray.init``'s context information.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers started by this cluster inherit the environment; keep their noise down.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray

    if pythonpath:
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([*pythonpath, *([old] if old else [])])
    temp_dir = tempfile.mkdtemp(prefix="asr", dir="/tmp")
    try:
        ctx = ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=object_store_memory,
            _temp_dir=temp_dir,
            **init_kwargs,
        )
        try:
            yield {"address": ctx.address_info.get("address"), "temp_dir": temp_dir}  # type: ignore[attr-defined]
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
