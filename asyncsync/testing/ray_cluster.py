"""A private local Ray for tests, demos and scripts, and joining a cluster only when asked.

``ray.init()`` with no address joins whatever cluster it finds: the one named by
``RAY_ADDRESS``, or the last one ``ray start`` recorded in
``/tmp/ray/ray_current_cluster`` (even a stale record), and then refuses sizing
arguments such as ``num_cpus``. :func:`local_ray` never joins: it always starts a
cluster of its own. :func:`connect_or_start_ray` is for programs a user runs: it
joins a cluster only when the user named one (an explicit address, or
``RAY_ADDRESS``), and otherwise starts a private one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["connect_or_start_ray", "local_ray"]


@contextmanager
def local_ray(
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    *,
    pythonpath: list[str] | None = None,
    **init_kwargs: Any,
) -> Iterator[dict[str, Any]]:
    """Run a private local Ray for the duration of the block, then shut it down and clean up.

    Always a new cluster (``address="local"``), whatever else runs on the machine:
    ``RAY_ADDRESS`` and a ``ray_current_cluster`` file left by ``ray start`` are
    ignored. No dashboard; ``RAY_AUTH_MODE=disabled`` unless set, so no token
    file is written under the home directory; a short private temp dir (Ray's
    socket paths must stay under 107 bytes) removed afterwards. ``num_cpus``
    defaults to the machine's cores. ``pythonpath`` entries are prepended to
    ``PYTHONPATH`` for the cluster's workers while the block runs, so actor
    classes defined in test modules can be imported there. ``init_kwargs`` go
    to ``ray.init`` (an ``address`` among them is refused: use
    :func:`connect_or_start_ray` to join a cluster).

    Yields ``{"address": GCS address, "temp_dir": the private temp dir, "joined": False}``.
    """
    if "address" in init_kwargs:
        raise TypeError(
            "local_ray always starts its own cluster; use connect_or_start_ray(address) to join one"
        )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Workers started by this cluster inherit the environment; keep their noise down.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    import ray

    old_pythonpath = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [*pythonpath, *([old_pythonpath] if old_pythonpath else [])]
        )
    temp_dir = tempfile.mkdtemp(prefix="asr", dir="/tmp")
    try:
        ctx = ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=object_store_memory,
            _temp_dir=temp_dir,
            **init_kwargs,
        )
        try:
            yield {
                "address": ctx.address_info.get("address"),  # type: ignore[attr-defined]
                "temp_dir": temp_dir,
                "joined": False,
            }
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        if pythonpath:
            if old_pythonpath is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old_pythonpath


@contextmanager
def connect_or_start_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    **init_kwargs: Any,
) -> Iterator[dict[str, Any]]:
    """Join the Ray cluster the user named, or else run a private local one (:func:`local_ray`).

    Args:
        address: the cluster to join (``"auto"``, ``"host:port"``, ``"ray://..."``).
            ``None`` or ``""``: ``RAY_ADDRESS`` if it is set and not empty, else a
            private local Ray. A ``ray_current_cluster`` file alone never makes it join.
        num_cpus: CPUs of the private local Ray (``None``: the machine's cores). Not
            used when joining: a running cluster has its own resources.
        object_store_memory: object store bytes of the private local Ray (``None``:
            Ray's). Not used when joining.
        init_kwargs: further ``ray.init`` arguments, in both cases.

    Yields ``{"address": the GCS address or the address joined, "temp_dir": the private
    temp dir or None, "joined": bool}``.
    """
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target is None:
        with local_ray(num_cpus, object_store_memory, **init_kwargs) as info:
            yield info
        return
    import ray

    ray.init(address=target, **init_kwargs)
    try:
        yield {"address": target, "temp_dir": None, "joined": True}
    finally:
        ray.shutdown()
