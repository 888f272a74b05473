"""The engine conformance kit, run on every engine asyncsync ships, and on broken ones.

TensorEngine and HFEngine run every check in-process (the fast path); one TensorEngine
Ray actor, shared by the class, runs them through real actor calls (``ray.cancel``, an
async actor's concurrency). The guide's DictEngine runs the kit in the guide itself
(tests/test_docs.py executes it). Broken engines must fail with the promise named.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from _actors import TINY_LLAMA

from asyncsync import Bucket, Stamp
from asyncsync.buckets import tensor_digest
from asyncsync.delta import check_header
from asyncsync.engines import HFEngine, TensorEngine, check_fits, copy_into, copy_named
from asyncsync.testing.conformance import (
    PROMISES,
    EngineConformance,
    Kit,
    PromiseBroken,
    check_engine,
    run_check,
    spec_of,
    weights_for,
)

pytestmark = pytest.mark.timeout(240)
pytest_plugins = ["pytester"]

SPEC = {
    "embed.weight": ((64, 16), torch.float32),
    "norm.weight": ((16,), torch.bfloat16),
    "head.weight": ((64, 16), torch.float32),
    "step.count": ((2,), torch.int64),
}


def tensor_engine() -> TensorEngine:
    return TensorEngine(weights_for(SPEC, -1))


class TestTensorEngine(EngineConformance):
    @pytest.fixture
    def engine(self) -> TensorEngine:
        return tensor_engine()

    def weight_spec(self) -> Any:
        return SPEC


HF_SPEC = spec_of(HFEngine("llama", TINY_LLAMA, seed=0, num_threads=1).model.state_dict())


class TestHFEngine(EngineConformance):
    @pytest.fixture
    def engine(self) -> HFEngine:
        return HFEngine("llama", TINY_LLAMA, seed=0, num_threads=1)

    def weight_spec(self) -> Any:
        return HF_SPEC


class FaultyTensorEngine(TensorEngine):
    """A TensorEngine whose next apply can be made to fail partway (from outside the actor)."""

    def __init__(self) -> None:
        super().__init__(weights_for(SPEC, -1))
        self.fail_next = False

    async def fail_next_apply(self) -> None:
        self.fail_next = True

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        if self.fail_next:
            self.fail_next = False
            await super().apply(list(buckets)[:1], version)
            raise RuntimeError("injected: apply failed partway")
        await super().apply(buckets, version)


class TestTensorEngineActor(EngineConformance):
    """One actor for the whole class: the kit never assumes a fresh engine."""

    @pytest.fixture(scope="class")
    @classmethod
    def engine(cls, ray_local: Any) -> Iterator[Any]:
        actor_class = ray.remote(FaultyTensorEngine).options(num_cpus=0, max_concurrency=16)
        handle = actor_class.remote()
        yield handle
        ray.kill(handle, no_restart=True)

    def weight_spec(self) -> Any:
        return SPEC

    async def inject_apply_failure(self, kit: Kit) -> bool:
        await kit.call("fail_next_apply")
        return True


# --------------------------------------------------------------------- broken engines


class AppliesAtReceive(TensorEngine):
    """Broken: copies each bucket into its weights as it arrives, before any commit."""

    async def receive(self, session_id: str, index: int, payload: Any) -> int:
        size = await super().receive(session_id, index, payload)
        await asyncio.to_thread(copy_into, self.params, [payload])
        return size


class StampsBeforeApply(TensorEngine):
    """Broken: its apply only keeps the new weights, copied in at the next begin, so a
    commit switches the stamp to the new version over the old weights."""

    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        super().__init__(params)
        self.pending: list[tuple[str, torch.Tensor]] = []

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        self.pending = [(n, t.clone()) for b in buckets for n, t in b.named_tensors()]

    async def begin(self, *args: Any, **kwargs: Any) -> Any:
        copy_named(self.params, self.pending)
        return await super().begin(*args, **kwargs)


class KeepsStampAfterFailure(TensorEngine):
    """Broken: when its apply fails partway it goes on stamping the version it had."""

    async def commit(self, session_id: str) -> int:
        before = (self.version, self.identity)
        try:
            return await super().commit(session_id)
        except Exception:
            (self.version, self.identity), self.intact = before, True
            raise


class TakesPartialUpdates(TensorEngine):
    """Broken: accepts an update that leaves weights unwritten (no completeness check)."""

    def check_manifest(self, manifest: Any) -> None:
        check_fits(self.params, manifest)


class StampOutsideTheLease(TensorEngine):
    """Broken: takes its answer's stamp before it holds the lease, so a commit can slip in
    between the stamp and the weights the answer reads."""

    async def served_digests(self) -> tuple[Stamp, dict[str, int]]:
        stamp = self.stamp()
        async with self.serving():
            digests = await asyncio.to_thread(
                lambda: {name: tensor_digest(t) for name, t in self.params.items()}
            )
        return stamp, digests


class IgnoresTheDeltaBase(TensorEngine):
    """Broken: takes a delta without checking that it serves the delta's base."""

    def _check_base(self, session_id: str, step: int, manifest: Any, header: Any) -> None:
        check_header(header, manifest)


BROKEN = [
    (AppliesAtReceive, "staging-invisible", "with buckets 0..0 of step 1 received"),
    (StampsBeforeApply, "commit-serves-update", "stamp as expected, 4 of 4 weights differ"),
    (KeepsStampAfterFailure, "failed-apply-not-intact", "an answer is stamped Stamp(version=0,"),
    (TakesPartialUpdates, "partial-refused", "begin('conformance-partial-"),
    (StampOutsideTheLease, "commit-atomic", "while step 1 committed over 0: answers are stamped"),
    (IgnoresTheDeltaBase, "delta-base", "a delta on another version: begin_delta('conformance-"),
]


@pytest.mark.parametrize(("broken", "promise_id", "detail"), BROKEN)
async def test_a_broken_engine_fails_naming_the_promise(
    broken: type[TensorEngine], promise_id: str, detail: str
) -> None:
    kit = Kit(broken(weights_for(SPEC, -1)), lambda step: weights_for(SPEC, step))
    with pytest.raises(PromiseBroken) as info:
        await run_check(promise_id, kit)
    message = str(info.value)
    promise = PROMISES[promise_id]
    assert info.value.promise is promise
    assert message.startswith(f"PROMISE {promise_id}: {promise.says}\n  broken: ")
    assert detail in message
    assert message.endswith(f"documented: docs/guides/receiver.md#{promise.section}")
    # Every other engine of this kind keeps the promise: the check itself is sound.
    await run_check(promise_id, Kit(tensor_engine(), kit.make_weights))


async def test_check_engine_stops_at_the_first_broken_promise() -> None:
    def weights(step: int) -> dict[str, torch.Tensor]:
        return weights_for(SPEC, step)

    checked = await check_engine(tensor_engine, weights, promises=["commit-serves-update"])
    assert checked == ["commit-serves-update"]
    with pytest.raises(PromiseBroken, match=r"^PROMISE staging-invisible"):
        await check_engine(lambda: AppliesAtReceive(weights_for(SPEC, -1)), weights)


def test_every_promise_names_a_section_of_the_guide() -> None:
    guide = (Path(__file__).parents[1] / "docs" / "guides" / "receiver.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in guide.splitlines()
        if line.startswith("#")
    }
    missing = {p.id: p.section for p in PROMISES.values() if p.section not in headings}
    assert not missing, f"promises documented under no heading of the guide: {missing}"
    rows = [f"| `{p.id}` | {p.says} | [" for p in PROMISES.values()]
    stale = [row for row in rows if row not in guide]
    assert not stale, f"rows the guide's table of promises lacks (or words otherwise): {stale}"


USER_SUITE = """
import pytest
import torch

from asyncsync.engines import TensorEngine
from asyncsync.testing.conformance import EngineConformance, weights_for
from test_conformance import AppliesAtReceive

SPEC = {"a": ((8,), torch.float32), "b": ((4, 4), torch.float32)}


class TestGood(EngineConformance):
    @pytest.fixture
    def engine(self):
        return TensorEngine(weights_for(SPEC, -1))

    def weight_spec(self):
        return SPEC


class TestBroken(TestGood):
    @pytest.fixture
    def engine(self):
        return AppliesAtReceive(weights_for(SPEC, -1))
"""


def test_a_user_suite_subclassing_the_kit(pytester: pytest.Pytester) -> None:
    """What a user writes: the good engine passes, the broken one fails naming the promise."""
    pytester.makeini("[pytest]\ntimeout = 120\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_user_engine=USER_SUITE)
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "-k", "staging_invisible or commit_serves_update"
    )
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ TestBroken.test_staging_invisible _*",
            "PROMISE staging-invisible: nothing received is served before commit",
            "  broken: with buckets 0..0 of step 1 received and not committed: *",
            "  documented: docs/guides/receiver.md#the-protocol-step-by-step",
            "FAILED test_user_engine.py::TestBroken::test_staging_invisible - *",
        ]
    )


class VersionsOnly(TensorEngine):
    """Takes updates without any tensor (it documents so), and full ones as usual."""

    accepts_empty_updates = True

    def check_manifest(self, manifest: Any) -> None:
        if any(b.index for b in manifest):
            super().check_manifest(manifest)


async def test_an_engine_that_opts_into_empty_updates() -> None:
    def weights(step: int) -> dict[str, torch.Tensor]:
        return weights_for(SPEC, step)

    # Declared: the kit expects the empty update to commit and be reported.
    kit = Kit(VersionsOnly(weights(-1)), weights, accepts_empty_updates=True)
    await run_check("empty-refused", kit)
    # Not declared: taking one breaks the promise.
    with pytest.raises(PromiseBroken, match=r"^PROMISE empty-refused:.*\n  broken: begin\("):
        await run_check("empty-refused", Kit(VersionsOnly(weights(-1)), weights))
    # The pytest class reads the engine's own attribute.
    assert EngineConformance().conformance_kit(VersionsOnly(weights(-1))).accepts_empty_updates
    assert not EngineConformance().conformance_kit(tensor_engine()).accepts_empty_updates


async def test_a_broken_actor_fails_naming_the_promise(actor_factory: Any) -> None:
    """Through Ray: the engine's refusals arrive as RayTaskErrors, its answers by value."""
    broken = ray.remote(AppliesAtReceive).options(num_cpus=0, max_concurrency=16)
    kit = Kit(actor_factory(broken, weights_for(SPEC, -1)), lambda s: weights_for(SPEC, s))
    await run_check("unknown-session", kit)  # it keeps the promises it does not break
    with pytest.raises(PromiseBroken, match=r"^PROMISE staging-invisible: .*\n  broken: with"):
        await run_check("staging-invisible", kit)


async def test_tied_weights_are_sent_once() -> None:
    """A model with tied embeddings: the spec names the shared tensor once, and the kit's
    updates then read back as sent (a name per tie would overwrite the other)."""
    tied = {**TINY_LLAMA, "tie_word_embeddings": True}
    model = HFEngine("llama", tied, seed=0, num_threads=1).model.state_dict()
    spec = spec_of(model)
    assert "model.embed_tokens.weight" in spec and "lm_head.weight" not in spec
    assert len(spec) == len(model) - 1

    def weights(step: int) -> dict[str, torch.Tensor]:
        return weights_for(spec, step)

    for promise_id in ("commit-serves-update", "failed-apply-not-intact"):
        await run_check(promise_id, Kit(HFEngine("llama", tied, seed=0, num_threads=1), weights))
