"""The engine conformance kit: proves an engine keeps the receiver protocol's promises.

Any engine (built on :class:`~asyncsync.StagingReceiver` or not, an in-process
object or a Ray actor handle) is driven through ``begin``/``receive``/``commit``/
``abort``/``engine_info`` exactly as a sync session drives it, with bucket payloads
as the object-store transport delivers them (:class:`~asyncsync.Bucket`), and what it
serves is read back after every step. A broken promise fails with its id, what the
engine did, and where the behaviour is documented::

    PROMISE staging-invisible: nothing received is served before commit
      broken: ...
      documented: docs/guides/receiver.md#the-protocol-step-by-step

**Under pytest** subclass :class:`EngineConformance` in a test file (a class named
``Test...``) and give it an ``engine`` fixture and the weights' spec::

    from asyncsync.testing.conformance import EngineConformance

    class TestMyEngine(EngineConformance):
        @pytest.fixture
        def engine(self):
            return MyEngine()                     # or a Ray actor handle

        def weight_spec(self):
            return {"embed.weight": ((100, 16), torch.float32), ...}

then ``pytest tests/test_my_engine_conformance.py``: one test per promise.

**Without pytest's collection** (a script, a doc example) :func:`check_engine` runs
the same checks; :func:`run_check` runs one on a :class:`Kit` and raises
:class:`PromiseBroken`.

What the kit needs from an engine, besides the protocol: a way to read what it
serves, ``served_digests() -> (Stamp, {name: tensor_digest})`` read under one
:meth:`~asyncsync.StagingReceiver.serving` lease (:class:`~asyncsync.engines.HFEngine`
and :class:`~asyncsync.engines.TensorEngine` have it; or override
:meth:`EngineConformance.read_served`), and the names, shapes and dtypes of its
weights (:meth:`EngineConformance.weight_spec`; :func:`spec_of` of a state dict), from
which it makes a distinct, valid update for every step (or override
:meth:`EngineConformance.make_weights`). The kit does not assume a fresh engine:
each check starts with a full session of its own, at a step above what the engine
serves, so an expensive engine may be shared (a class-scoped fixture).

Checks run each on an event loop of their own (no pytest-asyncio configuration
needed); every call is bounded by :attr:`Kit.call_timeout_s`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, TypeVar

import pytest
import torch
import xxhash

from ..buckets import Bucket, BucketManifest, aligned, pack, tensor_digest
from ..delta import PrivateBuffer, encode_bucket
from ..errors import ChecksumMismatchError, DeltaBaseError, ProtocolError, StaleStepError
from ..protocol import DeltaHeader, EngineInfo, Stamp, weights_identity

__all__ = [
    "PROMISES",
    "EngineConformance",
    "Kit",
    "Promise",
    "PromiseBroken",
    "check_engine",
    "promise",
    "run_check",
    "spec_of",
    "weights_for",
]

GUIDE = "docs/guides/receiver.md"

LONG_TTL_S = 300.0
"""Time to live of the kit's sessions that must not expire (only the expiry check's do)."""

T = TypeVar("T")

WeightSpec = Mapping[str, tuple[Sequence[int], torch.dtype]]
"""``{name: (shape, dtype)}`` of every weight an update writes."""


@dataclass(frozen=True)
class Promise:
    """One promise of the engine side: its id, what it says, where it is documented."""

    id: str
    says: str
    section: str

    @property
    def documented(self) -> str:
        return f"{GUIDE}#{self.section}"


_STEPS = "the-protocol-step-by-step"
_STAGED = "nothing-is-staged-forever"
_CANCEL = "commit-and-cancellation"
_STAMPS = "answers-and-their-stamps"

PROMISES: dict[str, Promise] = {
    p.id: p
    for p in [
        Promise(
            "report-matches-serving",
            "engine_info() reports the version, weights identity and intact flag its "
            "answers are stamped with, and no staging once no session is open",
            _STEPS,
        ),
        Promise(
            "commit-serves-update",
            "after commit returns step N the engine serves exactly the weights sent, "
            "stamped (N, weights_identity(manifest))",
            _STEPS,
        ),
        Promise("staging-invisible", "nothing received is served before commit", _STEPS),
        Promise(
            "receive-any-order",
            "buckets may arrive in any order; one received twice or outside the manifest "
            "is refused with ProtocolError and the staging stays usable",
            _STEPS,
        ),
        Promise(
            "commit-needs-every-bucket",
            "commit before every bucket arrived raises ProtocolError, applies nothing, and "
            "leaves the session open to finish",
            _STEPS,
        ),
        Promise(
            "unknown-session",
            "receive and commit of a session that is not open (never begun, or already "
            "committed) raise ProtocolError; abort ignores it",
            _STEPS,
        ),
        Promise(
            "session-id-once",
            "begin refuses a session id already used (open, committed or aborted) with "
            "ProtocolError",
            _STEPS,
        ),
        Promise(
            "stale-step-refused",
            "begin refuses a step older than the version served with StaleStepError",
            _STEPS,
        ),
        Promise(
            "checksum-refused",
            "a bucket failing its checksum raises ChecksumMismatchError and is not staged; "
            "the good bucket is accepted after it",
            _STEPS,
        ),
        Promise(
            "manifest-refused",
            "begin refuses a manifest the engine cannot take (an unknown name, a wrong "
            "shape or dtype) with ProtocolError; nothing is opened and the id stays unused",
            _STEPS,
        ),
        Promise(
            "partial-refused",
            "begin refuses a partial update (ProtocolError) unless the engine takes them",
            _STEPS,
        ),
        Promise(
            "empty-refused",
            "begin refuses an update without any tensor (ProtocolError) unless the engine "
            "sets accepts_empty_updates",
            _STEPS,
        ),
        Promise(
            "abort-drops",
            "abort drops the staging (a later receive or commit raises ProtocolError), is "
            "idempotent, and changes nothing served, also after a commit",
            _STEPS,
        ),
        Promise(
            "abort-during-receive",
            "an abort while a bucket is loading leaves nothing staged and nothing to commit",
            _STAGED,
        ),
        Promise(
            "ttl-expiry",
            "staging not committed within ttl_s of begin is dropped; its commit then "
            "raises ProtocolError",
            _STAGED,
        ),
        Promise(
            "superseded",
            "committing a newer version drops older staging; its commit then raises "
            "StaleStepError and the newer version stays served",
            _STAGED,
        ),
        Promise(
            "concurrent-sessions",
            "sessions may be open at once; commits apply in version order and never go "
            "back to an older version",
            _STEPS,
        ),
        Promise(
            "commit-atomic",
            "an answer racing a commit runs on the whole old or the whole new weights, "
            "and its stamp names the weights it ran on",
            _STAMPS,
        ),
        Promise(
            "failed-apply-not-intact",
            "after an apply failed partway the engine stamps Stamp(None, None, "
            "intact=False) and reports intact False until a full session commits",
            _STAMPS,
        ),
        Promise(
            "cancel-safe",
            "a cancelled begin, receive, commit or abort leaves the engine serving one "
            "whole version that it reports, and the next session commits",
            _CANCEL,
        ),
        Promise(
            "delta-base",
            "begin_delta refuses a delta on any base but the one served (another version, "
            "identity or bucket checksum) with DeltaBaseError, opening nothing; a delta on "
            "the served base commits exactly the target's weights",
            _STEPS,
        ),
    ]
}


class PromiseBroken(AssertionError):
    """An engine broke a promise of the protocol; the message names it and its documentation."""

    def __init__(self, promise: Promise, detail: str) -> None:
        self.promise = promise
        self.detail = detail
        super().__init__(
            f"PROMISE {promise.id}: {promise.says}\n  broken: {detail}\n"
            f"  documented: {promise.documented}"
        )


def promise(promise_id: str, kept: bool, detail: str) -> None:
    """Raise :class:`PromiseBroken` for ``promise_id`` with ``detail`` unless ``kept``."""
    if not kept:
        raise PromiseBroken(PROMISES[promise_id], detail)


def spec_of(named: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The weight spec (``{name: (shape, dtype)}``) of a state dict.

    Tied weights (names that share one tensor, such as tied input and output
    embeddings) keep their first name only: an update that wrote every name with
    values of its own would leave the tensor holding the last, and the others
    would read as not written. Engines take one name of each tied group.
    """
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    for name, t in named.items():
        where = (
            t.untyped_storage().data_ptr(),
            int(t.storage_offset()),
            tuple(t.shape),
            t.stride(),
        )
        if t.numel() and where in seen:
            continue
        seen.add(where)
        spec[name] = (tuple(t.shape), t.dtype)
    return spec


def weights_for(spec: WeightSpec, step: int) -> dict[str, torch.Tensor]:
    """Deterministic weights of ``spec`` for ``step``: every step and name its own values."""
    out: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in spec.items():
        gen = torch.Generator().manual_seed(
            xxhash.xxh3_64_intdigest(f"{step}\0{name}".encode()) >> 1
        )
        if dtype.is_floating_point or dtype.is_complex:
            out[name] = torch.randn(tuple(shape), generator=gen).to(dtype)
        elif dtype == torch.bool:
            out[name] = torch.randint(0, 2, tuple(shape), generator=gen).bool()
        else:
            out[name] = torch.randint(0, 100, tuple(shape), generator=gen).to(dtype)
    return out


@dataclass(frozen=True)
class Served:
    """What the kit expects an engine to serve: a stamp and each weight's digest."""

    stamp: Stamp
    digests: Mapping[str, int]


@dataclass
class Update:
    """One step's weights, packed: what a session sends."""

    step: int
    buckets: list[Bucket]
    digests: dict[str, int]

    @property
    def manifest(self) -> list[BucketManifest]:
        return [b.manifest for b in self.buckets]

    @property
    def served(self) -> Served:
        return Served(Stamp(self.step, weights_identity(self.manifest)), self.digests)


def _is_actor(engine: Any) -> bool:
    # A Ray actor handle's methods are ActorMethods, called with .remote(...).
    return hasattr(getattr(engine, "begin", None), "remote")


@dataclass
class Kit:
    """An engine under test and what the checks need to drive it.

    ``engine``: the engine (an in-process object with the protocol's ``async``
    methods, or a Ray actor handle). ``make_weights(step)``: a full, valid update
    for ``step`` (distinct per step). ``read_served(kit)``: the engine's ``(Stamp,
    {name: tensor_digest})`` read under one lease (default: its
    ``served_digests()``). ``inject_apply_failure(kit)``: makes the engine's next
    ``apply`` fail partway, ``False`` if it cannot (default: patches an in-process
    :class:`~asyncsync.StagingReceiver`). ``accepts_partial_updates`` and
    ``accepts_empty_updates``: what the engine documents it takes.
    """

    engine: Any
    make_weights: Callable[[int], Mapping[str, torch.Tensor]]
    read_served: Callable[[Kit], Awaitable[tuple[Stamp, Mapping[str, int]]]] | None = None
    inject_apply_failure: Callable[[Kit], Awaitable[bool]] | None = None
    accepts_partial_updates: bool = False
    accepts_empty_updates: bool = False
    call_timeout_s: float = 60.0
    ttl_s: float = 0.3
    _step: int | None = field(default=None, init=False)
    _ids: int = field(default=0, init=False)
    # Ids unique across kits: an engine shared by several checks remembers every id.
    _run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12], init=False)

    # ------------------------------------------------------------- calls

    def start(self, method: str, *args: Any) -> Awaitable[Any]:
        """Start ``engine.method(*args)``: an asyncio task, or a Ray object ref."""
        if _is_actor(self.engine):
            ref: Awaitable[Any] = getattr(self.engine, method).remote(*args)
            return ref
        task: asyncio.Future[Any] = asyncio.ensure_future(getattr(self.engine, method)(*args))
        return task

    async def call(self, method: str, *args: Any) -> Any:
        """``engine.method(*args)``, bounded by :attr:`call_timeout_s`."""
        async with asyncio.timeout(self.call_timeout_s):
            return await self.start(method, *args)

    async def cancel(self, call: Awaitable[Any]) -> None:
        """Cancel a started call and wait until it has ended (however it ended)."""
        if isinstance(call, asyncio.Future):
            call.cancel()
        else:
            import ray

            ray.cancel(call)
        async with asyncio.timeout(self.call_timeout_s):
            await asyncio.gather(call, return_exceptions=True)

    async def info(self) -> EngineInfo:
        info = await self.call("engine_info")
        if not isinstance(info, EngineInfo):
            raise TypeError(f"engine_info() returned a {type(info).__name__}, not an EngineInfo")
        return info

    async def served(self) -> Served:
        async with asyncio.timeout(self.call_timeout_s):
            if self.read_served is not None:
                stamp, digests = await self.read_served(self)
            else:
                stamp, digests = await self.call("served_digests")
        return Served(stamp, dict(digests))

    # ------------------------------------------------------------- updates

    def sid(self, what: str) -> str:
        """A session id never used by this kit before."""
        self._ids += 1
        return f"conformance-{what}-{self._ids}-{self._run_id}"

    async def next_step(self) -> int:
        """A step above every step this kit used and the engine serves."""
        if self._step is None:
            version = (await self.info()).version
            self._step = -1 if version is None else version
        self._step += 1
        return self._step

    def update(self, step: int, weights: Mapping[str, torch.Tensor] | None = None) -> Update:
        """``step``'s weights packed into several buckets (at least two where it can)."""
        named = dict(self.make_weights(step) if weights is None else weights)
        total = sum(aligned(t.numel() * t.element_size()) for t in named.values())
        buckets = pack(list(named.items()), bucket_bytes=max(aligned(1), total // 3))
        return Update(step, buckets, {name: tensor_digest(t) for name, t in named.items()})

    async def send(self, update: Update, session: str, order: Iterable[int] | None = None) -> None:
        """``receive`` every bucket of ``update`` (in ``order``, default 0..n-1)."""
        indices = range(len(update.buckets)) if order is None else order
        for i in indices:
            await self.call("receive", session, i, update.buckets[i])

    async def session(self, update: Update, what: str = "full") -> None:
        """A whole session delivering ``update``; commit must return its step."""
        session = self.sid(what)
        await self.call("begin", session, update.step, update.manifest, LONG_TTL_S)
        await self.send(update, session)
        committed = await self.call("commit", session)
        promise(
            "commit-serves-update",
            committed == update.step,
            f"commit of step {update.step} returned {committed!r}",
        )

    async def baseline(self) -> Update:
        """Commit a fresh step, check it serves, and return it: a known starting point."""
        update = self.update(await self.next_step())
        await self.session(update, "baseline")
        await self.expect(update.served, "after a full session")
        return update

    # ------------------------------------------------------------- expectations

    async def expect(
        self, want: Served | Sequence[Served], where: str, promise_id: str = "commit-serves-update"
    ) -> Served:
        """The engine serves (one of) ``want``, reports it, and holds no staging."""
        wants = [want] if isinstance(want, Served) else list(want)
        got = await self.served()
        match = [w for w in wants if _matches(w, got)]
        if not match:
            promise(promise_id, False, f"{where}: {_describe(got, wants)}")
        await self.expect_report(match[0].stamp, where, clean=promise_id)
        return match[0]

    async def expect_report(self, stamp: Stamp, where: str, *, clean: str | None) -> None:
        """``engine_info()`` reports ``stamp``'s version, weights and intact flag, and,
        unless ``clean`` is ``None``, no open session or staged byte (a leftover is
        reported as a break of the promise ``clean`` names)."""
        info = await self.info()
        reported = Stamp(info.version, info.weights, info.intact)
        promise(
            "report-matches-serving",
            reported == stamp,
            f"{where}: engine_info() reports {reported}, its answers are stamped {stamp}",
        )
        if clean is not None:
            promise(
                clean,
                info.open_sessions == 0 and info.staged_bytes == 0,
                f"{where}: engine_info() reports {info.open_sessions} open sessions and "
                f"{info.staged_bytes} staged bytes, expected none",
            )

    async def refused(
        self,
        promise_id: str,
        errors: type[BaseException] | tuple[type[BaseException], ...],
        method: str,
        *args: Any,
        what: str = "",
    ) -> BaseException:
        """``engine.method(*args)`` must raise one of ``errors``; return what it raised.

        ``what`` describes the call in the message (e.g. which bad manifest it sent).
        """
        call = f"{what + ': ' if what else ''}{method}{_args(args)}"
        try:
            result = await self.call(method, *args)
        except errors as exc:
            return exc
        except Exception as exc:
            promise(
                promise_id,
                False,
                f"{call} raised {type(exc).__name__}: {_first(exc)}, expected {_names(errors)}",
            )
            raise  # unreachable: promise() raised
        promise(promise_id, False, f"{call} returned {result!r:.80}, expected {_names(errors)}")
        raise AssertionError("unreachable")


def _matches(want: Served, got: Served) -> bool:
    if got.stamp != want.stamp:
        return False
    return all(got.digests.get(name) == d for name, d in want.digests.items())


def _describe(got: Served, wants: Sequence[Served]) -> str:
    """How ``got`` differs from each of ``wants``, in stamp and in weights."""
    parts = []
    for want in wants:
        names = [n for n, d in want.digests.items() if got.digests.get(n) != d]
        stamp = "stamp as expected" if got.stamp == want.stamp else f"expected {want.stamp}"
        weights = (
            "weights as sent"
            if not names
            else f"{len(names)} of {len(want.digests)} weights differ, e.g. {names[:3]}"
        )
        parts.append(f"against version {want.stamp.version}: {stamp}, {weights}")
    return f"answers are stamped {got.stamp}; " + "; ".join(parts)


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _names(errors: type[BaseException] | tuple[type[BaseException], ...]) -> str:
    errors = errors if isinstance(errors, tuple) else (errors,)
    return " or ".join(e.__name__ for e in errors)


def _args(args: Sequence[Any]) -> str:
    shown = [repr(a) if isinstance(a, str | int) else type(a).__name__ for a in args]
    return "(" + ", ".join(shown) + ")"


def _corrupt(bucket: Bucket) -> Bucket:
    buffer = bucket.buffer.copy()
    buffer[-1] ^= 0x01  # one bit
    return Bucket(buffer, bucket.index, bucket.checksum)


# ----------------------------------------------------------------- the checks

Check = Callable[[Kit], Awaitable[None]]
CHECKS: dict[str, Check] = {}


def _check(promise_id: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        assert promise_id in PROMISES, promise_id
        CHECKS[promise_id] = fn
        return fn

    return register


@_check("report-matches-serving")
async def _report(kit: Kit) -> None:
    served = await kit.served()
    # Whatever it serves now (its initial weights on a fresh engine), the report agrees.
    await kit.expect_report(served.stamp, "before any session of the kit", clean=None)
    await kit.baseline()


@_check("commit-serves-update")
async def _commit_serves(kit: Kit) -> None:
    first = await kit.baseline()
    second = kit.update(await kit.next_step())
    await kit.session(second)
    await kit.expect(second.served, f"after committing step {second.step} over {first.step}")


@_check("staging-invisible")
async def _staging_invisible(kit: Kit) -> None:
    old = await kit.baseline()
    new = kit.update(await kit.next_step())
    session = kit.sid("staged")
    await kit.call("begin", session, new.step, new.manifest, LONG_TTL_S)
    for i, bucket in enumerate(new.buckets):
        await kit.call("receive", session, i, bucket)
        got = await kit.served()
        promise(
            "staging-invisible",
            _matches(old.served, got),
            f"with buckets 0..{i} of step {new.step} received and not committed: "
            f"{_describe(got, [old.served])}",
        )
    await kit.call("abort", session)
    await kit.expect(old.served, "after aborting a session that received everything")


@_check("receive-any-order")
async def _any_order(kit: Kit) -> None:
    await kit.baseline()
    new = kit.update(await kit.next_step())
    session = kit.sid("reversed")
    await kit.call("begin", session, new.step, new.manifest, LONG_TTL_S)
    last = len(new.buckets) - 1
    await kit.send(new, session, [last])
    await kit.refused(
        "receive-any-order", ProtocolError, "receive", session, last, new.buckets[last]
    )
    await kit.refused(
        "receive-any-order", ProtocolError, "receive", session, last + 1, new.buckets[0]
    )
    await kit.send(new, session, range(last - 1, -1, -1))
    await kit.call("commit", session)
    await kit.expect(new.served, "after receiving the buckets last to first", "receive-any-order")


@_check("commit-needs-every-bucket")
async def _needs_every_bucket(kit: Kit) -> None:
    old = await kit.baseline()
    new = kit.update(await kit.next_step())
    session = kit.sid("early")
    await kit.call("begin", session, new.step, new.manifest, LONG_TTL_S)
    await kit.send(new, session, range(len(new.buckets) - 1))
    await kit.refused("commit-needs-every-bucket", ProtocolError, "commit", session)
    got = await kit.served()
    promise(
        "commit-needs-every-bucket",
        _matches(old.served, got),
        f"after an early commit was refused: {_describe(got, [old.served])}",
    )
    await kit.send(new, session, [len(new.buckets) - 1])
    await kit.call("commit", session)
    await kit.expect(new.served, "after the last bucket and a second commit")


@_check("unknown-session")
async def _unknown(kit: Kit) -> None:
    old = await kit.baseline()
    unknown = kit.sid("never-begun")
    await kit.refused("unknown-session", ProtocolError, "receive", unknown, 0, old.buckets[0])
    await kit.refused("unknown-session", ProtocolError, "commit", unknown)
    try:
        await kit.call("abort", unknown)
    except Exception as exc:
        promise("unknown-session", False, f"abort of an unknown id raised {exc!r:.200}")
    await kit.expect(old.served, "after calls naming an unknown session", "unknown-session")
    new = kit.update(await kit.next_step())
    done = kit.sid("done")
    await kit.call("begin", done, new.step, new.manifest, LONG_TTL_S)
    await kit.send(new, done)
    await kit.call("commit", done)
    await kit.refused("unknown-session", ProtocolError, "receive", done, 0, new.buckets[0])
    await kit.refused("unknown-session", ProtocolError, "commit", done)
    await kit.expect(new.served, "after calls naming a committed session", "unknown-session")


@_check("session-id-once")
async def _id_once(kit: Kit) -> None:
    await kit.baseline()
    new = kit.update(await kit.next_step())
    session = kit.sid("twice")
    await kit.call("begin", session, new.step, new.manifest, LONG_TTL_S)
    await kit.refused(
        "session-id-once", ProtocolError, "begin", session, new.step, new.manifest, 60.0
    )
    await kit.send(new, session)
    await kit.call("commit", session)
    later = kit.update(await kit.next_step())
    await kit.refused(
        "session-id-once", ProtocolError, "begin", session, later.step, later.manifest, 60.0
    )
    aborted = kit.sid("aborted")
    await kit.call("begin", aborted, later.step, later.manifest, 60.0)
    await kit.call("abort", aborted)
    await kit.refused(
        "session-id-once", ProtocolError, "begin", aborted, later.step, later.manifest, 60.0
    )
    await kit.expect(new.served, "after reused ids were refused", "session-id-once")


@_check("stale-step-refused")
async def _stale(kit: Kit) -> None:
    old = await kit.baseline()
    older = kit.update(old.step - 1)
    await kit.refused(
        "stale-step-refused",
        StaleStepError,
        "begin",
        kit.sid("stale"),
        older.step,
        older.manifest,
        60.0,
    )
    await kit.expect(old.served, "after a stale begin was refused", "stale-step-refused")


@_check("checksum-refused")
async def _checksum(kit: Kit) -> None:
    old = await kit.baseline()
    new = kit.update(await kit.next_step())
    session = kit.sid("corrupt")
    await kit.call("begin", session, new.step, new.manifest, LONG_TTL_S)
    bad = len(new.buckets) - 1
    await kit.send(new, session, range(bad))
    corrupt = _corrupt(new.buckets[bad])
    await kit.refused("checksum-refused", ChecksumMismatchError, "receive", session, bad, corrupt)
    await kit.refused("checksum-refused", ProtocolError, "commit", session)
    got = await kit.served()
    promise(
        "checksum-refused",
        _matches(old.served, got),
        f"after a corrupt bucket was refused: {_describe(got, [old.served])}",
    )
    await kit.send(new, session, [bad])  # the good bytes: accepted now
    await kit.call("commit", session)
    await kit.expect(new.served, "after the good bucket replaced the corrupt one")


@_check("manifest-refused")
async def _manifest(kit: Kit) -> None:
    await kit.baseline()
    step = await kit.next_step()
    good = dict(kit.make_weights(step))
    name, tensor = next(iter(good.items()))
    wrong = {
        "an unknown name": {**good, "conformance.not_a_weight": torch.zeros(4)},
        "a wrong shape": {**good, name: torch.zeros(tensor.numel() + 1, dtype=tensor.dtype)},
        "a wrong dtype": {
            **good,
            name: tensor.to(torch.float64 if tensor.dtype != torch.float64 else torch.float32),
        },
    }
    session = kit.sid("refused")
    for what, weights in wrong.items():
        exc = await kit.refused(
            "manifest-refused",
            ProtocolError,
            "begin",
            session,
            step,
            kit.update(step, weights).manifest,
            60.0,
            what=f"a manifest with {what}",
        )
        info = await kit.info()
        promise(
            "manifest-refused",
            info.open_sessions == 0,
            f"{what} was refused ({_first(exc)}) but {info.open_sessions} session(s) are open",
        )
    update = kit.update(step)
    await kit.call("begin", session, step, update.manifest, 60.0)  # the id stayed unused
    await kit.send(update, session)
    await kit.call("commit", session)
    await kit.expect(update.served, f"after {len(wrong)} refused manifests then a good one")


@_check("partial-refused")
async def _partial(kit: Kit) -> None:
    old = await kit.baseline()
    step = await kit.next_step()
    weights = dict(kit.make_weights(step))
    if len(weights) < 2:
        pytest.skip("the engine has one weight: no update of it is partial")
    weights.popitem()
    partial = kit.update(step, weights)
    session = kit.sid("partial")
    if kit.accepts_partial_updates:
        await kit.call("begin", session, partial.step, partial.manifest, 60.0)
        await kit.call("abort", session)
    else:
        await kit.refused(
            "partial-refused",
            ProtocolError,
            "begin",
            session,
            partial.step,
            partial.manifest,
            60.0,
        )
    await kit.expect(old.served, "after a partial update", "partial-refused")


@_check("empty-refused")
async def _empty(kit: Kit) -> None:
    old = await kit.baseline()
    step = await kit.next_step()
    session = kit.sid("empty")
    if not kit.accepts_empty_updates:
        await kit.refused("empty-refused", ProtocolError, "begin", session, step, [], 60.0)
        await kit.expect(old.served, "after an empty update was refused", "empty-refused")
        return
    await kit.call("begin", session, step, [], 60.0)
    committed = await kit.call("commit", session)
    promise("empty-refused", committed == step, f"an empty update's commit returned {committed}")
    info = await kit.info()
    promise(
        "empty-refused",
        (info.version, info.weights) == (step, weights_identity([])),
        f"after an empty update of step {step} the engine reports version {info.version} "
        f"weights {info.weights}",
    )


@_check("abort-drops")
async def _abort(kit: Kit) -> None:
    old = await kit.baseline()
    new = kit.update(await kit.next_step())
    session = kit.sid("aborted")
    await kit.call("begin", session, new.step, new.manifest, LONG_TTL_S)
    await kit.send(new, session, range(len(new.buckets) - 1))
    await kit.call("abort", session)
    await kit.call("abort", session)  # idempotent
    await kit.expect(old.served, "after abort", "abort-drops")
    last = len(new.buckets) - 1
    await kit.refused("abort-drops", ProtocolError, "receive", session, last, new.buckets[last])
    await kit.refused("abort-drops", ProtocolError, "commit", session)
    committed = kit.update(await kit.next_step())
    done = kit.sid("committed")
    await kit.call("begin", done, committed.step, committed.manifest, 60.0)
    await kit.send(committed, done)
    await kit.call("commit", done)
    await kit.call("abort", done)  # after the commit: nothing changes
    await kit.expect(committed.served, "after an abort of a committed session", "abort-drops")


@_check("abort-during-receive")
async def _abort_receive(kit: Kit) -> None:
    old = await kit.baseline()
    new = kit.update(await kit.next_step())
    session = kit.sid("abort-receive")
    await kit.call("begin", session, new.step, new.manifest, LONG_TTL_S)
    await kit.send(new, session, range(len(new.buckets) - 1))
    last = len(new.buckets) - 1
    loading = kit.start("receive", session, last, new.buckets[last])
    await asyncio.sleep(0)  # let the receive start (in-process: it is loading in a thread)
    await kit.call("abort", session)
    async with asyncio.timeout(kit.call_timeout_s):
        await asyncio.gather(loading, return_exceptions=True)
    await kit.refused("abort-during-receive", ProtocolError, "commit", session)
    await kit.expect(
        old.served, "after an abort while a bucket was loading", "abort-during-receive"
    )


@_check("ttl-expiry")
async def _ttl(kit: Kit) -> None:
    old = await kit.baseline()
    new = kit.update(await kit.next_step())
    session = kit.sid("expiring")
    # Nothing is sent: a receive racing the expiry would fail for the wrong reason.
    await kit.call("begin", session, new.step, new.manifest, kit.ttl_s)
    # A bounded wait for the engine's reaper: the one wait the kit has on a clock.
    loop = asyncio.get_running_loop()
    began, patience = loop.time(), max(10.0, kit.ttl_s * 30)
    while (info := await kit.info()).open_sessions:
        waited = loop.time() - began
        promise(
            "ttl-expiry",
            waited < patience,
            f"{info.open_sessions} session(s) still open {waited:.1f} s after a begin with "
            f"ttl_s={kit.ttl_s}",
        )
        await asyncio.sleep(kit.ttl_s / 3)
    await kit.refused("ttl-expiry", ProtocolError, "commit", session)
    await kit.expect(old.served, "after the staging expired", "ttl-expiry")


@_check("superseded")
async def _superseded(kit: Kit) -> None:
    await kit.baseline()
    older = kit.update(await kit.next_step())
    newer = kit.update(await kit.next_step())
    a, b = kit.sid("older"), kit.sid("newer")
    await kit.call("begin", a, older.step, older.manifest, LONG_TTL_S)
    await kit.send(older, a)
    await kit.call("begin", b, newer.step, newer.manifest, LONG_TTL_S)
    await kit.send(newer, b)
    await kit.call("commit", b)
    await kit.refused("superseded", StaleStepError, "commit", a)
    await kit.expect(newer.served, "after the older staging's commit came late", "superseded")


@_check("concurrent-sessions")
async def _concurrent(kit: Kit) -> None:
    await kit.baseline()
    older = kit.update(await kit.next_step())
    newer = kit.update(await kit.next_step())
    a, b = kit.sid("a"), kit.sid("b")
    await kit.call("begin", a, older.step, older.manifest, LONG_TTL_S)
    await kit.call("begin", b, newer.step, newer.manifest, LONG_TTL_S)
    for i in range(max(len(older.buckets), len(newer.buckets))):  # interleaved
        if i < len(newer.buckets):
            await kit.call("receive", b, i, newer.buckets[i])
        if i < len(older.buckets):
            await kit.call("receive", a, i, older.buckets[i])
    # Both commits at once: the older applies first or is refused, never last.
    results = await asyncio.gather(
        kit.call("commit", a), kit.call("commit", b), return_exceptions=True
    )
    promise(
        "concurrent-sessions",
        results[1] == newer.step,
        f"the newer session's commit gave {results[1]!r:.200}, expected {newer.step}",
    )
    promise(
        "concurrent-sessions",
        results[0] == older.step or isinstance(results[0], StaleStepError),
        f"the older session's commit gave {results[0]!r:.200}, expected {older.step} "
        "or StaleStepError",
    )
    await kit.expect(newer.served, "after two commits at once", "concurrent-sessions")


@_check("commit-atomic")
async def _atomic(kit: Kit) -> None:
    old = await kit.baseline()
    new = kit.update(await kit.next_step())
    session = kit.sid("raced")
    await kit.call("begin", session, new.step, new.manifest, LONG_TTL_S)
    await kit.send(new, session)
    committing = asyncio.ensure_future(kit.call("commit", session))
    seen: list[Served] = []

    async def answers() -> None:
        while True:
            done = committing.done()
            got = await kit.served()
            seen.append(got)
            if not any(_matches(w, got) for w in (old.served, new.served)):
                promise(
                    "commit-atomic",
                    False,
                    f"answer {len(seen)} while step {new.step} committed over "
                    f"{old.step}: {_describe(got, [old.served, new.served])}",
                )
            if done:
                return

    await asyncio.gather(answers(), answers(), answers(), committing)
    await kit.expect(new.served, "after the raced commit")


@_check("failed-apply-not-intact")
async def _failed_apply(kit: Kit) -> None:
    await kit.baseline()
    inject = kit.inject_apply_failure or _inject_in_process
    if not await inject(kit):
        pytest.skip(
            "cannot make this engine's apply fail: give the kit an inject_apply_failure "
            "(EngineConformance.inject_apply_failure) that makes the next apply fail partway"
        )
    new = kit.update(await kit.next_step())
    session = kit.sid("failing")
    await kit.call("begin", session, new.step, new.manifest, LONG_TTL_S)
    await kit.send(new, session)
    try:
        result = await kit.call("commit", session)
    except Exception:
        pass
    else:
        raise AssertionError(
            f"the injected apply failure did not fail the commit (it returned {result!r}): "
            "check inject_apply_failure"
        )
    broken = Stamp(None, None, intact=False)
    got = await kit.served()
    promise(
        "failed-apply-not-intact",
        got.stamp == broken,
        f"after apply failed partway an answer is stamped {got.stamp}, expected {broken}",
    )
    await kit.expect_report(broken, "after apply failed partway", clean=None)
    repair = kit.update(await kit.next_step())
    await kit.session(repair, "repair")
    await kit.expect(repair.served, "after a full session repaired the failed apply")


async def _inject_in_process(kit: Kit) -> bool:
    """Make an in-process engine's next apply write its first bucket, then raise."""
    engine = kit.engine
    if _is_actor(engine) or not callable(getattr(engine, "apply", None)):
        return False
    original = engine.apply

    async def failing(buckets: Sequence[Bucket], version: int) -> None:
        del engine.apply  # one failure only: the class's apply again from now on
        await original(list(buckets)[:1], version)  # part of the new weights are in
        raise RuntimeError("conformance kit: apply failed partway (injected)")

    engine.apply = failing
    return True


@_check("cancel-safe")
async def _cancel(kit: Kit) -> None:
    current = await kit.baseline()
    for method in ("begin", "receive", "commit", "abort"):
        for yields in (0, 1, 2):
            new = kit.update(await kit.next_step())
            session = kit.sid(f"cancel-{method}")
            calls: dict[str, tuple[Any, ...]] = {
                "begin": (session, new.step, new.manifest, LONG_TTL_S),
                "receive": (session, len(new.buckets) - 1, new.buckets[-1]),
                "commit": (session,),
                "abort": (session,),
            }
            if method != "begin":
                await kit.call(*("begin", *calls["begin"]))
                if method in ("commit", "abort"):
                    await kit.send(new, session)
                elif len(new.buckets) > 1:
                    await kit.send(new, session, range(len(new.buckets) - 1))
            started = kit.start(method, *calls[method])
            for _ in range(yields):
                await asyncio.sleep(0)
            await kit.cancel(started)
            where = f"after cancelling {method} (after {yields} loop turns)"
            await kit.call("abort", session)
            now = await kit.expect([current.served, new.served], where, "cancel-safe")
            if now == new.served:
                current = new
            # The engine still takes a whole session.
            after = kit.update(await kit.next_step())
            await kit.session(after, f"after-cancel-{method}")
            await kit.expect(after.served, f"a full session {where}", "cancel-safe")
            current = after


def _delta(base: Update, target: Update) -> tuple[DeltaHeader, list[Bucket]]:
    """The delta of ``target`` on ``base`` (packed alike), as a session would send it."""
    kinds, payloads = [], []
    for old, new in zip(base.buckets, target.buckets, strict=True):
        kind, payload, _, _ = encode_bucket(old.buffer, new, PrivateBuffer)
        kinds.append(kind)
        payloads.append(payload)
    header = DeltaHeader(
        base.step,
        weights_identity(base.manifest),
        tuple(m.checksum for m in base.manifest),
        tuple(p.manifest for p in payloads),
        tuple(kinds),
    )
    return header, payloads


@_check("delta-base")
async def _delta_base(kit: Kit) -> None:
    first = await kit.baseline()
    offer = kit.update(await kit.next_step())
    # A first offer: refused (an engine keeps a copy of its buckets only once a
    # delta was offered to it); the next full commit is then kept as a base.
    await kit.refused(
        "delta-base",
        DeltaBaseError,
        "begin_delta",
        kit.sid("offer"),
        offer.step,
        offer.manifest,
        replace(_delta(first, offer)[0], base_step=first.step - 1),
        LONG_TTL_S,
        what="a delta on another version",
    )
    old = await kit.baseline()
    new = kit.update(await kit.next_step())
    good, payloads = _delta(old, new)
    session = kit.sid("delta")
    wrong = {
        "another version": replace(good, base_step=old.step - 1),
        "another identity": replace(good, base_weights="not-the-served-weights"),
        "another bucket checksum": replace(
            good, base_checksums=(good.base_checksums[0] ^ 1, *good.base_checksums[1:])
        ),
    }
    for what, header in wrong.items():
        await kit.refused(
            "delta-base",
            DeltaBaseError,
            "begin_delta",
            session,
            new.step,
            new.manifest,
            header,
            LONG_TTL_S,
            what=f"a delta on {what}",
        )
    await kit.expect(old.served, "after deltas on other bases were refused", "delta-base")
    try:
        await kit.call("begin_delta", session, new.step, new.manifest, good, LONG_TTL_S)
    except DeltaBaseError:
        return  # an engine may keep no base (keeps_delta_base = False): it refuses all
    for i, payload in enumerate(payloads):
        await kit.call("receive", session, i, payload)
    committed = await kit.call("commit", session)
    promise("delta-base", committed == new.step, f"a delta's commit returned {committed!r}")
    await kit.expect(new.served, "after a delta on the served base committed", "delta-base")


# ----------------------------------------------------------------- running checks


def _run(coro: Awaitable[T]) -> T:
    """Run ``coro`` on an event loop of its own (leaves any other loop alone)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


async def run_check(promise_id: str, kit: Kit) -> None:
    """Run the check of ``promise_id`` on ``kit``; raises :class:`PromiseBroken` if broken.

    Raises ``KeyError`` for an id not in :data:`PROMISES`, and ``pytest.skip``'s
    exception where the engine cannot be checked (see the check).
    """
    await CHECKS[promise_id](kit)


async def check_engine(
    make_engine: Callable[[], Any],
    make_weights: Callable[[int], Mapping[str, torch.Tensor]],
    *,
    promises: Iterable[str] | None = None,
    **options: Any,
) -> list[str]:
    """Run the checks of ``promises`` (default: all) each on a new ``make_engine()``.

    ``options`` are :class:`Kit`'s (``read_served``, ``accepts_empty_updates``, ...).
    Returns the ids checked; raises :class:`PromiseBroken` at the first broken one.
    Checks that cannot run on this engine are left out of the result.
    """
    checked = []
    for promise_id in PROMISES if promises is None else promises:
        kit = Kit(make_engine(), make_weights, **options)
        try:
            await run_check(promise_id, kit)
        except pytest.skip.Exception:
            continue
        checked.append(promise_id)
    return checked


class EngineConformance:
    """Subclass in a test file (as ``Test...``) to run one test per promise on an engine.

    Provide an ``engine`` fixture (the engine under test: an in-process object or a
    Ray actor handle; any scope, any fixtures it needs) and either
    :meth:`weight_spec` or :meth:`make_weights`. Override the rest where the engine
    differs from the defaults. Tests are synchronous: each check runs on an event
    loop of its own, so no pytest-asyncio setting matters.
    """

    accepts_partial_updates: ClassVar[bool] = False
    """Whether the engine takes updates that leave some weights unwritten."""
    accepts_empty_updates: ClassVar[bool | None] = None
    """Whether the engine takes updates without any tensor (``None``: read the
    engine's ``accepts_empty_updates`` attribute, ``False`` for an actor handle)."""
    skip_promises: ClassVar[Mapping[str, str]] = {}
    """Promise ids not to check on this engine, each with the reason (reported as skips)."""
    call_timeout_s: ClassVar[float] = 60.0
    """The longest any one call to the engine may take."""
    ttl_s: ClassVar[float] = 0.3
    """The staging time to live of the expiry check (seconds)."""

    @pytest.fixture
    def engine(self) -> Any:
        """The engine under test; override with a fixture of the same name."""
        raise NotImplementedError(
            f"{type(self).__name__}: define an `engine` fixture that returns the engine under "
            "test (an in-process object or a Ray actor handle)"
        )

    def weight_spec(self) -> WeightSpec:
        """``{name: (shape, dtype)}`` of every weight an update must write."""
        raise NotImplementedError(
            f"{type(self).__name__}: define weight_spec() (e.g. spec_of(model.state_dict())) "
            "or make_weights(step)"
        )

    def make_weights(self, step: int) -> Mapping[str, torch.Tensor]:
        """A full, valid update for ``step``, distinct for every step (default: from
        :meth:`weight_spec`, random values seeded by step and name)."""
        return weights_for(self.weight_spec(), step)

    async def read_served(self, kit: Kit) -> tuple[Stamp, Mapping[str, int]]:
        """``(stamp, {name: tensor_digest})`` of what the engine serves, under one lease
        (default: the engine's ``served_digests()``)."""
        result: tuple[Stamp, Mapping[str, int]] = await kit.call("served_digests")
        return result

    async def inject_apply_failure(self, kit: Kit) -> bool:
        """Make the engine's next ``apply`` fail partway; ``False`` if it cannot.

        The default patches an in-process engine's ``apply`` to write the first
        bucket, then raise; an actor needs a method of its own for it.
        """
        return await _inject_in_process(kit)

    def conformance_kit(self, engine: Any) -> Kit:
        """The :class:`Kit` the tests run on ``engine``."""
        empty = self.accepts_empty_updates
        if empty is None:
            empty = not _is_actor(engine) and bool(getattr(engine, "accepts_empty_updates", False))
        return Kit(
            engine,
            self.make_weights,
            read_served=self.read_served,
            inject_apply_failure=self.inject_apply_failure,
            accepts_partial_updates=self.accepts_partial_updates,
            accepts_empty_updates=empty,
            call_timeout_s=self.call_timeout_s,
            ttl_s=self.ttl_s,
        )


def _conformance_test(promise_id: str) -> Callable[[EngineConformance, Any], None]:
    def test(self: EngineConformance, engine: Any) -> None:
        reason = self.skip_promises.get(promise_id)
        if reason is not None:
            pytest.skip(reason)
        try:
            _run(run_check(promise_id, self.conformance_kit(engine)))
        except PromiseBroken as exc:
            # The promise and what broke it say it all: no traceback through the kit.
            pytest.fail(str(exc), pytrace=False)

    test.__name__ = f"test_{promise_id.replace('-', '_')}"
    test.__qualname__ = f"EngineConformance.{test.__name__}"
    test.__doc__ = PROMISES[promise_id].says
    return test


for _id in PROMISES:
    setattr(EngineConformance, f"test_{_id.replace('-', '_')}", _conformance_test(_id))

assert set(CHECKS) == set(PROMISES), set(PROMISES) ^ set(CHECKS)
