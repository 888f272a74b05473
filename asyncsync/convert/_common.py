"""Shared machinery of the Megatron-core -> Hugging Face conversion tables.

A conversion table is data: a tuple of :class:`Rule` objects, each mapping one
Megatron parameter name pattern to one or more Hugging Face names and naming the
:class:`Layout` that says how the parameter is split across tensor-parallel
ranks and how the HF tensors are cut out of it.

Patterns use two placeholders: ``{L}`` is a global (pipeline-independent) layer
number, ``{E}`` a global routed-expert number. A pattern containing ``{E}`` names a
routed expert's weight; its shards live on the expert tensor-parallel group.

Every conversion takes the tensor-parallel *shards* of a parameter, in rank
order (one shard when tensor parallelism is 1 or the parameter is replicated),
because fused parameters cannot be split after a plain concatenation: each
rank's ``linear_fc1`` shard holds ``[gate_r; up_r]``, so the full gate is
``[gate_0; gate_1; ...]``, not the first half of ``cat(shards)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConversionError

__all__ = [
    "COLUMN",
    "DENSE_MLP",
    "GATE_UP",
    "QKV",
    "QK_NORM",
    "REPLICATED",
    "ROW",
    "VOCAB",
    "ConversionTable",
    "Layout",
    "ModelDims",
    "Rule",
    "expert_rules",
    "rule",
    "shared_rules",
]


@dataclass(frozen=True)
class ModelDims:
    """The model sizes a conversion needs (Megatron's view of them).

    Attributes:
        num_attention_heads: query heads of the whole model (all TP ranks).
        num_query_groups: key/value heads (GQA groups) of the whole model.
        head_dim: channels per head (Megatron ``kv_channels``).
        vocab_size: the true vocabulary size (the HF ``config.vocab_size``).
            Megatron pads its embedding and output rows to a multiple of a
            divisor; rows beyond ``vocab_size`` are padding and are dropped.
    """

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        for name in ("num_attention_heads", "num_query_groups", "head_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def from_megatron(cls, config: Any, vocab_size: int) -> ModelDims:
        """Read the sizes from a megatron-core ``TransformerConfig``.

        ``vocab_size`` is the unpadded vocabulary (Megatron's config does not know it).
        """
        heads = int(config.num_attention_heads)
        groups = config.num_query_groups
        return cls(
            num_attention_heads=heads,
            num_query_groups=heads if groups is None else int(groups),
            head_dim=int(config.kv_channels),
            vocab_size=int(vocab_size),
        )


Merge = Callable[[str, Sequence[torch.Tensor], ModelDims], tuple[torch.Tensor, ...]]
"""``(megatron_name, tp_shards, dims) -> HF tensors``; the name is only for error messages."""


@dataclass(frozen=True)
class Layout:
    """How a parameter is sharded across tensor-parallel ranks and cut into HF tensors.

    ``tp_dim`` is the dimension Megatron partitions along (``None``: every rank
    holds the whole tensor); it must agree with the ``partition_dim`` Megatron
    records on the parameter, and ``partition_stride`` must be one of
    ``tp_strides``. ``merge`` turns the shards into the HF tensors.
    """

    name: str
    tp_dim: int | None
    merge: Merge = field(repr=False)
    tp_strides: tuple[int, ...] = (1,)


def _replicated(name: str, shards: Sequence[torch.Tensor], dims: ModelDims) -> tuple[torch.Tensor]:
    # Replicated parameters are identical on every rank; the first one is the value.
    return (shards[0],)


def _cat(dim: int) -> Merge:
    def merge(name: str, shards: Sequence[torch.Tensor], dims: ModelDims) -> tuple[torch.Tensor]:
        return (shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=dim),)

    return merge


def _vocab(name: str, shards: Sequence[torch.Tensor], dims: ModelDims) -> tuple[torch.Tensor]:
    full = shards[0] if len(shards) == 1 else torch.cat(list(shards), dim=0)
    if full.shape[0] < dims.vocab_size:
        raise ValueError(
            f"{name}: {full.shape[0]} vocabulary rows is fewer than vocab_size={dims.vocab_size}"
        )
    # Megatron pads the vocabulary so it divides evenly across TP ranks; drop the pad rows.
    return (full[: dims.vocab_size],)


def _qkv(name: str, shards: Sequence[torch.Tensor], dims: ModelDims) -> tuple[torch.Tensor, ...]:
    # Megatron fuses q/k/v per query group: rows are [group][q heads, k, v][head_dim].
    # Each TP rank holds a contiguous block of whole groups, so each shard is split
    # on its own and the q, k and v parts are concatenated in rank order.
    qpg, hd = dims.heads_per_group, dims.head_dim
    rows_per_group = (qpg + 2) * hd
    if dims.num_query_groups % len(shards):
        raise ValueError(
            f"{name}: {dims.num_query_groups} query groups do not divide across "
            f"{len(shards)} tensor-parallel shards"
        )
    groups = dims.num_query_groups // len(shards)
    qs, ks, vs = [], [], []
    for shard in shards:
        if shard.shape[0] != groups * rows_per_group:
            raise ValueError(
                f"{name}: shard has {shard.shape[0]} rows, expected {groups} query groups x "
                f"({qpg} q + 1 k + 1 v heads) x head_dim {hd} = {groups * rows_per_group}"
            )
        per_group = shard.reshape(groups, qpg + 2, hd, *shard.shape[1:])
        qs.append(per_group[:, :qpg].reshape(groups * qpg * hd, *shard.shape[1:]))
        ks.append(per_group[:, qpg].reshape(groups * hd, *shard.shape[1:]))
        vs.append(per_group[:, qpg + 1].reshape(groups * hd, *shard.shape[1:]))
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


def _gate_up(
    name: str, shards: Sequence[torch.Tensor], dims: ModelDims
) -> tuple[torch.Tensor, ...]:
    # Each TP rank's linear_fc1 shard is [gate_r; up_r]: split per shard, then
    # concatenate the gate halves and the up halves in rank order.
    gates, ups = [], []
    for shard in shards:
        if shard.shape[0] % 2:
            raise ValueError(f"{name}: fused gate/up shard has an odd row count {shard.shape[0]}")
        gate, up = shard.chunk(2, dim=0)
        gates.append(gate)
        ups.append(up)
    return torch.cat(gates), torch.cat(ups)


REPLICATED = Layout("replicated", None, _replicated)
"""Every rank holds the whole tensor (norms, routers, row-parallel biases)."""
COLUMN = Layout("column", 0, _cat(0))
"""Column-parallel: output rows split across ranks."""
ROW = Layout("row", 1, _cat(1))
"""Row-parallel: input columns split across ranks."""
VOCAB = Layout("vocab", 0, _vocab)
"""Vocabulary-parallel embedding or output layer: rows split, padding rows dropped."""
QKV = Layout("qkv", 0, _qkv)
"""Column-parallel fused q/k/v, grouped per query group; yields (q, k, v)."""
GATE_UP = Layout("gate_up", 0, _gate_up, tp_strides=(1, 2))
"""Column-parallel fused SwiGLU input projection; yields (gate, up).

Megatron marks it with partition stride 2 (each shard holds a gate and an up
block), or 1 where a backend cannot record strides; the layout is the same."""

_PLACEHOLDER = re.compile(r"\{([LE])\}")


def _compile(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(pattern):
        parts.append(re.escape(pattern[pos : m.start()]))
        parts.append(rf"(?P<{m.group(1)}>\d+)")
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("".join(parts))


@dataclass(frozen=True)
class Rule:
    """One row of a conversion table.

    ``source`` is a Megatron name pattern, ``targets`` the HF names it becomes
    (one per tensor the layout's merge returns), ``layout`` how it is sharded and cut.
    """

    source: str
    targets: tuple[str, ...]
    layout: Layout
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", _compile(self.source))
        sources = set(_PLACEHOLDER.findall(self.source))
        for target in self.targets:
            if set(_PLACEHOLDER.findall(target)) - sources:
                raise ValueError(
                    f"rule {self.source!r}: target {target!r} uses a placeholder the source lacks"
                )

    @property
    def expert(self) -> bool:
        """True for routed-expert weights (sharded over the expert tensor-parallel group)."""
        return "{E}" in self.source


def rule(source: str, targets: str | tuple[str, ...], layout: Layout) -> Rule:
    """Shorthand for a :class:`Rule` with one target given as a plain string."""
    return Rule(source, (targets,) if isinstance(targets, str) else targets, layout)


def shared_rules(mlp: Iterable[Rule] = ()) -> tuple[Rule, ...]:
    """Rules every decoder-only GPT family shares, plus the family's MLP rules.

    Layer norms appear under two names: the local spec keeps separate norm modules,
    the Transformer Engine spec fuses them into the following linear layer.
    """
    layer = "decoder.layers.{L}"
    hf = "model.layers.{L}"
    return (
        rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB),
        rule("output_layer.weight", "lm_head.weight", VOCAB),
        rule("decoder.final_layernorm.weight", "model.norm.weight", REPLICATED),
        rule(f"{layer}.input_layernorm.weight", f"{hf}.input_layernorm.weight", REPLICATED),
        rule(
            f"{layer}.self_attention.linear_qkv.layer_norm_weight",
            f"{hf}.input_layernorm.weight",
            REPLICATED,
        ),
        rule(
            f"{layer}.self_attention.linear_qkv.weight",
            (
                f"{hf}.self_attn.q_proj.weight",
                f"{hf}.self_attn.k_proj.weight",
                f"{hf}.self_attn.v_proj.weight",
            ),
            QKV,
        ),
        rule(f"{layer}.self_attention.linear_proj.weight", f"{hf}.self_attn.o_proj.weight", ROW),
        rule(
            f"{layer}.pre_mlp_layernorm.weight", f"{hf}.post_attention_layernorm.weight", REPLICATED
        ),
        rule(
            f"{layer}.mlp.linear_fc1.layer_norm_weight",
            f"{hf}.post_attention_layernorm.weight",
            REPLICATED,
        ),
        *mlp,
    )


DENSE_MLP = (
    rule(
        "decoder.layers.{L}.mlp.linear_fc1.weight",
        ("model.layers.{L}.mlp.gate_proj.weight", "model.layers.{L}.mlp.up_proj.weight"),
        GATE_UP,
    ),
    rule("decoder.layers.{L}.mlp.linear_fc2.weight", "model.layers.{L}.mlp.down_proj.weight", ROW),
)
"""SwiGLU MLP rules of the dense families (Llama, Mistral, Qwen2, Qwen3)."""

QK_NORM = (
    rule(
        "decoder.layers.{L}.self_attention.q_layernorm.weight",
        "model.layers.{L}.self_attn.q_norm.weight",
        REPLICATED,
    ),
    rule(
        "decoder.layers.{L}.self_attention.k_layernorm.weight",
        "model.layers.{L}.self_attn.k_norm.weight",
        REPLICATED,
    ),
)
"""Per-head q/k RMSNorm rules (Qwen3, Qwen3-MoE)."""


def expert_rules(block: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Router and expert rules for an HF MoE block named ``block`` with per-expert names.

    Covers the local spec (``SequentialMLP``: ``local_experts.{E}.linear_fc1``) and
    the Transformer Engine grouped spec (``TEGroupedMLP``: ``linear_fc1.weight{E}``).
    """
    hf = f"model.layers.{{L}}.{block}"
    mc = "decoder.layers.{L}.mlp"
    gate_up = (f"{hf}.experts.{{E}}.{gate}.weight", f"{hf}.experts.{{E}}.{up}.weight")
    down_ = f"{hf}.experts.{{E}}.{down}.weight"
    return (
        rule(f"{mc}.router.weight", f"{hf}.gate.weight", REPLICATED),
        rule(f"{mc}.experts.local_experts.{{E}}.linear_fc1.weight", gate_up, GATE_UP),
        rule(f"{mc}.experts.local_experts.{{E}}.linear_fc2.weight", down_, ROW),
        rule(f"{mc}.experts.linear_fc1.weight{{E}}", gate_up, GATE_UP),
        rule(f"{mc}.experts.linear_fc2.weight{{E}}", down_, ROW),
    )


_EXTRA_STATE = "._extra_state"


class ConversionTable:
    """The conversion of one model family: its name and its rules.

    Look-up is by full match of a rule's pattern; patterns of one table must not
    overlap (checked per name: a name matching two rules is an error).
    """

    def __init__(self, family: str, rules: Iterable[Rule]) -> None:
        self.family = family
        self.rules = tuple(rules)

    def __repr__(self) -> str:
        return f"<ConversionTable {self.family} rules={len(self.rules)}>"

    def lookup(self, name: str) -> tuple[Rule, dict[str, str]]:
        """The rule for Megatron parameter ``name`` (global layer numbers) and its placeholders.

        Raises :class:`~asyncsync.errors.ConversionError` naming the parameter and
        this family if no rule matches.
        """
        found: list[tuple[Rule, dict[str, str]]] = []
        for r in self.rules:
            m = r.regex.fullmatch(name)
            if m is not None:
                found.append((r, m.groupdict()))
        if not found:
            raise ConversionError(
                f"parameter {name!r} is not known to the {self.family!r} conversion table "
                f"(the model family assumed for this model). If the model is of another "
                f"family, pass that family's name; if it is a {self.family} variant with extra "
                f"parameters, add a rule for this name."
            )
        if len(found) > 1:
            raise ConversionError(
                f"parameter {name!r} matches {len(found)} rules of the {self.family!r} table: "
                f"{[r.source for r, _ in found]}"
            )
        return found[0]

    def convert(
        self, name: str, shards: Sequence[torch.Tensor], dims: ModelDims
    ) -> list[tuple[str, torch.Tensor]]:
        """HF ``(name, tensor)`` pairs of one Megatron parameter given its TP shards in rank order.

        ``shards`` holds one tensor for a replicated parameter or tensor parallelism 1.
        Raises :class:`~asyncsync.errors.ConversionError` for an unknown name and
        ``ValueError`` when the shards do not fit ``dims``.
        """
        if not shards:
            raise ValueError(f"{name}: no shards given")
        r, places = self.lookup(name)
        tensors = r.layout.merge(name, [s.detach() for s in shards], dims)
        if len(tensors) != len(r.targets):
            raise ValueError(
                f"{name}: layout {r.layout.name} made {len(tensors)} tensors for "
                f"{len(r.targets)} targets"
            )
        return [(t.format(**places), x) for t, x in zip(r.targets, tensors, strict=True)]

    def to_hf(
        self,
        state_dict: Mapping[str, torch.Tensor | Sequence[torch.Tensor] | object],
        dims: ModelDims,
    ) -> dict[str, torch.Tensor]:
        """Convert a Megatron state dict (global layer numbers) to a HF state dict.

        Values are tensors, or sequences of TP shards in rank order. Keys ending in
        ``._extra_state`` (Transformer Engine / FP8 metadata, not weights) are
        skipped. Tied embeddings: a Megatron model that shares its output layer has
        no ``output_layer.weight``, so the result has no ``lm_head.weight``, as in a HF
        checkpoint saved with ``tie_word_embeddings=True``. Raises
        :class:`~asyncsync.errors.ConversionError` for the first unknown name.
        """
        out: dict[str, torch.Tensor] = {}
        for name, value in state_dict.items():
            if name.endswith(_EXTRA_STATE):
                continue
            shards: Sequence[torch.Tensor]
            if isinstance(value, torch.Tensor):
                shards = (value,)
            elif isinstance(value, Sequence) and all(isinstance(v, torch.Tensor) for v in value):
                shards = value
            else:
                raise TypeError(
                    f"{name}: expected a tensor or a sequence of TP shards, got {type(value).__name__}"
                )
            for hf_name, tensor in self.convert(name, shards, dims):
                if hf_name in out:
                    raise ConversionError(
                        f"{name!r} and another parameter both map to {hf_name!r} ({self.family})"
                    )
                out[hf_name] = tensor
        return out
