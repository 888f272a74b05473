"""asyncsync: asyncio-native Ray actors that move weights from training to rollout engines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from .errors import *  # noqa: F403  (the one list: errors.__all__)

if TYPE_CHECKING:
    from .actor import WeightSyncActor, cache_method, train_actor
    from .buckets import Bucket, BucketManifest, TensorMeta, pack
    from .cache import BucketCache, BuildHandle, CacheStats, Snapshot
    from .client import Deadlines
    from .coordinator import SyncCoordinator
    from .fleet import EngineFleet, EngineState, FleetView, Health
    from .plan import EngineReport, Outcome, SyncPlan, SyncReport
    from .protocol import EngineInfo, Receiver, ReceiverStats, Stamp
    from .receiver import StagingReceiver
    from .router import FleetRouter, Routed, Rule, StalenessFilter, staleness

# Everything but the errors is imported on first use: the buckets, the cache, shared
# memory and the errors work in a process without Ray, and `import asyncsync` (as the
# `asyncsync` command does before parsing its arguments) imports neither torch nor Ray.
_LAZY = {
    "Bucket": "buckets",
    "BucketManifest": "buckets",
    "TensorMeta": "buckets",
    "pack": "buckets",
    "BucketCache": "cache",
    "BuildHandle": "cache",
    "CacheStats": "cache",
    "Snapshot": "cache",
    "WeightSyncActor": "actor",
    "cache_method": "actor",
    "train_actor": "actor",
    "SyncCoordinator": "coordinator",
    "EngineFleet": "fleet",
    "EngineState": "fleet",
    "FleetView": "fleet",
    "Health": "fleet",
    "Deadlines": "client",
    "EngineInfo": "protocol",
    "Receiver": "protocol",
    "ReceiverStats": "protocol",
    "StagingReceiver": "receiver",
    "Stamp": "protocol",
    "FleetRouter": "router",
    "Routed": "router",
    "Rule": "router",
    "StalenessFilter": "router",
    "staleness": "router",
    "EngineReport": "plan",
    "Outcome": "plan",
    "SyncPlan": "plan",
    "SyncReport": "plan",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    # buckets: the unit of transfer
    "Bucket",
    "BucketManifest",
    "TensorMeta",
    "pack",
    # cache: versioned snapshots on one asyncio.Lock
    "BucketCache",
    "BuildHandle",
    "CacheStats",
    "Snapshot",
    # train actor: the async Ray actor side
    "WeightSyncActor",
    "cache_method",
    "train_actor",
    # sessions: one transfer committed by a policy, driven from any asyncio program
    "SyncCoordinator",
    "SyncPlan",
    "SyncReport",
    "EngineReport",
    "Outcome",
    "Deadlines",
    # fleet: the engines, their health and versions, every call to them
    "EngineFleet",
    "EngineState",
    "FleetView",
    "Health",
    # engine side: the protocol, and the base class that implements it
    "Receiver",
    "EngineInfo",
    "ReceiverStats",
    "StagingReceiver",
    "Stamp",
    # routing: rollouts by version, and their staleness at the trainer
    "FleetRouter",
    "Routed",
    "Rule",
    "StalenessFilter",
    "staleness",
]
__all__ += errors.__all__  # errors: one hierarchy, listed once
