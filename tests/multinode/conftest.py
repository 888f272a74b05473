"""The multi-node suite: one ``ray_cluster`` (a head and 3 worker nodes) for all of it.

It runs in a pytest process of its own (``pytest tests/multinode``; ``make test``
runs it after the main suite), because a process holds one Ray and the main
suite's is the one-node ``ray_local``. Every test requests ``ray_cluster``, so
``actor_factory`` creates its actors there; a test that adds or removes nodes
leaves the cluster as it found it.

The train actor and its engines are shared by every module (``fleet``): seven
actors that import torch cost most of the suite's time to start. Tests that need
a node to lose add one of their own; the shared engines' nodes stay up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import ray
from _fleet import Fleet, start_fleet

from asyncsync.testing import LocalCluster


@pytest.fixture(scope="session")
async def fleet(ray_cluster: LocalCluster) -> AsyncIterator[Fleet]:
    """The train actor on the head, ``head-e0`` beside it, two engines on each worker node."""
    made = await start_fleet(ray_cluster)
    yield made
    for handle in [made.trainer, *made.engines.values()]:
        ray.kill(handle, no_restart=True)
