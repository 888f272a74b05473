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

import ray
import torch

from asyncsync.engines import engine_actor
from asyncsync.session import SyncPlan
from asyncsync.testing.megatron_shim import VOCAB_SIZE, build_tiny_gpt, hf_config_kwargs
from asyncsync.train_group import MegatronTrainRank, TrainGroup

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

        report = await group.owner.run_sync_session.remote(SyncPlan(targets={"e0": engine}))
        assert report.step == 0
        assert await engine.served_version.remote() == 0
        served = await engine.logits.remote(toks.tolist())
        diff = float((served - reference[..., :VOCAB_SIZE]).abs().max())
        print(
            f"{family} tp2 via Ray actors + sync session into HFEngine: max |logit diff| = {diff:.3g}"
        )
        assert diff < TOLERANCE
    finally:
        ray.kill(engine, no_restart=True)
        await group.shutdown()
