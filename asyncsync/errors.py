"""One hierarchy of typed errors for everything asyncsync raises on purpose.

Every error names the offending item (tensor name, step, session id, engine) in
its message. Errors raised for bad input leave all state as it was: the next
valid call succeeds.

```
AsyncSyncError
├── ConfigError (ValueError)             an option out of range (cache, plan, fleet, transport)
├── BucketError (ValueError)             bad tensors or names given to a bucket / build
├── ClosedError                          the cache, the train actor or the coordinator was closed
├── CacheError
│   ├── InvalidStepError (ValueError)    a step that is not an int >= -1
│   ├── StaleStepError (ValueError)      step not newer than the ready or in-flight step
│   ├── BuildInProgressError             a second build while one is in flight
│   ├── ReadTimeoutError (TimeoutError)  no ready step >= min_step within the timeout
│   ├── ResidentLimitError               max_resident_bytes cannot be honoured
│   ├── NothingBuiltError (LookupError)  the newest snapshot asked for before anything was built
│   ├── TornSnapshotError                weights changed while a build copied them; not published
│   └── WrongLoopError (RuntimeError)    called from another event loop or thread
├── SharedMemoryError                    a shared snapshot buffer cannot be created or mapped
├── SessionError                         a sync session failed; engines not committed were aborted
│   ├── SessionTimeoutError (TimeoutError)
│   ├── AdmissionError                   more sessions than the train actor admits at once
│   ├── TopologyError                    a same-node-only transport asked for an engine elsewhere
│   └── QuorumError                      fewer engines than min_engines could commit
├── FleetError (LookupError)             fleet call outside a session: unknown or unreachable engine
├── RoutingError                         no engine eligible for a routed call, or none answered
├── ProtocolError                        an engine refused a call of the protocol
│   ├── ChecksumMismatchError (ValueError)  a bucket's bytes do not hash to its checksum
│   ├── DeltaBaseError                   a delta refused: the engine does not serve its base
│   └── TransportError                   a transport's engine side could not set up or deliver
├── ActorDefinitionError (TypeError)     a train-actor class that would break the one-loop contract
├── ConversionError (LookupError)        a Megatron parameter or state dict that cannot be converted
│   └── CoverageError                    the parameters do not cover the model or stage exactly
└── TrainGroupError (RuntimeError)       a rank failed its setup or build, or ranks disagree
    └── TrainGroupTimeoutError (TimeoutError)
```

Classes are grouped by what a caller does about them: one :class:`ClosedError`
for everything closed, one :class:`ProtocolError` for every call an engine
refused (the message says which rule it broke), a class of its own only where a
caller reacts differently (a checksum mismatch is corruption; a timeout may be
retried).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActorDefinitionError",
    "AdmissionError",
    "AsyncSyncError",
    "BucketError",
    "BuildInProgressError",
    "CacheError",
    "ChecksumMismatchError",
    "ClosedError",
    "ConfigError",
    "ConversionError",
    "CoverageError",
    "DeltaBaseError",
    "FleetError",
    "InvalidStepError",
    "NothingBuiltError",
    "ProtocolError",
    "QuorumError",
    "ReadTimeoutError",
    "ResidentLimitError",
    "RoutingError",
    "SessionError",
    "SessionTimeoutError",
    "SharedMemoryError",
    "StaleStepError",
    "TopologyError",
    "TornSnapshotError",
    "TrainGroupError",
    "TrainGroupTimeoutError",
    "TransportError",
    "WrongLoopError",
]
"""Every error class: the one list of their names (the package re-exports it)."""


class AsyncSyncError(Exception):
    """Base class of every error asyncsync raises on purpose."""


class ConfigError(AsyncSyncError, ValueError):
    """An option given to a constructor or a plan is out of range or unknown.

    Raised at construction, before any state exists, so there is nothing to undo.
    """


class BucketError(AsyncSyncError, ValueError):
    """A value given to a bucket or a build is not a packable tensor, or its name is bad."""


class ClosedError(AsyncSyncError):
    """What was called was closed: a cache, a train actor's weight sync, or a coordinator.

    Nothing new starts on it; waiters wake with this error. The message names what
    was closed.
    """


class CacheError(AsyncSyncError):
    """Base class of errors raised by :class:`asyncsync.BucketCache`."""


class InvalidStepError(CacheError, ValueError):
    """A step that is not an ``int`` >= -1 (``-1`` is the base weights)."""


class StaleStepError(CacheError, ValueError):
    """``build(step)`` with a step that is not newer than the ready or in-flight step."""


class BuildInProgressError(CacheError):
    """``build()`` while another build holds the single build slot."""


class ReadTimeoutError(CacheError, TimeoutError):
    """``read(min_step, timeout)`` found no ready step >= ``min_step`` in time."""


class ResidentLimitError(CacheError):
    """A build cannot fit under ``max_resident_bytes`` (now, or after pins drained)."""


class NothingBuiltError(CacheError, LookupError):
    """``read()`` of the newest snapshot when none was ever published and no build will publish one.

    Raised at once when no build is in flight, or when the first build in flight is
    discarded and no other started. Build (and publish) a snapshot first, or ask
    for ``read(min_step=...)``, which waits for that step.
    """


class TornSnapshotError(CacheError):
    """A build saw the weights change while it copied them, so it published nothing.

    Raised when leaving the ``build()`` block if a copied tensor's version counter
    moved (an in-place write, such as an optimizer step, ran during the build) or
    the build's ``guard`` value changed. The ready step is unchanged; build again
    once the weights are quiet.
    """


class WrongLoopError(CacheError, RuntimeError):
    """A cache method was called from an event loop or thread other than its own.

    Ray runs each concurrency group on its own loop and thread; a cache touched from
    two groups would be guarded by a lock that cannot see both sides.
    """


class SharedMemoryError(AsyncSyncError):
    """A shared-memory snapshot buffer cannot be created, page-locked or mapped.

    The message names the buffer or region (``/memfd:asyncsync-<token>``, owner pid
    and fd) and why: out of memory, the owner released the buffer or exited, or the
    region lies on another node.
    """


class SessionError(AsyncSyncError):
    """A sync session failed; every engine that had not committed was aborted.

    Engines that committed before the failure (``per_engine``, or the commit phase
    of ``fleet``) keep the new step; each keeps the version it reports. The pin is
    released once no commit still reads the snapshot. ``session_id`` and ``step``
    identify the session; ``engine`` names the engine that failed first,
    ``transport`` and ``bucket`` the transport step that failed (each ``None`` when
    the failure was not specific to one).
    """

    def __init__(
        self,
        message: str,
        *,
        session_id: str | None = None,
        step: int | None = None,
        engine: str | None = None,
        transport: str | None = None,
        bucket: int | None = None,
    ) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.step = step
        self.engine = engine
        self.transport = transport
        self.bucket = bucket

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields must survive pickling across Ray processes.
        return (
            _rebuild_session_error,
            (
                type(self),
                str(self),
                {
                    "session_id": self.session_id,
                    "step": self.step,
                    "engine": self.engine,
                    "transport": self.transport,
                    "bucket": self.bucket,
                },
            ),
        )


def _rebuild_session_error(
    cls: type[SessionError], message: str, fields: dict[str, Any]
) -> SessionError:
    return cls(message, **fields)


class SessionTimeoutError(SessionError, TimeoutError):
    """A sync session ran past its timeout and was aborted everywhere."""


class AdmissionError(SessionError):
    """The train actor already runs as many sessions as it admits; this one never started.

    Every session (waiting for its step or streaming) holds one of the actor's
    ``max_concurrency`` slots; the actor admits at most ``max_concurrency`` minus
    the slots reserved for builds and control calls, so those always run. Nothing
    was pinned or sent; retry later or raise ``max_concurrency``.
    """


class TopologyError(SessionError):
    """A transport that only works on one node was asked for an engine on another node.

    Raised before anything moves; names the engine, the transport and both nodes.
    """


class QuorumError(SessionError):
    """Under the ``per_engine`` policy, fewer than ``min_engines`` engines could commit.

    Engines that did commit serve the new step (the message names them); the others
    keep their version and are quarantined.
    """


class FleetError(AsyncSyncError, LookupError):
    """A fleet operation outside a session failed, naming the engine.

    A name that is not a member, a name added twice (with another handle), or an
    engine that cannot be reached or is not an engine (``fleet_add``, a probe).
    """


class RoutingError(AsyncSyncError):
    """A :class:`~asyncsync.FleetRouter` call found no eligible engine within its wait,
    or every engine it tried failed to answer (or answered below its rule).

    The message names the rule, the engines tried and why each was left.
    """


class ProtocolError(AsyncSyncError):
    """An engine refused a call of the protocol; nothing was staged or applied by it.

    For example a manifest it cannot take (a malformed index, a name twice, a
    tensor its model does not have, an empty update it did not opt in to), a bucket
    that does not match the manifest announced at ``begin``, a session id it has
    already seen, a call for a session it has not begun (or already ended), or a
    ``commit`` before every bucket arrived. The message names the session and the
    rule broken.
    """


class ChecksumMismatchError(ProtocolError, ValueError):
    """A received bucket's payload does not hash to its manifest checksum (corruption)."""


class DeltaBaseError(ProtocolError):
    """An engine refused a delta: it does not serve the delta's base.

    The delta names its base (step, weights identity, every bucket's checksum); the
    engine serves another version, is not intact, or keeps no copy of its buckets.
    Nothing was opened; the session sends that engine the full snapshot instead.
    """


class TransportError(ProtocolError):
    """The engine side of a transport could not set up or deliver a bucket.

    For example: a set-up message the transport does not know, a process group the
    engine is not in (it was restarted, or the group was replaced), or nothing
    arrived within the transport's timeout. The engine keeps the version it had.
    ``transport`` names the transport; ``session_id`` and ``index`` the session and
    bucket when the failure concerns one (``None`` otherwise). The message also
    names the transport's own item (the collective transport's group id), or a
    payload that no transport produces.
    """

    def __init__(
        self,
        message: str,
        *,
        transport: str | None = None,
        session_id: str | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.transport = transport
        self.session_id = session_id
        self.index = index


class ActorDefinitionError(AsyncSyncError, TypeError):
    """A train-actor class whose cache methods would not share one event loop."""


class ConversionError(AsyncSyncError, LookupError):
    """A Megatron parameter that cannot be converted to Hugging Face.

    A parameter name that the assumed model family's conversion table does not
    know (or that two of its rules match), or a parameter's value or
    tensor-parallel shards that do not fit its layout or the model's sizes (a fused
    q/k/v shard whose row count does not match the attention heads, shards of
    unequal shapes, a value that is not a tensor). :class:`CoverageError` says
    which names are missing or extra.
    """


class CoverageError(ConversionError):
    """The parameters given do not cover the model (or the pipeline stage) exactly.

    ``missing`` holds the Hugging Face names that no given parameter produces (a
    missing layer, a missing ``lm_head.weight`` of an untied model, ...);
    ``extra`` the given Megatron names that must not be there (a layer beyond the
    model or stage, a second parameter for the same weight, an
    ``output_layer.weight`` the tie rules out, ...). Nothing was converted.
    """

    def __init__(
        self, message: str, *, missing: tuple[str, ...] = (), extra: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.extra = extra

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields must survive pickling across Ray processes.
        return (_rebuild_coverage_error, (type(self), str(self), self.missing, self.extra))


def _rebuild_coverage_error(
    cls: type[CoverageError], message: str, missing: tuple[str, ...], extra: tuple[str, ...]
) -> CoverageError:
    return cls(message, missing=missing, extra=extra)


class TrainGroupError(AsyncSyncError, RuntimeError):
    """A rank of a :class:`~asyncsync.train_group.TrainGroup` is used out of order or failed.

    For example a rank set up twice, or asked for weights before its setup; a group
    in which not exactly one rank owns the cache; ranks that published different steps.
    """


class TrainGroupTimeoutError(TrainGroupError, TimeoutError):
    """A collective call of a train group (setup, build, teardown) ran past its timeout.

    The message names the ranks that had not answered.
    """


def first_session_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to raise for a failed task group: its first SessionError, else its first leaf."""
    leaves: list[BaseException] = []

    def walk(err: BaseException) -> None:
        if isinstance(err, BaseExceptionGroup):
            for sub in err.exceptions:
                walk(sub)
        else:
            leaves.append(err)

    walk(group)
    return next((e for e in leaves if isinstance(e, SessionError)), leaves[0])


def last_line(exc: BaseException, limit: int = 300) -> str:
    """The last line of ``str(exc)`` (a remote traceback ends with the error), truncated."""
    lines = str(exc).strip().splitlines()
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[:limit] + "..."
