"""pytest plugin: a session-scoped local Ray, an actor factory, and a ``gpu`` marker.

Registered through the ``pytest11`` entry point, so ``pip install asyncsync`` makes
these fixtures available. With pytest-asyncio 1.x, async tests that await actors
can use any loop scope: the Ray fixture is synchronous and session-scoped.

Fixtures:
    ``ray_local``       one local Ray for the whole session (see :func:`local_ray`)
    ``actor_factory``   ``make(actor_class, *args, **kwargs)`` -> handle; killed at teardown
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .ray_cluster import local_ray


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "asyncsync_ray_num_cpus",
        "CPUs the session-scoped local Ray advertises (default: the machine's cores)",
        default="",
    )
    parser.addini(
        "asyncsync_object_store_bytes",
        "object store size of the session-scoped local Ray (default: Ray's)",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped cleanly without one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local(pytestconfig: pytest.Config) -> Iterator[dict[str, Any]]:
    """One local Ray for the whole test session (a start/stop costs seconds)."""
    cpus = str(pytestconfig.getini("asyncsync_ray_num_cpus") or "")
    store = str(pytestconfig.getini("asyncsync_object_store_bytes") or "")
    # Actor classes defined in test modules are pickled by reference: give the
    # workers the test directories pytest put on sys.path.
    root = pytestconfig.rootpath.resolve()
    test_dirs = [p for p in sys.path if p and Path(p).resolve().is_relative_to(root)]
    with local_ray(
        num_cpus=int(cpus) if cpus else None,
        object_store_memory=int(store) if store else None,
        pythonpath=test_dirs,
    ) as info:
        yield info


@pytest.fixture
def actor_factory(ray_local: dict[str, Any]) -> Iterator[Callable[..., Any]]:
    """``make(actor_class, *args, **kwargs)`` creates an actor that is killed at teardown.

    ``actor_class`` is a Ray actor class (``ray.remote(...)`` applied, options set).
    """
    import ray

    made: list[Any] = []

    def make(actor_class: Any, *args: Any, **kwargs: Any) -> Any:
        handle = actor_class.remote(*args, **kwargs)
        made.append(handle)
        return handle

    yield make
    for handle in made:
        ray.kill(handle, no_restart=True)
