"""Fixtures shared by the conversion tests: a one-rank megatron world, the multi-rank run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from asyncsync.testing import megatron_shim as shim

from ._ranks import CASES, WORLD_SIZE, run_spawned


@pytest.fixture(scope="module")
def megatron_world() -> Iterator[None]:
    """A one-rank gloo world with megatron's parallel state (TP=1, PP=1) for one module."""
    shim.init_gloo(0, 1, shim.free_port())
    try:
        yield
    finally:
        shim.shutdown_gloo()


@pytest.fixture(scope="session")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every case of ``_ranks.CASES``: per-rank results of one spawned run for the session."""
    return run_spawned(CASES, WORLD_SIZE, tmp_path_factory.mktemp("ranks"))
