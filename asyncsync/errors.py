"""One hierarchy of typed errors for everything asyncsync raises on purpose.

Every error names the offending item (tensor name, step, session id, target) in
its message. Errors raised for bad input leave all state as it was: the next
valid call succeeds.

```
AsyncSyncError
├── ConfigError (ValueError)             an option out of range (cache, plan, coordinator, transport)
├── BucketError (ValueError)             bad tensors or names given to a bucket / build
├── CacheError
│   ├── InvalidStepError (ValueError)    a step that is not an int >= -1
│   ├── StaleStepError (ValueError)      step not newer than the ready or in-flight step
│   ├── BuildInProgressError             a second build while one is in flight
│   ├── ReadTimeoutError (TimeoutError)  no ready step >= min_step within the timeout
│   ├── ResidentLimitError               max_resident_bytes cannot be honoured
│   ├── CacheClosedError                 the cache was closed
│   ├── NothingBuiltError (LookupError)  read() of the newest snapshot before anything was built
│   ├── TornSnapshotError                weights changed while a build copied them; not published
│   └── WrongLoopError (RuntimeError)    called from another event loop or thread
├── SharedMemoryError                    a shared snapshot buffer cannot be created or mapped
├── SessionError                         a sync session failed and was aborted everywhere
│   └── SessionTimeoutError (TimeoutError)
├── ReceiverError                        engine-side protocol violations
│   ├── ManifestMismatchError (ValueError)
│   ├── ChecksumMismatchError (ValueError)
│   ├── UnknownSessionError (KeyError)
│   ├── IncompleteSessionError
│   └── SessionIdReusedError (ValueError)
├── ActorDefinitionError (TypeError)     a train-actor class that would break the one-loop contract
└── ConversionError (KeyError)           a parameter name no conversion table knows
```
"""

from __future__ import annotations

__all__ = [
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
    "NothingBuiltError",
    "ReadTimeoutError",
    "ReceiverError",
    "ResidentLimitError",
    "SessionError",
    "SessionIdReusedError",
    "SessionTimeoutError",
    "SharedMemoryError",
    "StaleStepError",
    "TornSnapshotError",
    "UnknownSessionError",
    "WrongLoopError",
]


class AsyncSyncError(Exception):
    """Base class of every error asyncsync raises on purpose."""


class ConfigError(AsyncSyncError, ValueError):
    """An option given to a constructor or a plan is out of range or unknown.

    Raised at construction, before any state exists, so there is nothing to undo.
    """


class BucketError(AsyncSyncError, ValueError):
    """A value given to a bucket or a build is not a packable tensor, or its name is bad."""


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


class CacheClosedError(CacheError):
    """The cache was closed; no new builds or reads are accepted."""


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
    """A sync session failed; it was aborted on every target and its pin released.

    ``session_id`` and ``step`` identify the session; ``target`` names the target that
    failed first (``None`` when the failure was not target-specific).
    """

    def __init__(
        self,
        message: str,
        *,
        session_id: str | None = None,
        step: int | None = None,
        target: str | None = None,
    ) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.step = step
        self.target = target

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields must survive pickling across Ray processes.
        return (
            _rebuild_session_error,
            (type(self), str(self), self.session_id, self.step, self.target),
        )


def _rebuild_session_error(
    cls: type[SessionError],
    message: str,
    session_id: str | None,
    step: int | None,
    target: str | None,
) -> SessionError:
    return cls(message, session_id=session_id, step=step, target=target)


class SessionTimeoutError(SessionError, TimeoutError):
    """A sync session ran past its timeout and was aborted everywhere."""


class ReceiverError(AsyncSyncError):
    """Base class of engine-side protocol errors."""


class ManifestMismatchError(ReceiverError, ValueError):
    """A received bucket does not match the manifest announced at ``begin``."""


class ChecksumMismatchError(ReceiverError, ValueError):
    """A received bucket's payload does not hash to its manifest checksum."""


class UnknownSessionError(ReceiverError, KeyError):
    """A call names a session the receiver has not begun (or already ended)."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class IncompleteSessionError(ReceiverError):
    """``commit`` before every bucket of the manifest was received."""


class SessionIdReusedError(ReceiverError, ValueError):
    """``begin`` with a session id the receiver has already seen."""


class ActorDefinitionError(AsyncSyncError, TypeError):
    """A train-actor class whose cache methods would not share one event loop."""


class ConversionError(AsyncSyncError, KeyError):
    """A parameter name that the assumed model family's conversion table does not know."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


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
