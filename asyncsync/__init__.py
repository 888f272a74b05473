"""asyncsync: asyncio-native Ray actors that move weights from training to rollout engines."""

from __future__ import annotations

from .actor import WeightSyncActor, cache_method, train_actor
from .buckets import Bucket, BucketManifest, TensorMeta, pack
from .cache import BucketCache, BuildHandle, CacheStats, Snapshot
from .coordinator import SyncCoordinator
from .errors import (
    ActorDefinitionError,
    AsyncSyncError,
    BucketError,
    BuildInProgressError,
    CacheClosedError,
    CacheError,
    ChecksumMismatchError,
    ConfigError,
    ConversionError,
    IncompleteSessionError,
    InvalidStepError,
    ManifestMismatchError,
    ReadTimeoutError,
    ReceiverError,
    ResidentLimitError,
    SessionError,
    SessionIdReusedError,
    SessionTimeoutError,
    StaleStepError,
    TransportError,
    UnknownSessionError,
    WrongLoopError,
)
from .receiver import ReceiverStats, StagingReceiver
from .session import SyncPlan, SyncReport, TargetReport

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
    # sessions: one all-or-nothing transfer, driven from any asyncio program
    "SyncCoordinator",
    "SyncPlan",
    "SyncReport",
    "TargetReport",
    # engine side: the receiver protocol
    "ReceiverStats",
    "StagingReceiver",
    # errors: one hierarchy
    "ActorDefinitionError",
    "AsyncSyncError",
    "BucketError",
    "BuildInProgressError",
    "CacheClosedError",
    "CacheError",
    "ChecksumMismatchError",
    "ConfigError",
    "ConversionError",
    "IncompleteSessionError",
    "InvalidStepError",
    "ManifestMismatchError",
    "ReadTimeoutError",
    "ReceiverError",
    "ResidentLimitError",
    "SessionError",
    "SessionIdReusedError",
    "SessionTimeoutError",
    "StaleStepError",
    "TransportError",
    "UnknownSessionError",
    "WrongLoopError",
]
