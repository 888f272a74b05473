"""asyncsync: asyncio-native Ray actors that move weights from training to rollout engines."""

from __future__ import annotations

from .buckets import Bucket, BucketManifest, TensorMeta, pack
from .cache import BucketCache, BuildHandle, CacheStats, Snapshot
from .errors import (
    ActorDefinitionError,
    AsyncSyncError,
    BucketError,
    BuildInProgressError,
    CacheClosedError,
    CacheError,
    ChecksumMismatchError,
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
    UnknownSessionError,
    WrongLoopError,
)

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
    # errors: one hierarchy
    "ActorDefinitionError",
    "AsyncSyncError",
    "BucketError",
    "BuildInProgressError",
    "CacheClosedError",
    "CacheError",
    "ChecksumMismatchError",
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
    "UnknownSessionError",
    "WrongLoopError",
]
