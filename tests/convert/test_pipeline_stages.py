"""Real pipeline-stage state dicts converted with ``to_hf`` / ``to_hf_stages``.

The state dicts are what megatron-core's ``GPTModel.state_dict()`` returns on each
rank of the spawned four-rank gloo world (``_ranks.py``, one run shared with
``test_megatron_parallel.py``): each pipeline stage names its layers from 0, and
the last stage of a tied model holds ``output_layer.weight``. The TP ranks'
dicts of a stage are joined into shard lists in rank order.

What a stage-dict conversion is compared with: the owner's snapshot, which
:class:`MegatronWeightSource` gathered over gloo by another path (renumbering
by ``layer_number``), and the state dict of the transformers model it loads into.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from asyncsync.convert import ModelDims, Stage, conversion_table
from asyncsync.errors import CoverageError

from ._hf import TOLERANCE, load_hf
from ._ranks import CASES, Case

PP_CASES = [c for c in CASES if c.pp > 1]
DENSE_PP_CASES = [c for c in PP_CASES if c.family not in ("qwen3_moe", "mixtral")]

StageDict = dict[str, Any]


def _dims(ranks: list[dict[str, Any]]) -> ModelDims:
    return ModelDims(**ranks[0]["dims"])


def _stages(ranks: list[dict[str, Any]]) -> list[tuple[Stage, StageDict]]:
    """Each pipeline stage of data-parallel replica 0: its Stage and its TP-joined state dict.

    A parameter is one tensor at TP=1 and a list of the TP ranks' tensors
    otherwise; the ``_extra_state`` keys are there too, as Megatron gives them.
    """
    replica = [r for r in ranks if r["dp_rank"] == 0]
    out = []
    for pp in sorted({r["pp_rank"] for r in replica}):
        tps = sorted((r for r in replica if r["pp_rank"] == pp), key=lambda r: r["tp_rank"])
        state: StageDict = {k: None for k in tps[0]["extra_state_keys"]}
        for key in tps[0]["state"]:
            shards = [r["state"][key] for r in tps]
            state[key] = shards[0] if len(shards) == 1 else shards
        out.append((Stage(*tps[0]["stage"]), state))
    return out


def _layer_names(names: list[str], layer: int) -> set[str]:
    return {n for n in names if n.startswith(f"model.layers.{layer}.")}


@pytest.mark.parametrize("case", PP_CASES, ids=lambda c: c.id)
def test_stages_are_what_megatron_reports(case: Case, ranks: dict[str, list[Any]]) -> None:
    # The fixture's stages are real: stage 0 holds layer 0 and the embedding, stage 1
    # holds layer 1 under the local name decoder.layers.0, and the final norm.
    (s0, d0), (s1, d1) = _stages(ranks[case.id])
    assert s0 == Stage(0, 1, pre_process=True, post_process=False)
    assert s1 == Stage(1, 1, pre_process=False, post_process=True)
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in d1
    assert not any(k.startswith("decoder.layers.1.") for k in (*d0, *d1))
    # The last stage holds output_layer.weight, tied or not (tied: the embedding's copy).
    assert "output_layer.weight" in d1
    assert "embedding.word_embeddings.weight" in d0


@pytest.mark.parametrize("case", PP_CASES, ids=lambda c: c.id)
def test_stage_dicts_merge_bit_for_bit_into_the_gathered_snapshot(
    case: Case, ranks: dict[str, list[Any]]
) -> None:
    dims = _dims(ranks[case.id])
    table = conversion_table(case.family)
    merged = table.to_hf_stages(_stages(ranks[case.id]), dims, tied=case.tied)

    snapshot = next(r for r in ranks[case.id] if r["owner"])["weights"]
    assert sorted(merged) == sorted(snapshot) == sorted(table.hf_names(dims, tied=case.tied))
    for name, tensor in merged.items():
        assert tensor.dtype == snapshot[name].dtype and torch.equal(tensor, snapshot[name]), name
    assert ("lm_head.weight" in merged) is not case.tied


@pytest.mark.parametrize("case", PP_CASES, ids=lambda c: c.id)
def test_each_stage_converts_to_its_own_layers_under_the_models_numbers(
    case: Case, ranks: dict[str, list[Any]]
) -> None:
    dims = _dims(ranks[case.id])
    table = conversion_table(case.family)
    (s0, d0), (s1, d1) = _stages(ranks[case.id])
    first = table.to_hf(d0, dims, tied=case.tied, stage=s0)
    last = table.to_hf(d1, dims, tied=case.tied, stage=s1)
    assert sorted(first) == sorted(table.hf_names(dims, tied=case.tied, stage=s0))
    assert sorted(last) == sorted(table.hf_names(dims, tied=case.tied, stage=s1))
    assert _layer_names(list(last), 1) and not _layer_names(list(last), 0)
    assert "model.embed_tokens.weight" in first and "model.norm.weight" in last
    assert not set(first) & set(last)


@pytest.mark.parametrize("case", PP_CASES, ids=lambda c: c.id)
def test_a_stage_dict_converted_without_its_stage_is_refused(
    case: Case, ranks: dict[str, list[Any]]
) -> None:
    dims = _dims(ranks[case.id])
    table = conversion_table(case.family)
    whole = table.hf_names(dims, tied=case.tied)
    (_, d0), (_, d1) = _stages(ranks[case.id])

    with pytest.raises(CoverageError, match=r"missing layers \[1\] entirely") as first:
        table.to_hf(d0, dims, tied=case.tied)
    assert _layer_names(whole, 1) | {"model.norm.weight"} <= set(first.value.missing)
    assert "pass stage=Stage(...)" in str(first.value)

    # Stage 1's local layer 0 reads as the model's layer 0, so layer 1 is missing.
    with pytest.raises(CoverageError, match=r"missing layers \[1\] entirely") as last:
        table.to_hf(d1, dims, tied=case.tied)
    assert _layer_names(whole, 1) | {"model.embed_tokens.weight"} <= set(last.value.missing)
    if case.tied:
        # The last stage's output_layer.weight, read as the whole tied model's, is refused.
        assert "output_layer.weight" in last.value.extra

    # Merging the stage dicts first: stage 1's layer 0 overwrites stage 0's; refused.
    with pytest.raises(CoverageError, match=r"missing layers \[1\] entirely"):
        table.to_hf({**d0, **d1}, dims, tied=case.tied)


@pytest.mark.parametrize(
    "case", PP_CASES[:1] + [c for c in PP_CASES if c.tied][:1], ids=lambda c: c.id
)
def test_stages_that_do_not_tile_the_model_are_refused(
    case: Case, ranks: dict[str, list[Any]]
) -> None:
    dims = _dims(ranks[case.id])
    table = conversion_table(case.family)
    (s0, d0), (s1, d1) = _stages(ranks[case.id])
    layer1 = _layer_names(table.hf_names(dims, tied=case.tied), 1)

    with pytest.raises(CoverageError, match=r"2 stages together.*missing layers \[1\]") as wrong:
        table.to_hf_stages(
            [(s0, d0), (Stage(0, 1, pre_process=False, post_process=True), d1)],
            dims,
            tied=case.tied,
        )
    assert layer1 <= set(wrong.value.missing)
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in wrong.value.extra
    assert "as decoder.layers.0.self_attention.linear_qkv.weight does" in str(wrong.value)

    with pytest.raises(CoverageError, match=r"1 stage together.*missing layers \[1\]") as lone:
        table.to_hf_stages([(s0, d0)], dims, tied=case.tied)
    assert layer1 | {"model.norm.weight"} <= set(lone.value.missing)

    with pytest.raises(CoverageError, match="embed_tokens"):
        table.to_hf_stages([(s0, d0), (s1, d1), (s0, d0)], dims, tied=case.tied)


def test_the_last_stage_of_a_tied_model(ranks: dict[str, list[Any]]) -> None:
    case = Case("qwen3", pp=2, tied=True)
    dims = _dims(ranks[case.id])
    table = conversion_table(case.family)
    (_, d0), (s1, d1) = _stages(ranks[case.id])
    embedding = d0["embedding.word_embeddings.weight"]

    # Megatron's copy of the embedding is dropped: a tied HF checkpoint has no lm_head.
    tied = table.to_hf(d1, dims, tied=True, stage=s1)
    assert "lm_head.weight" not in tied and "model.norm.weight" in tied
    # Stated untied, the same stage yields it as an lm_head, equal to the embedding.
    untied = table.to_hf(d1, dims, tied=False, stage=s1)
    assert torch.equal(untied["lm_head.weight"], embedding[: dims.vocab_size])
    # Without the copy, a tied last stage still converts; an untied one lacks its lm_head.
    no_copy = {k: v for k, v in d1.items() if k != "output_layer.weight"}
    assert table.to_hf(no_copy, dims, tied=True, stage=s1).keys() == tied.keys()
    with pytest.raises(CoverageError, match=r"missing lm_head\.weight") as info:
        table.to_hf(no_copy, dims, tied=False, stage=s1)
    assert info.value.missing == ("lm_head.weight",)


def test_an_untied_pipeline_stated_tied_is_refused(ranks: dict[str, list[Any]]) -> None:
    # Names alone cannot tell the last stage's embedding copy from a real output
    # layer; the merged conversion compares it with the embedding.
    case = Case("qwen3", pp=2)
    dims = _dims(ranks[case.id])
    with pytest.raises(
        CoverageError, match=r"tied=True, but the last stage's output_layer"
    ) as info:
        conversion_table(case.family).to_hf_stages(_stages(ranks[case.id]), dims, tied=True)
    assert info.value.extra == ("output_layer.weight",)


@pytest.mark.parametrize("case", DENSE_PP_CASES, ids=lambda c: c.id)
def test_merged_stages_are_transformers_own_state_dict(
    case: Case, ranks: dict[str, list[Any]], tmp_path: Path
) -> None:
    dims = _dims(ranks[case.id])
    merged = conversion_table(case.family).to_hf_stages(
        _stages(ranks[case.id]), dims, tied=case.tied
    )
    model = load_hf(case.family, case.tied, merged, tmp_path)
    own = model.state_dict()
    # Every weight transformers has, and nothing else; a tied lm_head is the embedding.
    assert set(own) == set(merged) | ({"lm_head.weight"} if case.tied else set())
    for name, tensor in merged.items():
        assert own[name].dtype == tensor.dtype and torch.equal(own[name], tensor), name
    if case.tied:
        assert torch.equal(own["lm_head.weight"], merged["model.embed_tokens.weight"])

    (logits,) = [r["logits"] for r in ranks[case.id] if r["logits"] is not None][:1]
    tokens = ranks[case.id][0]["tokens"]
    with torch.no_grad():
        hf = model(tokens).logits
    diff = float((hf - logits[..., : dims.vocab_size]).abs().max())
    print(f"{case.id} stage dicts -> to_hf_stages -> transformers: max |logit diff| = {diff:.3g}")
    assert diff < TOLERANCE
