"""A weight source that gathers a live megatron-core GPT model into Hugging Face tensors.

Every rank of the training job constructs a :class:`MegatronWeightSource` over its
model and iterates it for each build; iteration is collective. Tensor-parallel
shards are gathered one parameter at a time to tensor-parallel rank 0 of their
pipeline stage, pipeline stages other than the first send their gathered shards
to the single cache owner (pipeline rank 0, tensor-parallel rank 0,
data-parallel rank 0), and only the owner converts and yields ``(hf_name,
tensor)`` pairs. Every other rank yields nothing, so its cache publishes an empty
snapshot while its step still advances in lockstep.

Yielded tensors may share memory with the live parameters (a replicated
parameter at tensor parallelism 1 is yielded as a view): the consumer must copy
them before the next optimizer step changes them, as ``BuildHandle.add`` does.
They may live on the accelerator; the bucket copy moves them to the host.

Iteration blocks in collectives: run it in a worker thread (``BuildHandle.add``
does), never on an event loop. Peak extra memory is one gathered parameter per
rank, plus, on the owner, the tensors its consumer holds until it copies them
(``BuildHandle.add`` holds at most one bucket's worth).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..errors import ConfigError, ConversionError
from ._common import VOCAB, ModelDims, Stage
from ._registry import conversion_table
from ._table import ConversionTable, Planned

__all__ = ["MegatronWeightSource", "ParallelGroups"]


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups and ranks a :class:`MegatronWeightSource` gathers over.

    ``dp_rank`` is the data-parallel rank including context parallelism: replicas
    other than 0 hold the same weights and take no part. ``etp_*`` describe the
    expert tensor-parallel group (routed experts' shards). A group is ``None``
    only when its size is 1.
    """

    tp_group: Any
    tp_rank: int
    tp_size: int
    pp_group: Any
    pp_rank: int
    pp_size: int
    etp_group: Any
    etp_rank: int
    etp_size: int
    dp_rank: int
    ep_size: int

    @classmethod
    def from_parallel_state(cls) -> ParallelGroups:
        """Read the groups megatron's ``parallel_state.initialize_model_parallel`` made.

        Raises :class:`~asyncsync.errors.ConfigError` if it has not run.
        """
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise ConfigError(
                "groups=None, but megatron's parallel_state is not initialized: call "
                "parallel_state.initialize_model_parallel(...) first or pass groups="
            )
        return cls(
            tp_group=ps.get_tensor_model_parallel_group(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            etp_group=ps.get_expert_tensor_parallel_group(check_initialized=False),
            etp_rank=ps.get_expert_tensor_parallel_rank(),
            etp_size=ps.get_expert_tensor_parallel_world_size(),
            dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            ep_size=ps.get_expert_model_parallel_world_size(),
        )


class _Local(NamedTuple):
    """One parameter this rank holds, and its planned conversion (global name, rule, targets)."""

    planned: Planned
    param: torch.Tensor


class _Meta(NamedTuple):
    """What the owner needs to receive one parameter's shards from another stage."""

    name: str
    shard_shape: tuple[int, ...]
    dtype: torch.dtype
    num_shards: int


class MegatronWeightSource:
    """Iterable of HF ``(name, tensor)`` pairs gathered from a megatron-core GPT model.

    Args:
        model: this rank's ``GPTModel``, or its virtual-pipeline chunks in order.
            Wrappers (DDP, ``Float16Module``) are unwrapped.
        family: the conversion table's family name (see
            :func:`asyncsync.convert.conversion_table`).
        vocab_size: the true vocabulary size; Megatron's padding rows are dropped.
        groups: process groups to gather over; ``None`` reads megatron's
            ``parallel_state`` (which must be initialized).

    Construct and iterate on every rank of the job, each rank's iterations in
    the same order as the others' (one iteration at a time per rank). Each
    model chunk is planned at construction, before any collective, with
    :meth:`ConversionTable.plan <asyncsync.convert.ConversionTable.plan>` for the
    :class:`~asyncsync.convert.Stage` the chunk holds and the tie the model
    declares: an unknown name raises :class:`~asyncsync.errors.ConversionError`,
    a chunk that does not cover its stage :class:`~asyncsync.errors.CoverageError`.
    That the stages together cover the model is checked on every rank from the
    same names: at construction without pipeline parallelism, otherwise at the
    start of the first iteration (which exchanges the stages' parameter names
    once), before any gather, so every rank of data-parallel replica 0 raises
    alike. If one rank stops iterating early, the others block in their next
    collective: treat a failed build as fatal to the job (or give the process
    groups a timeout).

    Raises :class:`~asyncsync.errors.ConfigError` for options it cannot work
    with: an unknown family, a ``vocab_size`` that is not a positive int or
    exceeds the model's (padded) vocabulary, a model that is not a ``GPTModel``,
    megatron's parallel state not initialized when ``groups`` is ``None``,
    expert parallelism > 1, or an expert tensor-parallel size other than 1 or
    the tensor-parallel size.
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        family: str,
        *,
        vocab_size: int,
        groups: ParallelGroups | None = None,
    ) -> None:
        from megatron.core.models.gpt import GPTModel
        from megatron.core.utils import unwrap_model

        self.table: ConversionTable = conversion_table(family)
        given = [model] if isinstance(model, torch.nn.Module) else model
        if not isinstance(given, Sequence) or isinstance(given, str) or not given:
            raise ConfigError(
                f"model: expected a GPTModel or a non-empty sequence of its virtual-pipeline "
                f"chunks, got {model!r:.80}"
            )
        chunks = []
        for i, m in enumerate(given):
            chunk = unwrap_model(m) if isinstance(m, torch.nn.Module) else m
            if not isinstance(chunk, GPTModel):
                raise ConfigError(
                    f"model chunk {i} is a {type(chunk).__name__}, not a megatron-core GPTModel"
                )
            chunks.append(chunk)
        self.dims = ModelDims.from_megatron(chunks[0].config, vocab_size)
        self.tied = bool(chunks[0].share_embeddings_and_output_weights)
        if any(bool(c.share_embeddings_and_output_weights) != self.tied for c in chunks):
            raise ConfigError("model chunks disagree on share_embeddings_and_output_weights")
        self.groups = groups if groups is not None else ParallelGroups.from_parallel_state()
        g = self.groups
        if g.ep_size != 1:
            raise ConfigError(
                f"expert parallelism {g.ep_size} is not supported: experts would have to be "
                "gathered across data-parallel ranks; use expert_model_parallel_size=1"
            )
        if g.etp_size not in (1, g.tp_size) or (
            g.etp_size == g.tp_size and g.etp_rank != g.tp_rank
        ):
            raise ConfigError(
                f"expert tensor parallelism {g.etp_size} (rank {g.etp_rank}) must be 1 or equal "
                f"to tensor parallelism {g.tp_size} (rank {g.tp_rank})"
            )
        if (g.tp_size > 1 or g.pp_size > 1) and not dist.is_initialized():
            raise ConfigError(
                f"tensor parallelism {g.tp_size} x pipeline parallelism {g.pp_size} needs "
                "torch.distributed initialized"
            )
        self._local: list[_Local] = []
        for chunk in chunks:
            params = dict(chunk.named_parameters())
            stage = Stage.of_megatron(chunk)
            for p in self.table.plan(params, self.dims, tied=self.tied, stage=stage):
                self._check_param(p, params[p.key])
                self._local.append(_Local(p, params[p.key]))
        self._device = self._local[0].param.device if self._local else torch.device("cpu")
        # Every stage's parameters and the whole model's plan, once they are known.
        self._metas: list[list[_Meta]] | None = None
        self._whole: dict[str, Planned] | None = None
        if g.pp_size == 1:
            self._metas = [[self._meta(p) for p in self._local]]
            self._whole = self._plan_whole(self._metas)

    def __repr__(self) -> str:
        g = self.groups
        return (
            f"<MegatronWeightSource {self.table.family} tp={g.tp_rank}/{g.tp_size} "
            f"pp={g.pp_rank}/{g.pp_size} dp={g.dp_rank} params={len(self._local)} "
            f"tied={self.tied} owner={self.is_cache_owner()}>"
        )

    def is_cache_owner(self) -> bool:
        """True on the one rank (pp 0, tp 0, dp 0) whose iteration yields the weights."""
        g = self.groups
        return g.pp_rank == 0 and g.tp_rank == 0 and g.dp_rank == 0

    def _check_param(self, p: Planned, param: torch.Tensor) -> None:
        # Megatron records how it split a parameter in attributes set by
        # tensor_parallel.set_tensor_model_parallel_attributes; a table that
        # disagrees would concatenate shards along the wrong dimension.
        partitioned = bool(getattr(param, "tensor_model_parallel", False))
        dim = int(getattr(param, "partition_dim", -1)) if partitioned else None
        stride = int(getattr(param, "partition_stride", 1))
        layout = p.rule.layout
        if dim != layout.tp_dim or (partitioned and stride not in layout.tp_strides):
            raise ConversionError(
                f"parameter {p.key!r}: Megatron partitions it along dim {dim} (stride {stride}), "
                f"but the {self.table.family!r} table expects layout {layout.name} "
                f"(dim {layout.tp_dim}, stride in {layout.tp_strides})"
            )
        if layout is VOCAB:
            _, _, size = self._group_of(p)
            rows = param.shape[0] * (size if partitioned else 1)
            if rows < self.dims.vocab_size:
                raise ConfigError(
                    f"vocab_size={self.dims.vocab_size} is more than the {rows} vocabulary rows "
                    f"of {p.key!r}"
                )

    def _plan_whole(self, metas: list[list[_Meta]]) -> dict[str, Planned]:
        names = [m.name for stage in metas for m in stage]
        return {p.name: p for p in self.table.plan(names, self.dims, tied=self.tied)}

    def _pipeline(self) -> tuple[list[list[_Meta]], dict[str, Planned]]:
        """Every stage's parameters and the whole model's plan; collective the first time."""
        if self._metas is None or self._whole is None:
            g = self.groups
            metas: list[list[_Meta]] = [[] for _ in range(g.pp_size)]
            dist.all_gather_object(metas, [self._meta(p) for p in self._local], group=g.pp_group)
            # Every rank plans the same names, so a model the stages do not cover
            # exactly raises on all of them alike, before any gather.
            self._whole = self._plan_whole(metas)
            self._metas = metas
        return self._metas, self._whole

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Gather and yield HF pairs on the owner; take part in gathers elsewhere. Blocking."""
        return self._iterate()

    def _iterate(self) -> Iterator[tuple[str, torch.Tensor]]:
        g = self.groups
        if g.dp_rank != 0:
            # Data-parallel replicas hold the same weights as replica 0, whose ranks
            # (and only those) take part in the gathers below.
            return
        if not dist.is_initialized() and (g.tp_size > 1 or g.pp_size > 1):
            raise ConfigError(
                f"tensor parallelism {g.tp_size} x pipeline parallelism {g.pp_size} needs "
                "torch.distributed initialized"
            )
        metas, whole = self._pipeline()
        for stage in range(g.pp_size):
            if stage == g.pp_rank:
                for p in self._local:
                    shards = self._gather(p)
                    if shards is None:
                        continue
                    if stage == 0:
                        yield from p.planned.convert(shards, self.dims)
                    else:
                        for shard in shards:
                            dist.send(shard.contiguous(), group=g.pp_group, group_dst=0)
            elif self.is_cache_owner():
                for meta in metas[stage]:
                    received = []
                    for _ in range(meta.num_shards):
                        buf = torch.empty(meta.shard_shape, dtype=meta.dtype, device=self._device)
                        dist.recv(buf, group=g.pp_group, group_src=stage)
                        received.append(buf)
                    yield from whole[meta.name].convert(received, self.dims)

    def _group_of(self, p: Planned) -> tuple[Any, int, int]:
        g = self.groups
        if p.rule.expert:
            return g.etp_group, g.etp_rank, g.etp_size
        return g.tp_group, g.tp_rank, g.tp_size

    def _meta(self, local: _Local) -> _Meta:
        p = local.planned
        _, _, size = self._group_of(p)
        shards = 1 if p.rule.layout.tp_dim is None else size
        return _Meta(p.name, tuple(local.param.shape), local.param.dtype, shards)

    def _gather(self, local: _Local) -> list[torch.Tensor] | None:
        """The parameter's shards in rank order on tensor-parallel rank 0, ``None`` elsewhere."""
        group, rank, size = self._group_of(local.planned)
        tensor = local.param.detach()
        if local.planned.rule.layout.tp_dim is None or size == 1:
            return [tensor] if self.groups.tp_rank == 0 else None
        tensor = tensor.contiguous()
        if rank == 0:
            out = [torch.empty_like(tensor) for _ in range(size)]
            dist.gather(tensor, out, group=group, group_dst=0)
            return out
        dist.gather(tensor, None, group=group, group_dst=0)
        return None
