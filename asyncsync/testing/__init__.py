"""Test support for asyncsync users and for asyncsync's own suite.

``asyncsync.testing.pytest_plugin`` is registered through the ``pytest11`` entry
point: installing asyncsync makes its fixtures and markers available to any pytest
suite. :func:`local_ray` starts a private one-node Ray; :func:`connect_or_start_ray`
joins a cluster only when the user names one; :func:`local_cluster` runs a
multi-node Ray on this machine (a :class:`LocalCluster`: placement by node,
object-store bytes per node). :class:`LoopLagProbe` and :class:`LoopLagMixin`
measure an actor's event loop from inside. :mod:`asyncsync.testing.conformance`
(imported on its own: it needs pytest) is the engine conformance kit. Nothing in
the library imports this package.
"""

from __future__ import annotations

from .cluster import LocalCluster, StoreWatch, local_cluster
from .looplag import LoopLagMixin, LoopLagProbe, LoopLagReport
from .ray_cluster import connect_or_start_ray, local_ray

__all__ = [
    "LocalCluster",
    "LoopLagMixin",
    "LoopLagProbe",
    "LoopLagReport",
    "StoreWatch",
    "connect_or_start_ray",
    "local_cluster",
    "local_ray",
]
