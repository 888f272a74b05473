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

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ..errors import ConversionError
from ._common import ConversionTable, ModelDims, Rule
from ._registry import conversion_table

__all__ = ["MegatronWeightSource", "ParallelGroups"]

_LOCAL_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


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
        """Read the groups megatron's ``parallel_state.initialize_model_parallel`` made."""
        from megatron.core import parallel_state as ps

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
    """One parameter this rank holds: its name with a global layer number, and its rule."""

    name: str
    param: torch.Tensor
    rule: Rule


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
    the same order as the others' (one iteration at a time per rank). Every
    parameter's name is checked at construction, before any collective, so an
    unknown name raises :class:`~asyncsync.errors.ConversionError` on every rank
    alike instead of leaving the others blocked in a gather. If one rank stops
    iterating early, the others block in their next collective: treat a failed
    build as fatal to the job (or give the process groups a timeout).

    Raises ``ValueError`` for layouts it cannot gather: expert parallelism > 1,
    or an expert tensor-parallel size other than 1 or the tensor-parallel size.
    """

    def __init__(
        self,
        model: torch.nn.Module | Sequence[torch.nn.Module],
        family: str,
        *,
        vocab_size: int,
        groups: ParallelGroups | None = None,
    ) -> None:
        from megatron.core.utils import unwrap_model

        chunks = [
            unwrap_model(m) for m in ([model] if isinstance(model, torch.nn.Module) else model)
        ]
        if not chunks:
            raise ValueError("model: no model chunks given")
        self.table: ConversionTable = conversion_table(family)
        self.dims = ModelDims.from_megatron(chunks[0].config, vocab_size)
        self.groups = groups if groups is not None else ParallelGroups.from_parallel_state()
        g = self.groups
        if g.ep_size != 1:
            raise ValueError(
                f"expert parallelism {g.ep_size} is not supported: experts would have to be "
                "gathered across data-parallel ranks; use expert_model_parallel_size=1"
            )
        if g.etp_size not in (1, g.tp_size) or (
            g.etp_size == g.tp_size and g.etp_rank != g.tp_rank
        ):
            raise ValueError(
                f"expert tensor parallelism {g.etp_size} (rank {g.etp_rank}) must be 1 or equal "
                f"to tensor parallelism {g.tp_size} (rank {g.tp_rank})"
            )
        self._local = [
            _Local(name, param, self._checked_rule(name, param))
            for chunk in chunks
            for name, param in _global_parameters(chunk)
        ]
        self._device = self._local[0].param.device if self._local else torch.device("cpu")

    def __repr__(self) -> str:
        g = self.groups
        return (
            f"<MegatronWeightSource {self.table.family} tp={g.tp_rank}/{g.tp_size} "
            f"pp={g.pp_rank}/{g.pp_size} dp={g.dp_rank} params={len(self._local)} "
            f"owner={self.is_cache_owner()}>"
        )

    def is_cache_owner(self) -> bool:
        """True on the one rank (pp 0, tp 0, dp 0) whose iteration yields the weights."""
        g = self.groups
        return g.pp_rank == 0 and g.tp_rank == 0 and g.dp_rank == 0

    def _checked_rule(self, name: str, param: torch.Tensor) -> Rule:
        rule, _ = self.table.lookup(name)
        # Megatron records how it split a parameter in attributes set by
        # tensor_parallel.set_tensor_model_parallel_attributes; a table that
        # disagrees would concatenate shards along the wrong dimension.
        partitioned = bool(getattr(param, "tensor_model_parallel", False))
        dim = int(getattr(param, "partition_dim", -1)) if partitioned else None
        stride = int(getattr(param, "partition_stride", 1))
        layout = rule.layout
        if dim != layout.tp_dim or (partitioned and stride not in layout.tp_strides):
            raise ConversionError(
                f"parameter {name!r}: Megatron partitions it along dim {dim} (stride {stride}), "
                f"but the {self.table.family!r} table expects layout {layout.name} "
                f"(dim {layout.tp_dim}, stride in {layout.tp_strides})"
            )
        return rule

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
            raise RuntimeError("torch.distributed is not initialized")
        metas: list[list[_Meta]] = []
        if g.pp_size > 1 and g.tp_rank == 0:
            mine = [self._meta(p) for p in self._local]
            metas = [[] for _ in range(g.pp_size)]
            dist.all_gather_object(metas, mine, group=g.pp_group)
        for stage in range(g.pp_size):
            if stage == g.pp_rank:
                for p in self._local:
                    shards = self._gather(p)
                    if shards is None:
                        continue
                    if stage == 0:
                        yield from self.table.convert(p.name, shards, self.dims)
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
                    yield from self.table.convert(meta.name, received, self.dims)

    def _group_of(self, p: _Local) -> tuple[Any, int, int]:
        g = self.groups
        if p.rule.expert:
            return g.etp_group, g.etp_rank, g.etp_size
        return g.tp_group, g.tp_rank, g.tp_size

    def _meta(self, p: _Local) -> _Meta:
        _, _, size = self._group_of(p)
        shards = 1 if p.rule.layout.tp_dim is None else size
        return _Meta(p.name, tuple(p.param.shape), p.param.dtype, shards)

    def _gather(self, p: _Local) -> list[torch.Tensor] | None:
        """``p``'s shards in rank order on tensor-parallel rank 0, ``None`` on the others."""
        group, rank, size = self._group_of(p)
        local = p.param.detach()
        if p.rule.layout.tp_dim is None or size == 1:
            return [local] if self.groups.tp_rank == 0 else None
        local = local.contiguous()
        if rank == 0:
            out = [torch.empty_like(local) for _ in range(size)]
            dist.gather(local, out, group=group, group_dst=0)
            return out
        dist.gather(local, None, group=group, group_dst=0)
        return None


def _global_parameters(chunk: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``chunk``'s parameters named with global layer numbers; the tied output copy skipped."""
    layers = chunk.decoder.layers if chunk.decoder is not None else []
    for name, param in chunk.named_parameters():
        if name == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
            # With tied embeddings and pipeline parallelism the last stage keeps a
            # copy of the input embedding (kept equal by Megatron's embedding
            # group); the first stage's embedding is the one converted.
            continue
        m = _LOCAL_LAYER.fullmatch(name)
        if m is not None:
            # layer_number is 1-based and already includes this stage's offset.
            number = int(layers[int(m.group(1))].layer_number) - 1
            name = f"decoder.layers.{number}.{m.group(2)}"
        yield name, param
