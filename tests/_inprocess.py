"""An in-process engine behind the handle shape a session calls (no Ray)."""

from __future__ import annotations

import types
from typing import Any


class Handle:
    """An in-process engine behind the ``handle.method.remote(...)`` shape (no Ray)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.engine, name)
        return types.SimpleNamespace(remote=lambda *args: method(*args))
