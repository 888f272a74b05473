"""The transformers side of the end-to-end checks: load converted weights, compute logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from asyncsync.testing.megatron_shim import FAMILY_PRESETS, VOCAB_SIZE, hf_config

TOLERANCE = 1e-4
"""Largest allowed |HF logit - Megatron logit| (float32 on the CPU)."""


def load_hf(family: str, tied: bool, weights: dict[str, torch.Tensor], tmp: Path) -> Any:
    """A transformers model of ``family`` built from config, holding exactly ``weights``.

    Dense families: ``load_state_dict(strict=True)``. With tied embeddings the
    converted weights have no ``lm_head.weight`` (as in a HF checkpoint); the
    model's ``lm_head.weight`` is the embedding itself, so it is loaded under both names.

    MoE families: transformers >= 5 keeps experts fused in 3-D parameters and
    converts the per-expert Hub checkpoint layout while loading, so the weights
    are saved as a local safetensors checkpoint and loaded with
    ``from_pretrained`` (nothing is downloaded); every key must be used and none
    may be missing or mismatched.
    """
    import transformers
    from safetensors.torch import save_file

    config = hf_config(family, tied=tied)
    if FAMILY_PRESETS[family].num_experts is not None:
        config.save_pretrained(tmp)
        save_file(
            {k: v.contiguous() for k, v in weights.items()},
            tmp / "model.safetensors",
            metadata={"format": "pt"},
        )
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, output_loading_info=True, dtype=torch.float32, local_files_only=True
        )
        assert not info["missing_keys"], info
        assert not info["unexpected_keys"], info
        assert not info["mismatched_keys"], info
        assert not info["error_msgs"], info
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
        state = dict(weights)
        if tied:
            assert "lm_head.weight" not in state
            assert model.lm_head.weight is model.get_input_embeddings().weight
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True)
    return model.eval()


def max_logit_diff(
    family: str,
    tied: bool,
    weights: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    megatron_logits: torch.Tensor,
    tmp: Path,
) -> float:
    """Max |HF - Megatron| over ``tokens``; Megatron's padded vocabulary columns are cut off."""
    model = load_hf(family, tied, weights, tmp)
    with torch.no_grad():
        hf = model(tokens).logits
    ref = megatron_logits[..., :VOCAB_SIZE]
    assert hf.shape == ref.shape, (hf.shape, ref.shape)
    return float((hf - ref).abs().max())
