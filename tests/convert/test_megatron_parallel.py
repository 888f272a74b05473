"""Tensor- and pipeline-parallel GPTModels over real gloo, converted, checked against transformers.

All cases run in one four-rank gloo world of spawned processes (see ``_ranks.py``,
shared with ``test_pipeline_stages.py``): TP=2 and PP=2 each with two
data-parallel replicas, and TP=2 x PP=2. Each rank
builds its part of a real ``GPTModel``, computes Megatron's logits, and publishes
step 0 into a real ``BucketCache`` from a :class:`MegatronWeightSource`. Here, in
the test process, the single owner's snapshot is loaded into the transformers
model and the logits are compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ._hf import TOLERANCE, max_logit_diff
from ._ranks import CASES, Case


def _check(case: Case, ranks: list[dict[str, Any]], tmp_path: Path) -> None:
    owners = [r for r, result in enumerate(ranks) if result["owner"]]
    assert owners == [0], f"{case.id}: owners {owners}"
    for r, result in enumerate(ranks):
        # Every rank published step 0; only the owner's snapshot holds weights.
        assert result["step"] == 0
        assert bool(result["weights"]) == (r == 0), f"{case.id}: rank {r}"
    (logits,) = [result["logits"] for result in ranks if result["logits"] is not None][:1]
    owner = ranks[0]
    diff = max_logit_diff(
        case.family, case.tied, owner["weights"], owner["tokens"], logits, tmp_path
    )
    dp = len(ranks) // (case.tp * case.pp)
    print(f"{case.id} (dp{dp}, {len(ranks)} gloo ranks): max |logit diff| = {diff:.3g}")
    assert diff < TOLERANCE


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parallel_logits_match_transformers(
    ranks: dict[str, list[dict[str, Any]]], case: Case, tmp_path: Path
) -> None:
    _check(case, ranks[case.id], tmp_path)
