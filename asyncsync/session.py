"""One sync session: pin the newest ready snapshot, stream it, commit everywhere or abort.

Flow (all on the train actor's loop; every blocking step inside the transport runs
in a worker thread):

1. pin the newest ready snapshot with step >= ``plan.version`` (one atomic step);
2. ``begin`` on every target with the manifest (engines refuse what they cannot take);
3. put each bucket once through the transport and send it to every target, with at
   most ``plan.max_inflight_buckets`` unacknowledged buckets per target;
4. once every target acknowledged every bucket, ``commit`` on every target.

Any failure, the timeout, or cancellation (``ray.cancel``, a cancelled driver task)
aborts the session on every target (engines keep the version they had), finishes
the transport (temporary files removed), releases the pin, and raises a
:class:`~asyncsync.SessionError` naming the target that failed first. The report
carries the step that was actually sent, which may be newer than the one asked for.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from .cache import BucketCache, Snapshot
from .errors import (
    ConfigError,
    SessionError,
    SessionTimeoutError,
    first_session_error,
    last_line,
)
from .spans import SpanLog
from .transport import SessionContext, Transport

__all__ = ["SyncPlan", "SyncReport", "TargetReport", "run_session"]

T = TypeVar("T")


@dataclass(frozen=True)
class SyncPlan:
    """What a sync session should do.

    Args:
        targets: engine name -> Ray actor handle implementing the receiver protocol
            (``begin``/``receive``/``commit``/``abort``, see :mod:`asyncsync.receiver`).
        version: send the newest ready step >= this (``None``: the newest ready).
        transport: ``"object_store"`` (default), ``"shm"`` or ``"collective"``.
        timeout_s: bound on the whole session after the pin (then it is aborted and
            :class:`~asyncsync.SessionTimeoutError` raised).
        pin_timeout_s: bound on waiting for a ready step >= ``version``
            (:class:`~asyncsync.ReadTimeoutError`); ``None`` waits without bound.
        max_inflight_buckets: unacknowledged buckets per target (memory bound and
            pipelining depth).
        abort_timeout_s: bound on delivering ``abort`` to the targets after a failure.
    """

    targets: Mapping[str, Any]
    version: int | None = None
    transport: str = "object_store"
    timeout_s: float = 300.0
    pin_timeout_s: float | None = 60.0
    max_inflight_buckets: int = 2
    abort_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.targets, Mapping) or not self.targets:
            raise ConfigError("SyncPlan.targets must be a non-empty mapping of name -> handle")
        if self.max_inflight_buckets < 1:
            raise ConfigError(f"max_inflight_buckets must be >= 1, got {self.max_inflight_buckets}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class TargetReport:
    """Timings of one target, in seconds."""

    name: str
    begin_s: float
    transfer_s: float
    commit_s: float
    version: int


@dataclass(frozen=True)
class SyncReport:
    """What a session did. ``step`` is the step actually sent and committed."""

    session_id: str
    step: int
    requested_version: int | None
    transport: str
    nbytes: int
    num_buckets: int
    pin_wait_s: float
    seconds: float
    started_at: float
    targets: Mapping[str, TargetReport]

    @property
    def gbps(self) -> float:
        """Snapshot bytes delivered to every target per second of the session, in GB/s."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


async def run_session(
    cache: BucketCache,
    plan: SyncPlan,
    transport: Transport,
    *,
    spans: SpanLog | None = None,
) -> SyncReport:
    """Run one session as described in the module docstring; see :class:`SyncPlan`."""
    session_id = uuid.uuid4().hex
    started = time.time()
    async with cache.read(min_step=plan.version, timeout=plan.pin_timeout_s) as snap:
        pinned = time.time()
        ctx = SessionContext(session_id, snap.step, dict(plan.targets), snap.manifest)
        ok = False
        try:
            with spans.span("session", snap.step) if spans else nullcontext():
                try:
                    async with asyncio.timeout(plan.timeout_s) as deadline:
                        timings = await _stream(ctx, snap, plan, transport)
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    raise SessionTimeoutError(
                        f"session {session_id} (step {snap.step}) ran past {plan.timeout_s}s",
                        session_id=session_id,
                        step=snap.step,
                    ) from None
            ok = True
        except BaseException:
            await _abort_all(plan, session_id)
            raise
        finally:
            await _finish(transport, ctx, ok)
    finished = time.time()
    return SyncReport(
        session_id=session_id,
        step=snap.step,
        requested_version=plan.version,
        transport=plan.transport,
        nbytes=snap.nbytes,
        num_buckets=len(snap.buckets),
        pin_wait_s=pinned - started,
        seconds=finished - pinned,
        started_at=started,
        targets=timings,
    )


async def _stream(
    ctx: SessionContext, snap: Snapshot, plan: SyncPlan, transport: Transport
) -> dict[str, TargetReport]:
    targets = plan.targets
    begin = await _on_all(
        ctx, "begin", lambda name, h: h.begin.remote(ctx.session_id, ctx.step, ctx.manifest)
    )
    await transport.start(ctx)
    stream_start = time.monotonic()
    last_ack = dict.fromkeys(targets, stream_start)
    inflight = {name: asyncio.Semaphore(plan.max_inflight_buckets) for name in targets}
    remaining: dict[int, int] = {}

    async def send(name: str, handle: Any, index: int, payload: Any) -> None:
        try:
            await _as_target(
                ctx,
                name,
                f"receive of bucket {index}",
                handle.receive.remote(ctx.session_id, index, payload),
            )
            last_ack[name] = time.monotonic()
        finally:
            inflight[name].release()
        remaining[index] -= 1
        if remaining[index] == 0:
            await transport.release(ctx, index, payload)

    try:
        async with asyncio.TaskGroup() as group:
            for index, bucket in enumerate(snap.buckets):
                for name in targets:
                    await inflight[name].acquire()
                payload = await transport.put(ctx, index, bucket)
                remaining[index] = len(targets)
                for name, handle in targets.items():
                    group.create_task(send(name, handle, index, payload))
    except BaseExceptionGroup as group_error:
        raise first_session_error(group_error) from None

    # A commit that started is never cancelled: the engine finishes it (its copy into
    # the model cannot stop halfway), whatever happens to this session.
    commit = await _on_all(
        ctx, "commit", lambda name, h: h.commit.remote(ctx.session_id), cancel_remote=False
    )
    return {
        name: TargetReport(
            name=name,
            begin_s=begin[name][1],
            transfer_s=last_ack[name] - stream_start,
            commit_s=commit[name][1],
            version=int(commit[name][0]),
        )
        for name in targets
    }


async def _on_all(
    ctx: SessionContext,
    what: str,
    call: Callable[[str, Any], Awaitable[T]],
    *,
    cancel_remote: bool = True,
) -> dict[str, tuple[T, float]]:
    """Run ``call`` on every target concurrently; fail fast with the first target's error."""
    results: dict[str, tuple[T, float]] = {}

    async def one(name: str, handle: Any) -> None:
        start = time.monotonic()
        value = await _as_target(ctx, name, what, call(name, handle), cancel_remote=cancel_remote)
        results[name] = (value, time.monotonic() - start)

    try:
        async with asyncio.TaskGroup() as group:
            for name, handle in ctx.targets.items():
                group.create_task(one(name, handle))
    except BaseExceptionGroup as group_error:
        raise first_session_error(group_error) from None
    return results


async def _as_target(
    ctx: SessionContext,
    name: str,
    what: str,
    awaitable: Awaitable[T],
    *,
    cancel_remote: bool = True,
) -> T:
    """Await one call on target ``name``; its failure becomes a :class:`SessionError`.

    If this wait is cancelled (another target failed, the timeout, the session was
    cancelled) and ``cancel_remote`` is set, the engine-side call is cancelled too:
    a hung ``receive`` would otherwise run on, holding its payload and one of the
    engine's concurrency slots for good.
    """
    try:
        return await awaitable
    except asyncio.CancelledError:
        if cancel_remote:
            _cancel_remote(awaitable)
        raise
    except Exception as exc:
        raise SessionError(
            f"session {ctx.session_id} (step {ctx.step}): target {name!r} failed in {what}: "
            f"{type(exc).__name__}: {last_line(exc)}",
            session_id=ctx.session_id,
            step=ctx.step,
            target=name,
        ) from exc


def _cancel_remote(awaitable: object) -> None:
    import ray

    if isinstance(awaitable, ray.ObjectRef):
        try:
            ray.cancel(awaitable)
        except Exception:  # best effort: never replace the cancellation being handled
            pass


async def _abort_all(plan: SyncPlan, session_id: str) -> None:
    """Deliver ``abort`` to every target, bounded in time, even if we are being cancelled."""

    async def abort_one(handle: Any) -> None:
        try:
            await handle.abort.remote(session_id)
        except Exception:  # a dead engine has nothing to abort
            pass

    async def abort_every() -> None:
        try:
            async with asyncio.timeout(plan.abort_timeout_s):
                await asyncio.gather(*(abort_one(h) for h in plan.targets.values()))
        except TimeoutError:
            pass

    # Shielded: if we are cancelled again while aborting, the abort still completes
    # in the background.
    await asyncio.shield(asyncio.ensure_future(abort_every()))


async def _finish(transport: Transport, ctx: SessionContext, ok: bool) -> None:
    await asyncio.shield(asyncio.ensure_future(transport.finish(ctx, ok)))
