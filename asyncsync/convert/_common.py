"""The vocabulary of the conversion tables: model sizes, pipeline stages, layouts, rules.

A conversion table is data: a tuple of :class:`Rule` objects, each mapping one
Megatron parameter name pattern to one or more Hugging Face names and naming the
:class:`Layout` that says how the parameter is split across tensor-parallel
ranks and how the HF tensors are cut out of it.

Patterns use two placeholders: ``{L}`` is a layer number, ``{E}`` a routed-expert
number. A pattern containing ``{E}`` names a routed expert's weight; its shards
live on the expert tensor-parallel group. Every rule also says which part of the
model holds its parameter (:data:`Part`), which decides the pipeline stage it
lives on.

Every conversion takes the tensor-parallel *shards* of a parameter, in rank
order (one shard when tensor parallelism is 1 or the parameter is replicated),
because fused parameters cannot be split after a plain concatenation: each
rank's ``linear_fc1`` shard holds ``[gate_r; up_r]``, so the full gate is
``[gate_0; gate_1; ...]``, not the first half of ``cat(shards)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .._checks import is_int
from ..errors import ConfigError, ConversionError

__all__ = [
    "COLUMN",
    "DENSE_MLP",
    "GATE_UP",
    "QKV",
    "QK_NORM",
    "REPLICATED",
    "ROW",
    "VOCAB",
    "Layout",
    "ModelDims",
    "Part",
    "Rule",
    "Stage",
    "expert_rules",
    "rule",
    "shared_rules",
]


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; True layers or heads is a caller's mistake, not a size.
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


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
        num_layers: transformer layers of the whole model (all pipeline stages).
        num_experts: routed experts per MoE layer; ``None`` for a dense model.
            Required by the tables of MoE families, which check that every
            expert of every layer is converted.

    Raises :class:`~asyncsync.errors.ConfigError` naming the field for a size
    that is not a positive int, or heads that do not divide into the groups.
    """

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    num_layers: int
    num_experts: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_attention_heads", "num_query_groups", "head_dim", "vocab_size"):
            _check_int("ModelDims", name, getattr(self, name), 1)
        _check_int("ModelDims", "num_layers", self.num_layers, 1)
        if self.num_experts is not None:
            _check_int("ModelDims", "num_experts", self.num_experts, 1)
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"ModelDims.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def from_megatron(cls, config: Any, vocab_size: int) -> ModelDims:
        """Read the sizes from a megatron-core ``TransformerConfig``.

        ``vocab_size`` is the unpadded vocabulary (Megatron's config does not know it).
        Raises :class:`~asyncsync.errors.ConfigError` naming a size the config lacks.
        """
        try:
            heads = config.num_attention_heads
            groups = config.num_query_groups
            sizes = (config.kv_channels, config.num_layers, config.num_moe_experts)
        except AttributeError as e:
            raise ConfigError(
                f"config {type(config).__name__} has no {e.name!r}: expected a megatron-core "
                "TransformerConfig"
            ) from None
        return cls(
            num_attention_heads=heads,
            num_query_groups=heads if groups is None else groups,
            head_dim=sizes[0],
            vocab_size=vocab_size,
            num_layers=sizes[1],
            num_experts=sizes[2],
        )


@dataclass(frozen=True)
class Stage:
    """The part of a model one Megatron state dict holds, and how that dict numbers its layers.

    Megatron names a pipeline stage's layers locally: a stage's first layer is
    ``decoder.layers.0`` whatever its place in the model. The stage holds the
    model's layers ``layer_offset`` to ``layer_offset + num_layers - 1``, named
    ``decoder.layers.0`` to ``decoder.layers.{num_layers - 1}``. ``pre_process``
    (Megatron's flag of that name) says it holds the input embedding, which only
    the first stage does; ``post_process`` that it holds the final norm and the
    output layer, which only the last stage does. A model without pipeline
    parallelism is one stage that is both.

    With tied embeddings, Megatron's last stage holds ``output_layer.weight`` when
    it is not also the first: a copy of the embedding, kept equal to it. A
    conversion drops that copy (a tied HF checkpoint has no ``lm_head.weight``).

    Raises :class:`~asyncsync.errors.ConfigError` naming the field for a negative
    offset or layer count or a flag that is not a bool.
    """

    layer_offset: int
    num_layers: int
    pre_process: bool
    post_process: bool

    def __post_init__(self) -> None:
        _check_int("Stage", "layer_offset", self.layer_offset, 0)
        _check_int("Stage", "num_layers", self.num_layers, 0)
        for name in ("pre_process", "post_process"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Stage.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def layers(self) -> range:
        """The model's (global) numbers of this stage's layers."""
        return range(self.layer_offset, self.layer_offset + self.num_layers)

    @classmethod
    def whole(cls, num_layers: int) -> Stage:
        """The whole model as one stage (no pipeline parallelism)."""
        return cls(0, num_layers, pre_process=True, post_process=True)

    @classmethod
    def of_pipeline(cls, rank: int, size: int, num_layers: int) -> Stage:
        """Stage ``rank`` of a ``size``-stage pipeline that splits ``num_layers`` evenly.

        That is Megatron's default split (no virtual pipeline, no
        ``num_layers_in_first_pipeline_stage``); for any other, use
        :meth:`of_megatron` or state the offset. Raises
        :class:`~asyncsync.errors.ConfigError` if ``rank`` is not in
        ``range(size)`` or ``size`` does not divide ``num_layers``.
        """
        _check_int("Stage.of_pipeline", "size", size, 1)
        _check_int("Stage.of_pipeline", "num_layers", num_layers, 1)
        if not is_int(rank) or not 0 <= rank < size:
            raise ConfigError(f"Stage.of_pipeline: rank={rank!r} is not in range({size})")
        if num_layers % size:
            raise ConfigError(
                f"Stage.of_pipeline: num_layers={num_layers} does not split evenly into "
                f"size={size} stages; state each stage's layer_offset and num_layers"
            )
        per = num_layers // size
        return cls(per * rank, per, pre_process=rank == 0, post_process=rank == size - 1)

    @classmethod
    def of_megatron(cls, model: Any) -> Stage:
        """The stage a megatron-core ``GPTModel`` (one pipeline or virtual-pipeline chunk) holds.

        Read from its layers' ``layer_number`` (1-based, stage offset included)
        and its ``pre_process`` / ``post_process`` flags; wrappers (DDP,
        ``Float16Module``) are unwrapped. Raises
        :class:`~asyncsync.errors.ConfigError` for a model that is not a
        ``GPTModel`` and :class:`~asyncsync.errors.ConversionError` if its layers
        are not numbered consecutively.
        """
        from megatron.core.models.gpt import GPTModel
        from megatron.core.utils import unwrap_model

        model = unwrap_model(model)
        if not isinstance(model, GPTModel):
            raise ConfigError(
                f"Stage.of_megatron: model is a {type(model).__name__}, "
                "not a megatron-core GPTModel"
            )
        layers = list(model.decoder.layers) if model.decoder is not None else []
        numbers = [int(layer.layer_number) - 1 for layer in layers]
        offset = numbers[0] if numbers else 0
        if numbers != list(range(offset, offset + len(numbers))):
            raise ConversionError(
                f"the model chunk's layers are numbered {numbers} (0-based), not consecutively; "
                "a stage must hold a contiguous run of layers"
            )
        return cls(
            offset,
            len(numbers),
            pre_process=bool(model.pre_process),
            post_process=bool(model.post_process),
        )

    def describe(self, model_layers: int) -> str:
        """A short description for messages: ``stage with layers 2-3 of 4 (post_process)``."""
        if self == Stage.whole(model_layers):
            return f"the whole model ({model_layers} layers)"
        last = self.layer_offset + self.num_layers - 1
        span = {0: "no layers", 1: f"layer {last}"}.get(
            self.num_layers, f"layers {self.layer_offset}-{last}"
        )
        flags = [n for n in ("pre_process", "post_process") if getattr(self, n)]
        return f"stage with {span} of {model_layers}" + (f" ({', '.join(flags)})" if flags else "")


Merge = Callable[[str, Sequence[torch.Tensor], ModelDims], tuple[torch.Tensor, ...]]
"""``(megatron_name, tp_shards, dims) -> HF tensors``; the name is only for error messages."""


@dataclass(frozen=True)
class Layout:
    """How a parameter is sharded across tensor-parallel ranks and cut into HF tensors.

    ``tp_dim`` is the dimension Megatron partitions along (``None``: every rank
    holds the whole tensor); it must agree with the ``partition_dim`` Megatron
    records on the parameter, and ``partition_stride`` must be one of
    ``tp_strides``. ``merge`` turns the shards into ``outputs`` HF tensors; it
    may assume the shards share one shape, dtype and device, with more than
    ``tp_dim`` dimensions, and raises :class:`~asyncsync.errors.ConversionError` for
    shards that do not fit the model's sizes.
    """

    name: str
    tp_dim: int | None
    merge: Merge = field(repr=False)
    tp_strides: tuple[int, ...] = (1,)
    outputs: int = 1


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
        raise ConversionError(
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
        raise ConversionError(
            f"{name}: {dims.num_query_groups} query groups do not divide across "
            f"{len(shards)} tensor-parallel shards"
        )
    groups = dims.num_query_groups // len(shards)
    qs, ks, vs = [], [], []
    for shard in shards:
        if shard.shape[0] != groups * rows_per_group:
            raise ConversionError(
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
            raise ConversionError(
                f"{name}: fused gate/up shard has an odd row count {shard.shape[0]}"
            )
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
QKV = Layout("qkv", 0, _qkv, outputs=3)
"""Column-parallel fused q/k/v, grouped per query group; yields (q, k, v)."""
GATE_UP = Layout("gate_up", 0, _gate_up, tp_strides=(1, 2), outputs=2)
"""Column-parallel fused SwiGLU input projection; yields (gate, up).

Megatron marks it with partition stride 2 (each shard holds a gate and an up
block), or 1 where a backend cannot record strides; the layout is the same."""

Part = Literal["embedding", "layer", "head", "output"]
"""Which part of the model holds a rule's parameter, and so which pipeline stage.

``"embedding"``: the first stage (``pre_process``). ``"layer"``: the stage that
holds layer ``{L}``. ``"head"``: the last stage (``post_process``), like the final
norm. ``"output"``: the output layer, on the last stage; with tied embeddings a
model has none on a stage that also holds the embedding, and the last stage's
copy of the embedding is dropped."""

_PARTS = ("embedding", "layer", "head", "output")
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
    (one per tensor the layout's merge returns), ``layout`` how it is sharded and
    cut, ``part`` which part of the model holds it: ``"layer"`` for a pattern
    with ``{L}`` (the default there); a pattern without ``{L}`` must say.

    Raises :class:`~asyncsync.errors.ConfigError` naming the rule for a target
    with a placeholder the source lacks, a target count other than the layout's
    ``outputs``, or a ``part`` that does not fit the pattern.
    """

    source: str
    targets: tuple[str, ...]
    layout: Layout
    part: Part | None = None
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", _compile(self.source))
        sources = set(_PLACEHOLDER.findall(self.source))
        if not isinstance(self.targets, tuple) or not all(isinstance(t, str) for t in self.targets):
            raise ConfigError(f"rule {self.source!r}: targets must be a tuple of str")
        for target in self.targets:
            if set(_PLACEHOLDER.findall(target)) - sources:
                raise ConfigError(
                    f"rule {self.source!r}: target {target!r} uses a placeholder the source lacks"
                )
        if len(self.targets) != self.layout.outputs:
            raise ConfigError(
                f"rule {self.source!r}: layout {self.layout.name} makes {self.layout.outputs} "
                f"tensors, but the rule names {len(self.targets)} targets"
            )
        has_layer = "L" in sources
        part = self.part if self.part is not None else ("layer" if has_layer else None)
        if part not in _PARTS or (part == "layer") != has_layer:
            raise ConfigError(
                f"rule {self.source!r}: part={self.part!r} does not fit the pattern; a pattern "
                f"with {{L}} is part 'layer', one without is 'embedding', 'head' or 'output'"
            )
        if "E" in sources and not has_layer:
            raise ConfigError(
                f"rule {self.source!r}: an expert pattern ({{E}}) needs a layer ({{L}})"
            )
        object.__setattr__(self, "part", part)

    @property
    def expert(self) -> bool:
        """True for routed-expert weights (sharded over the expert tensor-parallel group)."""
        return "{E}" in self.source


def rule(
    source: str, targets: str | tuple[str, ...], layout: Layout, part: Part | None = None
) -> Rule:
    """Shorthand for a :class:`Rule` with one target given as a plain string."""
    return Rule(source, (targets,) if isinstance(targets, str) else targets, layout, part)


def shared_rules(mlp: Iterable[Rule] = ()) -> tuple[Rule, ...]:
    """Rules every decoder-only GPT family shares, plus the family's MLP rules.

    Layer norms appear under two names: the local spec keeps separate norm modules,
    the Transformer Engine spec fuses them into the following linear layer.
    """
    layer = "decoder.layers.{L}"
    hf = "model.layers.{L}"
    return (
        rule("embedding.word_embeddings.weight", "model.embed_tokens.weight", VOCAB, "embedding"),
        rule("output_layer.weight", "lm_head.weight", VOCAB, "output"),
        rule("decoder.final_layernorm.weight", "model.norm.weight", REPLICATED, "head"),
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
    Expert numbers are the model's: a state dict of one expert-parallel rank
    numbers its experts locally and is not convertible as it is.
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
