"""Two Ray train actors host one TP=2 megatron-core job; the owner syncs into a real HF engine.

Everything is real: two Ray actors each build their half of a ``GPTModel`` over
gloo, both publish step 0 concurrently (a collective build), exactly one owns the
cache, and a real sync session streams the owner's snapshot into an
``HFEngine`` actor (a transformers Qwen3 built from config). The engine's logits
must match the Megatron model's.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
import ray
import torch

from asyncsync.engines import engine_actor
from asyncsync.errors import ConversionError, TrainGroupTimeoutError
from asyncsync.plan import SyncPlan
from asyncsync.testing.megatron_shim import VOCAB_SIZE, build_tiny_gpt, hf_config_kwargs
from asyncsync.train_group import MegatronTrainRank, TrainGroup, _on_every_rank

from ._hf import TOLERANCE
from ._ranks import tokens


class LogitsRank(MegatronTrainRank):
    """A train rank that can also run its model forward (test-only: uses the CPU shim)."""

    async def megatron_logits(self, toks: torch.Tensor) -> torch.Tensor:
        # Collective at TP=2: call it on every rank at once.
        return await asyncio.to_thread(self._logits, toks)

    def _logits(self, toks: torch.Tensor) -> torch.Tensor:
        from asyncsync.testing.megatron_shim import megatron_logits

        return megatron_logits(self.model, toks)


async def test_tp2_train_actors_publish_and_the_owner_syncs_an_hf_engine(ray_local: Any) -> None:
    # Qwen3 (q/k norms, head_dim != hidden / heads) with tied embeddings: the
    # engine's lm_head is its embedding, which the snapshot fills.
    family, tied = "qwen3", True
    group = await TrainGroup.start(
        2,
        family=family,
        vocab_size=VOCAB_SIZE,
        build_model=functools.partial(build_tiny_gpt, family, tied=tied),
        actor_class=LogitsRank,
        actor_kwargs={"bucket_bytes": 16 << 10},
        num_cpus=0,
    )
    engine = engine_actor(num_cpus=0).remote(
        family, hf_config_kwargs(family, tied=tied), num_threads=1
    )
    try:
        assert group.owner_rank == 0
        assert await asyncio.gather(*(a.cache_owner.remote() for a in group.actors)) == [
            True,
            False,
        ]
        toks = tokens()
        reference = (await asyncio.gather(*(a.megatron_logits.remote(toks) for a in group.actors)))[
            0
        ]

        assert await group.build(0) == 0

        # Every rank published step 0; only the owner's snapshot holds tensors.
        assert [await a.cache_ready_step.remote() for a in group.actors] == [0, 0]
        (owner_step, owner_digests), (other_step, other_digests) = await asyncio.gather(
            *(a.ready_snapshot_digests.remote() for a in group.actors)
        )
        assert (owner_step, other_step, other_digests) == (0, 0, {})
        assert "model.layers.1.self_attn.q_norm.weight" in owner_digests
        assert ("lm_head.weight" in owner_digests) is not tied

        report = await group.owner.run_sync_session.remote(SyncPlan(engines={"e0": engine}))
        assert report.step == 0
        assert await engine.served_version.remote() == 0
        served = await engine.logits.remote(toks.tolist())
        diff = float((served - reference[..., :VOCAB_SIZE]).abs().max())
        print(
            f"{family} tp2 via Ray actors + sync session into HFEngine: "
            f"max |logit diff| = {diff:.3g}"
        )
        assert diff < TOLERANCE
    finally:
        ray.kill(engine, no_restart=True)
        await group.shutdown()


async def test_ranks_that_do_not_answer_in_time_are_named() -> None:
    never = asyncio.Event()
    with pytest.raises(
        TrainGroupTimeoutError, match=r"build of step 3: ranks \[1, 2\] of 3 did not finish"
    ):
        await _on_every_rank(
            "build of step 3", [asyncio.sleep(0, 3), never.wait(), never.wait()], 0.05
        )


async def test_a_failing_rank_is_named_without_waiting_for_the_blocked_others() -> None:
    async def fail() -> None:
        raise ConversionError("parameter 'x' is not known")

    # The other rank would block forever in a collective: no timeout given, and
    # the failure must still come back at once.
    async with asyncio.timeout(10):
        with pytest.raises(ConversionError, match="'x'") as info:
            await _on_every_rank("setup", [asyncio.Event().wait(), fail()], None)
    assert info.value.__notes__ == ["raised by rank 1 during setup"]
    assert await _on_every_rank("teardown", [asyncio.sleep(0, "a"), asyncio.sleep(0, "b")], 1) == [
        "a",
        "b",
    ]
