"""Test support for asyncsync users and for asyncsync's own suite.

``asyncsync.testing.pytest_plugin`` is registered through the ``pytest11`` entry
point: installing asyncsync makes its fixtures and markers available to any pytest
suite. :class:`LoopLagProbe` and :class:`LoopLagMixin` measure an actor's event
loop from inside. :func:`local_ray` starts a private local Ray;
:func:`connect_or_start_ray` joins a cluster only when the user names one.
Nothing in the library imports this package.
"""

from __future__ import annotations

from .looplag import LoopLagMixin, LoopLagProbe, LoopLagReport
from .ray_cluster import connect_or_start_ray, local_ray

__all__ = [
    "LoopLagMixin",
    "LoopLagProbe",
    "LoopLagReport",
    "connect_or_start_ray",
    "local_ray",
]
