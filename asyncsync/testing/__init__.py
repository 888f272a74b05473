"""Test support for asyncsync users and for asyncsync's own suite.

``asyncsync.testing.pytest_plugin`` is registered through the ``pytest11`` entry
point: installing asyncsync makes its fixtures available to any pytest suite.
Nothing in the library imports this package.
"""

from __future__ import annotations

from .ray_cluster import local_ray

__all__ = ["local_ray"]
