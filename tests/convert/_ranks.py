"""Multi-rank cases: real GPTModels over real gloo in separate processes.

Each rank builds its part of the model, computes the Megatron logits, and runs a
real :class:`~asyncsync.BucketCache` build from a :class:`MegatronWeightSource`
(iterated in the cache's worker thread, as in production). It also saves its
own ``GPTModel.state_dict()`` as Megatron gives it (stage-local layer names) with
its stage and ranks, for the state-dict conversions. Results are written with
``torch.save`` for the test process, which owns the transformers side.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["CASES", "WORLD_SIZE", "Case", "run_spawned"]

TOKENS_SEED = 1234
_PRELOAD = [
    "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs",
    "asyncsync.cache",
    "asyncsync.convert",
    "asyncsync.testing.megatron_shim",
]


@dataclass(frozen=True)
class Case:
    family: str
    tp: int = 1
    pp: int = 1
    tied: bool = False

    @property
    def id(self) -> str:
        return f"{self.family}-tp{self.tp}-pp{self.pp}-{'tied' if self.tied else 'untied'}"


WORLD_SIZE = 4
CASES = [
    *(Case(f, tp=2) for f in ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")),
    Case("llama", tp=2, tied=True),
    *(Case(f, pp=2) for f in ("llama", "qwen2", "qwen3", "qwen3_moe")),
    Case("qwen3", pp=2, tied=True),
    Case("qwen3", tp=2, pp=2),
    Case("qwen3_moe", tp=2, pp=2),
    Case("llama", tp=2, pp=2, tied=True),
]
"""Every case runs in one four-rank gloo world: TP=2 and PP=2 each with two
data-parallel replicas, and TP=2 x PP=2."""


def tokens() -> torch.Tensor:
    from asyncsync.testing.megatron_shim import VOCAB_SIZE

    return torch.randint(
        0, VOCAB_SIZE, (2, 12), generator=torch.Generator().manual_seed(TOKENS_SEED)
    )


async def build_through_cache(source: Any) -> tuple[int, dict[str, torch.Tensor]]:
    """Publish step 0 from ``source`` into a real cache; return its step and tensors (copied)."""
    from asyncsync.cache import BucketCache

    # Small buckets, so the owner's weights span several of them.
    cache = BucketCache(bucket_bytes=16 << 10)
    async with cache.build(0) as build:
        await build.add(source)
    async with cache.read() as snapshot:
        return snapshot.step, {name: t.clone() for name, t in snapshot.named_tensors()}


def _rank_main(rank: int, world_size: int, port: int, cases: list[Case], out: str) -> None:
    import warnings

    # Megatron and torch emit deprecation chatter on import; it is not under test here.
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state as ps

    from asyncsync.convert import MegatronWeightSource, Stage
    from asyncsync.testing import megatron_shim as shim

    torch.set_num_threads(1)
    try:
        for case in cases:
            shim.init_gloo(rank, world_size, port, tp=case.tp, pp=case.pp)
            model = shim.build_tiny_gpt(case.family, tied=case.tied)
            toks = tokens()
            logits = (
                shim.megatron_logits(model, toks)
                if case.pp == 1
                else shim.pipeline_logits([model], toks)
            )
            source = MegatronWeightSource(model, case.family, vocab_size=shim.VOCAB_SIZE)
            step, weights = asyncio.run(build_through_cache(source))
            torch.save(
                {
                    "owner": source.is_cache_owner(),
                    "step": step,
                    "weights": weights,
                    "logits": logits,
                    "tokens": toks,
                    # Plain values only: the test process loads with weights_only=True.
                    "state": {k: v.clone() for k, v in model.state_dict().items() if v is not None},
                    "extra_state_keys": [k for k, v in model.state_dict().items() if v is None],
                    "stage": dataclasses.astuple(Stage.of_megatron(model)),
                    "dims": dataclasses.asdict(source.dims),
                    "tp_rank": ps.get_tensor_model_parallel_rank(),
                    "pp_rank": ps.get_pipeline_model_parallel_rank(),
                    "dp_rank": ps.get_data_parallel_rank(with_context_parallel=True),
                },
                Path(out) / f"{case.id}.rank{rank}.pt",
            )
            ps.destroy_model_parallel()
    finally:
        shim.shutdown_gloo()


def run_spawned(cases: list[Case], world_size: int, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Run ``cases`` on ``world_size`` spawned gloo ranks; return each case's per-rank results."""
    from asyncsync.testing.megatron_shim import free_port

    # A fork server that has imported megatron-core once (about 8 s) forks every
    # rank, here and in later calls, instead of each rank importing it again.
    # It is a fresh single-threaded interpreter, so forking it is safe. Python
    # 3.11's fork server ignores sys.path, so only installed modules are preloaded.
    mp.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    mp.start_processes(
        _rank_main,
        args=(world_size, free_port(), cases, str(out)),
        nprocs=world_size,
        join=True,
        start_method="forkserver",
    )
    return {
        case.id: [
            torch.load(out / f"{case.id}.rank{r}.pt", weights_only=True) for r in range(world_size)
        ]
        for case in cases
    }
