"""asyncsync: asyncio-native Ray actors that move weights from training to rollout engines."""

from __future__ import annotations

from .actor import WeightSyncActor, cache_method, train_actor
from .buckets import Bucket, BucketManifest, TensorMeta, pack
from .cache import BucketCache, BuildHandle, CacheStats, Snapshot
from .coordinator import SyncCoordinator
from .errors import (
    ActorDefinitionError,
    AdmissionError,
    AsyncSyncError,
    BucketError,
    BuildInProgressError,
    CacheClosedError,
    CacheError,
    ChecksumMismatchError,
    ConfigError,
    ConversionError,
    CoordinatorClosedError,
    CoverageError,
    FleetError,
    IncompleteSessionError,
    InvalidStepError,
    ManifestMismatchError,
    PayloadError,
    QuorumError,
    ReadTimeoutError,
    ReceiverError,
    ResidentLimitError,
    SessionError,
    SessionIdReusedError,
    SessionTimeoutError,
    ShardError,
    StaleStepError,
    TopologyError,
    TrainGroupError,
    TrainGroupTimeoutError,
    TransportError,
    UnknownSessionError,
    WrongLoopError,
)
from .fleet import EngineFleet, EngineState, FleetView, Health
from .receiver import EngineInfo, ReceiverStats, StagingReceiver
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
    # sessions: one transfer committed by a policy, driven from any asyncio program
    "SyncCoordinator",
    "SyncPlan",
    "SyncReport",
    "TargetReport",
    # fleet: the engines, their health and versions, every call to them
    "EngineFleet",
    "EngineState",
    "FleetView",
    "Health",
    # engine side: the receiver protocol
    "EngineInfo",
    "ReceiverStats",
    "StagingReceiver",
    # errors: one hierarchy
    "ActorDefinitionError",
    "AdmissionError",
    "AsyncSyncError",
    "BucketError",
    "BuildInProgressError",
    "CacheClosedError",
    "CacheError",
    "ChecksumMismatchError",
    "ConfigError",
    "ConversionError",
    "CoordinatorClosedError",
    "FleetError",
    "CoverageError",
    "IncompleteSessionError",
    "InvalidStepError",
    "ManifestMismatchError",
    "PayloadError",
    "QuorumError",
    "ReadTimeoutError",
    "ReceiverError",
    "ResidentLimitError",
    "SessionError",
    "SessionIdReusedError",
    "SessionTimeoutError",
    "ShardError",
    "StaleStepError",
    "TopologyError",
    "TrainGroupError",
    "TrainGroupTimeoutError",
    "TransportError",
    "UnknownSessionError",
    "WrongLoopError",
]
