"""A model family's conversion table, and state-dict conversions that cannot drop weights.

A conversion of a state dict is planned from the names alone before any tensor
is touched: every name is matched to its rule, renumbered from the stage's
local layer numbers to the model's, and the Hugging Face names the plan makes
are compared with the ones the model (or the stage) must have. A missing layer,
a layer beyond the model, two parameters for one weight, or an
``output_layer.weight`` the tie rules out is refused with a
:class:`~asyncsync.errors.CoverageError` that names them; nothing is converted.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from ..errors import ConfigError, ConversionError, CoverageError
from ._common import Layout, ModelDims, Rule, Stage

__all__ = ["ConversionTable", "Planned", "StateDict"]

StateDict = Mapping[str, torch.Tensor | Sequence[torch.Tensor] | object]
"""Megatron names to tensors, or to sequences of tensor-parallel shards in rank order.

Values of ``._extra_state`` keys (Transformer Engine / FP8 metadata) may be anything."""

_EXTRA_STATE = "._extra_state"
_SHOWN = 6
"""How many missing or unexpected items a message lists before ``and N more``."""


class Planned(NamedTuple):
    """One Megatron parameter of a state dict and the Hugging Face weights it becomes.

    ``key`` is the name as the state dict has it (a stage's local layer number),
    ``name`` the same parameter named with the model's layer number, ``rule`` the
    table row that converts it, ``targets`` the HF names it becomes.
    """

    key: str
    name: str
    rule: Rule
    targets: tuple[str, ...]

    def convert(
        self, shards: Sequence[torch.Tensor], dims: ModelDims
    ) -> list[tuple[str, torch.Tensor]]:
        """The HF ``(name, tensor)`` pairs of this parameter given its TP shards in rank order.

        Raises :class:`~asyncsync.errors.ConversionError` naming the parameter when
        the shards do not fit its layout or ``dims``.
        """
        tensors = _merge(self.name, self.rule.layout, shards, dims)
        return list(zip(self.targets, tensors, strict=True))


class _Slot(NamedTuple):
    """Where an expected HF name comes from: its first rule, layer and expert."""

    rule: Rule
    layer: int | None
    expert: int | None


def _merge(
    name: str, layout: Layout, shards: Sequence[torch.Tensor], dims: ModelDims
) -> tuple[torch.Tensor, ...]:
    if isinstance(shards, torch.Tensor) or not isinstance(shards, Sequence):
        # A bare tensor would be read as a sequence of its rows.
        raise ConversionError(
            f"{name}: shards must be a sequence of tensors ([tensor] for one), "
            f"got {type(shards).__name__}"
        )
    if not shards:
        raise ConversionError(f"{name}: no shards given")
    first = shards[0]
    for i, shard in enumerate(shards):
        if not isinstance(shard, torch.Tensor):
            raise ConversionError(f"{name}: shard {i} is a {type(shard).__name__}, not a tensor")
        if (shard.shape, shard.dtype, shard.device) != (first.shape, first.dtype, first.device):
            # Megatron's shards of one parameter are equal in shape; torch.cat would
            # also promote mixed dtypes silently.
            raise ConversionError(
                f"{name}: shard {i} is {tuple(shard.shape)} {shard.dtype} on {shard.device}, "
                f"shard 0 is {tuple(first.shape)} {first.dtype} on {first.device}"
            )
    if layout.tp_dim is not None and first.dim() <= layout.tp_dim:
        raise ConversionError(
            f"{name}: a {first.dim()}-d shard cannot be split along dim {layout.tp_dim} "
            f"(layout {layout.name})"
        )
    tensors = layout.merge(name, [s.detach() for s in shards], dims)
    if len(tensors) != layout.outputs:
        raise ConversionError(
            f"{name}: layout {layout.name} made {len(tensors)} tensors, not {layout.outputs}"
        )
    return tensors


def _shards(key: str, value: object) -> Sequence[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return value  # each element is checked by _merge
    raise ConversionError(
        f"{key}: expected a tensor or a sequence of TP shards, got {type(value).__name__}"
    )


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown} and {len(items) - _SHOWN} more"


_LAYER_PREFIX = re.compile(r"^(.*?\.layers\.\d+\.)")


def _grouped(items: Sequence[tuple[str, str]]) -> list[str]:
    """``name (reason)`` per item; a reason's names of one layer shown once as ``prefix.*``."""
    by_reason: dict[str, list[str]] = {}
    for name, why in items:
        by_reason.setdefault(why, []).append(name)
    out: list[str] = []
    for why, names in by_reason.items():
        prefixes = {m.group(1) if (m := _LAYER_PREFIX.match(n)) else n for n in names}
        if len(names) > 1 and len(prefixes) == 1:
            out.append(f"{prefixes.pop()}* ({len(names)} parameters: {why})")
        else:
            out.extend(f"{n} ({why})" for n in names)
    return out


def _label(p: Planned) -> str:
    return p.key if p.key == p.name else f"{p.key} (= {p.name} of the model)"


def _check_dims(dims: object) -> None:
    if not isinstance(dims, ModelDims):
        raise ConfigError(f"dims must be a ModelDims, got {type(dims).__name__}")


def _check_tied(tied: object) -> None:
    if not isinstance(tied, bool):
        raise ConfigError(
            f"tied must be a bool (does the model share its embedding with its output "
            f"layer?), got {tied!r}"
        )


class ConversionTable:
    """The conversion of one model family: its name and its rules.

    Look-up is by full match of a rule's pattern; patterns of one table must not
    overlap (checked per name: a name matching two rules is an error). Every
    rule's targets are weights every model of the family has, in every layer
    (and for every routed expert); the coverage checks rely on it.

    Raises :class:`~asyncsync.errors.ConfigError` for a family that is not a
    non-empty string or a rule that is not a :class:`Rule`.
    """

    def __init__(self, family: str, rules: Iterable[Rule]) -> None:
        if not isinstance(family, str) or not family:
            raise ConfigError(f"ConversionTable: family must be a non-empty str, got {family!r}")
        self.family = family
        self.rules = tuple(rules)
        for i, r in enumerate(self.rules):
            if not isinstance(r, Rule):
                raise ConfigError(
                    f"ConversionTable {family!r}: rule {i} is a {type(r).__name__}, not a Rule"
                )

    def __repr__(self) -> str:
        return f"<ConversionTable {self.family} rules={len(self.rules)}>"

    # ------------------------------------------------------------ one parameter

    def _match(self, name: object) -> tuple[Rule, re.Match[str]]:
        if not isinstance(name, str):
            raise ConversionError(
                f"parameter name {name!r} is a {type(name).__name__}, not a str ({self.family})"
            )
        found = [(r, m) for r in self.rules if (m := r.regex.fullmatch(name)) is not None]
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

    def lookup(self, name: str) -> tuple[Rule, dict[str, str]]:
        """The rule for Megatron parameter ``name`` and its placeholders' values.

        Raises :class:`~asyncsync.errors.ConversionError` naming the parameter and
        this family if no rule (or more than one) matches.
        """
        r, m = self._match(name)
        return r, m.groupdict()

    def convert(
        self, name: str, shards: Sequence[torch.Tensor], dims: ModelDims
    ) -> list[tuple[str, torch.Tensor]]:
        """HF ``(name, tensor)`` pairs of one parameter given its TP shards in rank order.

        ``name`` carries the model's (global) layer number. ``shards`` holds one
        tensor for a replicated parameter or tensor parallelism 1. This converts
        one parameter and checks no coverage (use :meth:`to_hf` for a state dict).
        Raises :class:`~asyncsync.errors.ConversionError` for an unknown name,
        :class:`~asyncsync.errors.CoverageError` for a layer or expert beyond
        ``dims``, :class:`~asyncsync.errors.ConversionError` when the shards do not fit.
        """
        _check_dims(dims)
        r, m = self._match(name)
        places = m.groupdict()
        for key, limit, what in (
            ("L", dims.num_layers, "num_layers"),
            ("E", dims.num_experts, "num_experts"),
        ):
            if key in places and limit is not None and int(places[key]) >= limit:
                raise CoverageError(
                    f"parameter {name!r}: {'layer' if key == 'L' else 'expert'} {places[key]} "
                    f"is beyond the model's {what}={limit} ({self.family})",
                    extra=(name,),
                )
        planned = Planned(name, name, r, tuple(t.format(**places) for t in r.targets))
        return planned.convert(shards, dims)

    # ------------------------------------------------------------ state dicts

    def _stage(self, stage: Stage | None, dims: ModelDims) -> Stage:
        _check_dims(dims)
        if stage is None:
            return Stage.whole(dims.num_layers)
        if not isinstance(stage, Stage):
            raise ConfigError(f"stage must be a Stage or None, got {type(stage).__name__}")
        if stage.layer_offset + stage.num_layers > dims.num_layers:
            raise ConfigError(
                f"stage: layer_offset={stage.layer_offset} + num_layers={stage.num_layers} is "
                f"beyond the model's num_layers={dims.num_layers}"
            )
        return stage

    def hf_names(self, dims: ModelDims, *, tied: bool, stage: Stage | None = None) -> list[str]:
        """The HF names a conversion of ``stage`` (``None``: the whole model) makes, in table order.

        A tied model has no ``lm_head.weight``. Raises
        :class:`~asyncsync.errors.ConfigError` when the table converts routed
        experts and ``dims.num_experts`` is ``None``.
        """
        _check_tied(tied)
        return list(self._expected(dims, tied, self._stage(stage, dims)))

    def _expected(self, dims: ModelDims, tied: bool, st: Stage) -> dict[str, _Slot]:
        out: dict[str, _Slot] = {}
        for r in self.rules:
            if r.part == "layer":
                if r.expert and dims.num_experts is None and st.num_layers:
                    raise ConfigError(
                        f"the {self.family!r} table converts routed experts ({r.source}): "
                        "ModelDims.num_experts must say how many each layer has"
                    )
                experts: Iterable[int | None] = (
                    range(dims.num_experts or 0) if r.expert else (None,)
                )
                for layer in st.layers:
                    for expert in experts:
                        for t in r.targets:
                            out.setdefault(t.format(L=layer, E=expert), _Slot(r, layer, expert))
            elif (
                (r.part == "embedding" and st.pre_process)
                or (r.part == "head" and st.post_process)
                or (r.part == "output" and st.post_process and not tied)
            ):
                for t in r.targets:
                    out.setdefault(t, _Slot(r, None, None))
        return out

    def plan(
        self,
        names: Iterable[str],
        dims: ModelDims,
        *,
        tied: bool,
        stage: Stage | None = None,
    ) -> list[Planned]:
        """Plan the conversion of the parameters ``names`` of ``stage`` (``None``: the whole model).

        Names only, no tensors: keys ending in ``._extra_state`` are skipped, the
        rest are renumbered from the stage's local layer numbers to the model's.
        ``tied`` says whether the model shares its embedding with its output
        layer; see :class:`Stage` for where that leaves ``output_layer.weight``
        (the tied last stage's copy is skipped, not planned).

        Raises :class:`~asyncsync.errors.ConversionError` for the first name no
        rule knows, and :class:`~asyncsync.errors.CoverageError` naming every
        missing weight and every name that must not be there, unless together the
        names make exactly :meth:`hf_names`. :class:`~asyncsync.errors.ConfigError`
        for a stage beyond ``dims`` or a ``tied`` that is not a bool.
        """
        _check_tied(tied)
        st = self._stage(stage, dims)
        expected = self._expected(dims, tied, st)
        planned, extra = self._classify(names, dims, tied, st)
        self._check_cover(
            planned, extra, expected, dims, tied, st, head=st.describe(dims.num_layers)
        )
        return planned

    def _classify(
        self, names: Iterable[str], dims: ModelDims, tied: bool, st: Stage
    ) -> tuple[list[Planned], list[tuple[str, str]]]:
        """Each name's plan, or why it must not be in ``st``."""
        planned: list[Planned] = []
        extra: list[tuple[str, str]] = []
        whole = st == Stage.whole(dims.num_layers)
        for key in names:
            if isinstance(key, str) and key.endswith(_EXTRA_STATE):
                continue
            r, m = self._match(key)
            places = m.groupdict()
            name = key
            reason = None
            if r.part == "layer":
                local = int(places["L"])
                if local >= st.num_layers:
                    reason = (
                        f"layer {local} is beyond the model's {dims.num_layers} layers"
                        if whole
                        else f"local layer {local} is beyond the stage's {st.num_layers} layers: "
                        "a stage's state dict numbers its layers from 0"
                    )
                else:
                    places["L"] = str(st.layer_offset + local)
                    name = key[: m.start("L")] + places["L"] + key[m.end("L") :]
            elif r.part == "embedding" and not st.pre_process:
                reason = "only the first stage (pre_process) holds the embedding"
            elif r.part == "head" and not st.post_process:
                reason = "only the last stage (post_process) holds it"
            elif r.part == "output":
                if not st.post_process:
                    reason = "only the last stage (post_process) holds the output layer"
                elif tied and st.pre_process:
                    reason = (
                        "tied=True, and a tied model has no output layer of its own beside "
                        "its embedding; if its output layer is separate, pass tied=False"
                    )
                elif tied:
                    # The last stage's copy of the embedding: the first stage's is converted.
                    continue
            if reason is not None:
                extra.append((key, reason))
                continue
            planned.append(Planned(key, name, r, tuple(t.format(**places) for t in r.targets)))
        return planned, extra

    def _check_cover(
        self,
        planned: Sequence[Planned],
        extra: Sequence[tuple[str, str]],
        expected: Mapping[str, _Slot],
        dims: ModelDims,
        tied: bool,
        st: Stage,
        *,
        head: str,
        stage_hint: bool = True,
    ) -> None:
        """Raise CoverageError unless ``planned`` makes exactly ``expected``, nothing extra."""
        unexpected = list(extra)
        made: dict[str, Planned] = {}
        for p in planned:
            label = _label(p)
            clash = next((t for t in p.targets if t not in expected or t in made), None)
            if clash is None:
                made.update(dict.fromkeys(p.targets, p))
            elif clash in made:
                unexpected.append((label, f"makes {clash}, as {_label(made[clash])} does"))
            else:
                unexpected.append((label, f"{clash} is not part of {head}"))
        missing = [t for t in expected if t not in made]
        if not missing and not unexpected:
            return
        parts: list[str] = []
        whole_layers: list[int] = []
        if missing:
            per_layer = Counter(s.layer for s in expected.values())
            gone = Counter(expected[t].layer for t in missing)
            whole_layers = sorted(n for n, c in gone.items() if n is not None and c == per_layer[n])
            items = []
            if whole_layers:
                local = (
                    f" (local {[n - st.layer_offset for n in whole_layers]})"
                    if st.layer_offset
                    else ""
                )
                items.append(f"layers {whole_layers}{local} entirely")
            for t in missing:
                slot = expected[t]
                if slot.layer in whole_layers:
                    continue
                source = slot.rule.source.format(
                    L=None if slot.layer is None else slot.layer - st.layer_offset, E=slot.expert
                )
                items.append(f"{t} (from {source})")
            parts.append("missing " + _listed(items))
        if unexpected:
            parts.append("unexpected " + _listed(_grouped(unexpected)))
        if stage_hint and whole_layers and st == Stage.whole(dims.num_layers):
            parts.append(
                "if this is one pipeline stage's state dict (Megatron numbers each stage's "
                "layers from 0), pass stage=Stage(...), or convert all stages with to_hf_stages"
            )
        raise CoverageError(
            f"{self.family!r} conversion of {head} (tied={tied}) refused: " + "; ".join(parts),
            missing=tuple(missing),
            extra=tuple(k for k, _ in unexpected),
        )

    def to_hf(
        self,
        state_dict: StateDict,
        dims: ModelDims,
        *,
        tied: bool,
        stage: Stage | None = None,
    ) -> dict[str, torch.Tensor]:
        """Convert the Megatron state dict of ``stage`` (``None``: the whole model) to HF.

        Values are tensors, or sequences of TP shards in rank order (one list per
        parameter: zip the TP ranks' state dicts). The whole conversion is planned
        first (see :meth:`plan`): an input that does not make exactly
        :meth:`hf_names` raises :class:`~asyncsync.errors.CoverageError` naming what
        is missing and what must not be there; a value that is not a tensor or
        does not fit its layout raises :class:`~asyncsync.errors.ConversionError`.
        Nothing is returned partially and the input is not modified.

        A stage converts to the HF weights of its own layers (named with the
        model's layer numbers); :meth:`to_hf_stages` converts a whole pipeline
        and checks that the stages together cover the model.
        """
        if not isinstance(state_dict, Mapping):
            raise ConfigError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        out: dict[str, torch.Tensor] = {}
        for p in self.plan(state_dict, dims, tied=tied, stage=stage):
            out.update(p.convert(_shards(p.key, state_dict[p.key]), dims))
        return out

    def to_hf_stages(
        self,
        stages: Iterable[tuple[Stage, StateDict]],
        dims: ModelDims,
        *,
        tied: bool,
    ) -> dict[str, torch.Tensor]:
        """Convert the state dicts of a pipeline's stages to one HF state dict of the whole model.

        ``stages`` holds ``(stage, state_dict)`` pairs in any order; each state
        dict names its layers locally, as Megatron's ``GPTModel.state_dict()`` does
        on its stage. Each stage must cover itself (see :meth:`to_hf`) and the
        stages together the whole model, each layer once: a missing stage or two
        stages claiming a layer raise :class:`~asyncsync.errors.CoverageError`
        naming the layers. With ``tied=True``, the last stage's
        ``output_layer.weight`` (Megatron's copy of the embedding) must equal the
        first stage's embedding; otherwise the model is not tied and the copy is
        a separate output layer that tying would drop, so that is refused too.
        """
        _check_tied(tied)
        pairs = list(stages)
        if not pairs:
            raise ConfigError("to_hf_stages: no stages given")
        for i, pair in enumerate(pairs):
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not isinstance(pair[0], Stage)
                or not isinstance(pair[1], Mapping)
            ):
                raise ConfigError(f"to_hf_stages: item {i} is not a (Stage, state dict) pair")
        planned = [(p, sd) for st, sd in pairs for p in self.plan(sd, dims, tied=tied, stage=st)]
        whole = Stage.whole(dims.num_layers)
        self._check_cover(
            [p for p, _ in planned],
            [],
            self._expected(dims, tied, whole),
            dims,
            tied,
            whole,
            head=f"{len(pairs)} stage{'s' * (len(pairs) != 1)} together as "
            + whole.describe(dims.num_layers),
            stage_hint=False,
        )
        out: dict[str, torch.Tensor] = {}
        for p, sd in planned:
            out.update(p.convert(_shards(p.key, sd[p.key]), dims))
        if tied:
            self._check_tied_copy(pairs, planned, out, dims)
        return out

    def _check_tied_copy(
        self,
        pairs: Sequence[tuple[Stage, StateDict]],
        planned: Sequence[tuple[Planned, StateDict]],
        out: Mapping[str, torch.Tensor],
        dims: ModelDims,
    ) -> None:
        embedding = next((p for p, _ in planned if p.rule.part == "embedding"), None)
        if embedding is None:
            return
        for st, sd in pairs:
            if not st.post_process or st.pre_process:
                continue
            for key, value in sd.items():
                if isinstance(key, str) and key.endswith(_EXTRA_STATE):
                    continue
                r, _ = self._match(key)
                if r.part != "output":
                    continue
                (copy,) = _merge(key, r.layout, _shards(key, value), dims)[:1]
                if not torch.equal(copy, out[embedding.targets[0]]):
                    raise CoverageError(
                        f"{self.family!r} conversion refused: tied=True, but the last stage's "
                        f"{key} differs from the first stage's {embedding.key}, so the model's "
                        "output layer is not tied to its embedding; pass tied=False",
                        extra=(key,),
                    )
