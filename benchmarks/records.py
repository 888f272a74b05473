"""Plain records the bench actors return to the driver (picklable, importable by workers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from asyncsync.spans import Span

from .probes import LagSummary, Usage

__all__ = ["BuildBreakdown", "EngineRecord", "EngineSession", "TrainerRecord"]


@dataclass(frozen=True)
class TrainerRecord:
    """What a train actor measured inside itself during one configuration.

    ``build_lag`` (wake-ups during measured builds) and ``other_lag`` (every
    other wake-up after the first measured build started) are ``None`` for a
    synchronous actor: it has no event loop. ``resident`` holds ``(wall time,
    cache bytes)`` samples.
    """

    spans: list[Span]
    rss_peak: int
    private_peak: int
    max_lock_hold_s: float
    resident: list[tuple[float, int]]
    digest: str
    usage: list[Usage] = field(default_factory=list)
    build_lag: LagSummary | None = None
    other_lag: LagSummary | None = None


@dataclass(frozen=True)
class EngineSession:
    """Where one engine's time went in one session it committed (seconds, bytes).

    ``load_s``: getting the buckets' bytes from their payloads (asyncsync: mapping
    the shared snapshot, reading the object store or the collective's buffers;
    baseline: writing the bytes to ``/dev/shm`` and ``torch.load``). ``verify_s``:
    checking them against the manifest, one checksum pass (baseline: none).
    ``apply_s``: copying them into the engine's weights. Sums over the buckets.
    """

    step: int
    received_bytes: int
    load_s: float
    verify_s: float
    applied_bytes: int
    apply_s: float


@dataclass(frozen=True)
class EngineRecord:
    """What an engine measured: its version, weights digest, memory, and its sessions."""

    version: int | None
    digest: str
    rss_peak: int
    private_peak: int
    sessions: list[EngineSession] = field(default_factory=list)


@dataclass(frozen=True)
class BuildBreakdown:
    """Where a build's time goes, measured on a quiet train actor with the library's functions.

    Every figure is seconds for the whole model, the best of ``reps`` repetitions
    (the least disturbed by other processes) unless noted, into the cache's kind
    of buffer (shared memory, pre-faulted as the cache's pool keeps it).
    ``group_s``: pulling tensors into bucket groups and computing the layout
    (``TensorStream`` + ``layout``). ``alloc_fault_s``: first touch of fresh
    buffers (page faults), measured once as a copy into never touched buffers
    minus a copy into touched ones. ``flat_copy_s``: the copy limit measured in the
    same process: ``copy_`` between two touched bucket-sized buffers, as many bytes
    as the model. ``copy_s``: :func:`~asyncsync.buckets.fill_buffer`, the copy of
    the model's tensors alone. ``checksum_s``: xxh3 of the payloads, a second pass.
    ``fused_s``: :func:`~asyncsync.buckets.fill_and_hash`, copy and checksum in one
    pass (what the cache's worker runs per bucket). ``hop_s``: one
    ``asyncio.to_thread`` round trip of a no-op, times the hops one build makes
    (``hops``). ``quiet_build_s``: a real ``build_cpu_bucket_cache`` with nothing
    else running on the actor, buffers from the pool. ``first_build_s``: the first
    build of the run (fresh buffers). ``quiet_lag``: the actor's loop lag during
    those quiet builds; ``idle_lag``: during an idle window just before them (the
    machine's scheduling noise).
    """

    nbytes: int
    buckets: int
    group_s: float
    alloc_fault_s: float
    flat_copy_s: float
    copy_s: float
    checksum_s: float
    fused_s: float
    hop_s: float
    hops: int
    quiet_build_s: float
    first_build_s: float
    reps: int
    quiet_lag: LagSummary
    idle_lag: LagSummary
