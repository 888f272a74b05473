"""A light actor for the multi-node tests (importable by Ray workers as ``_probes``).

It imports only Ray and numpy, so a worker running it starts in about a second
and holds tens of MiB, where one importing torch holds ~280 MiB.
"""

from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=0)
class NodeProbe:
    """Says which node it runs on; reads objects from the object store and holds them."""

    def __init__(self) -> None:
        self.held: list[Any] = []

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def hold(self, box: list[Any]) -> int:
        """Read the object whose ref is ``box[0]`` and keep it mapped; returns its size.

        The ref comes inside a list so that Ray passes the ref itself and this
        method fetches it: the fetch is what is measured.
        """
        value = ray.get(box[0])
        self.held.append(value)
        return int(value.nbytes)

    def drop(self) -> None:
        self.held.clear()
