"""Test-only: run megatron-core GPT models on the CPU, and build tiny ones.

megatron-core has no CPU mode. Building a model works with
``use_cpu_initialization=True``, but its forward pass reaches for CUDA in a few
fixed places. :func:`cpu_megatron` redirects exactly those, for the duration of a
``with`` block, in this process:

* ``torch.cuda.current_device()``: the rotary embedding moves ``inv_freq`` to it on
  first use, the global memory buffer allocates on it, and the MoE router moves its
  weight to it. Inside the block it returns the CPU device.
* ``CudaRNGStatesTracker.fork()``: attention dropout and embedding dropout run in
  a forked *CUDA* RNG state. Inside the block the fork saves and restores the CPU
  RNG state instead (the tests use dropout 0, so no random numbers are drawn).
* ``fused_softmax.get_default_causal_mask``: builds the causal mask with
  ``device="cuda"`` when no attention mask is passed; replaced by the same mask on the CPU.
* ``moe_utils.te_general_gemm``: the MoE router's gating GEMM tests
  ``te_general_gemm is not None``, but megatron-core 0.16 binds that name only when
  Transformer Engine imports, so without Transformer Engine the router raises
  ``NameError`` on any device. Inside the block the name is bound to ``None``, which
  selects megatron's own ``torch.mm`` path.

:func:`cpu_megatron_build` additionally makes ``Tensor.cuda()`` return the tensor
itself while a model is constructed: with tied embeddings and pipeline
parallelism, ``LanguageModule.setup_embeddings_and_output_layer`` moves the last
stage's embedding copy to CUDA before all-reducing it over the embedding group.

Nothing in the library imports this module; it patches torch and megatron and is
for tests only. The patches are process-wide while active (``unittest.mock``), so
do not run unrelated CUDA code in other threads meanwhile.
"""

from __future__ import annotations

import socket
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

__all__ = [
    "FAMILY_PRESETS",
    "PADDED_VOCAB",
    "VOCAB_SIZE",
    "TinyGPT",
    "build_tiny_gpt",
    "cpu_megatron",
    "cpu_megatron_build",
    "free_port",
    "hf_config",
    "hf_config_kwargs",
    "init_gloo",
    "megatron_logits",
    "pipeline_logits",
    "randomize_",
    "shutdown_gloo",
]

VOCAB_SIZE = 100
"""The true vocabulary of the tiny models (HF ``vocab_size``)."""
PADDED_VOCAB = 128
"""Megatron's padded vocabulary: a multiple of 128 x TP, as Megatron-LM pads it."""


@contextmanager
def cpu_megatron() -> Iterator[None]:
    """Redirect megatron-core's CUDA-only calls to the CPU for the block (see module doc)."""
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    @contextmanager
    def cpu_fork(self: Any, name: str = "model-parallel-rng") -> Iterator[None]:
        # The CPU generator stands in for the per-rank CUDA RNG stream.
        with torch.random.fork_rng(devices=[]):
            yield

    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    with ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda.current_device", lambda: torch.device("cpu")))
        stack.enter_context(mock.patch.object(mrandom.CudaRNGStatesTracker, "fork", cpu_fork))
        stack.enter_context(
            mock.patch(
                "megatron.core.fusions.fused_softmax.get_default_causal_mask", cpu_causal_mask
            )
        )
        stack.enter_context(mock.patch.object(moe_utils, "te_general_gemm", None, create=True))
        yield


@contextmanager
def cpu_megatron_build() -> Iterator[None]:
    """:func:`cpu_megatron` plus ``Tensor.cuda()`` returning the tensor itself, for construction."""

    def stay(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    with cpu_megatron(), mock.patch.object(torch.Tensor, "cuda", stay):
        yield


def free_port() -> int:
    """A TCP port that was free a moment ago (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_gloo(rank: int, world_size: int, port: int, *, tp: int = 1, pp: int = 1) -> None:
    """Join a gloo process group at 127.0.0.1:``port`` and initialize megatron's parallel state.

    The process group is created once per process and kept; megatron's parallel
    state is created on every call (undo it with ``parallel_state.destroy_model_parallel``
    before the next layout, or with :func:`shutdown_gloo`).
    """
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        # The loopback address explicitly: the host name may not resolve in containers.
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def shutdown_gloo() -> None:
    """Undo :func:`init_gloo`."""
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


_NO_WINDOW = (("sliding_window", None),)
_QWEN_NO_WINDOW = (*_NO_WINDOW, ("use_sliding_window", False))


@dataclass(frozen=True)
class TinyGPT:
    """Settings of a tiny GPT of one family, on both the Megatron and the HF side.

    2 layers, hidden 64, 4 heads in 2 query groups, dropout 0. ``head_dim`` other
    than 16 exercises ``kv_channels`` != hidden / heads. ``hf_extra`` are further
    keyword arguments of the family's transformers config.
    """

    family: str
    qkv_bias: bool = False
    qk_norm: bool = False
    head_dim: int = 16
    num_experts: int | None = None
    moe_ffn: int = 32
    hf_extra: tuple[tuple[str, Any], ...] = ()


FAMILY_PRESETS: dict[str, TinyGPT] = {
    "llama": TinyGPT("llama"),
    "mistral": TinyGPT("mistral", hf_extra=_NO_WINDOW),
    "qwen2": TinyGPT("qwen2", qkv_bias=True, hf_extra=_QWEN_NO_WINDOW),
    "qwen3": TinyGPT("qwen3", qk_norm=True, head_dim=32, hf_extra=_QWEN_NO_WINDOW),
    "qwen3_moe": TinyGPT(
        "qwen3_moe",
        qk_norm=True,
        head_dim=32,
        num_experts=4,
        hf_extra=(
            *_QWEN_NO_WINDOW,
            ("num_experts", 4),
            ("num_experts_per_tok", 2),
            ("moe_intermediate_size", 32),
            ("norm_topk_prob", True),
            ("decoder_sparse_step", 1),
            ("mlp_only_layers", []),
            ("router_aux_loss_coef", 0.0),
        ),
    ),
    "mixtral": TinyGPT(
        "mixtral",
        num_experts=4,
        moe_ffn=128,
        hf_extra=(
            *_NO_WINDOW,
            ("num_local_experts", 4),
            ("num_experts_per_tok", 2),
            ("router_jitter_noise", 0.0),
        ),
    ),
}
"""Megatron top-2 routing with ``moe_router_pre_softmax=False`` equals HF's softmax,
top-2 and renormalize (``norm_topk_prob=True``; Mixtral always renormalizes)."""

_HIDDEN, _FFN, _LAYERS, _HEADS, _GROUPS, _EPS, _THETA = 64, 128, 2, 4, 2, 1e-6, 10000.0


def build_tiny_gpt(family: str, *, tied: bool = False, seed: int = 0) -> Any:
    """A randomized tiny ``GPTModel`` of ``family`` for the current parallel state, on the CPU.

    Uses ``get_gpt_layer_local_spec()`` (no Transformer Engine), RMSNorm, SwiGLU,
    RoPE, ``use_cpu_initialization=True``, vocabulary padded to :data:`PADDED_VOCAB`,
    logits gathered across tensor-parallel ranks (``parallel_output=False``).
    Pre/post-processing follow the pipeline stage. The weights are then
    randomized by :func:`randomize_` so that every tensor matters to the logits.
    """
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    p = FAMILY_PRESETS[family]
    moe: dict[str, Any] = {}
    if p.num_experts is not None:
        moe = dict(
            num_moe_experts=p.num_experts,
            moe_router_topk=2,
            moe_ffn_hidden_size=p.moe_ffn,
            moe_router_pre_softmax=False,
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
            # The all-to-all dispatcher creates a CUDA stream in its constructor.
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
        )
    config = TransformerConfig(
        num_layers=_LAYERS,
        hidden_size=_HIDDEN,
        ffn_hidden_size=_FFN,
        num_attention_heads=_HEADS,
        num_query_groups=_GROUPS,
        kv_channels=p.head_dim,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=torch.float32,
        normalization="RMSNorm",
        layernorm_epsilon=_EPS,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=p.qkv_bias,
        qk_layernorm=p.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **moe,
    )
    spec = get_gpt_layer_local_spec(
        num_experts=p.num_experts,
        moe_grouped_gemm=False,
        qk_layernorm=p.qk_norm,
        normalization="RMSNorm",
    )
    torch.manual_seed(seed)
    with cpu_megatron_build():
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=PADDED_VOCAB,
            max_sequence_length=64,
            pre_process=ps.is_pipeline_first_stage(),
            post_process=ps.is_pipeline_last_stage(),
            parallel_output=False,
            share_embeddings_and_output_weights=tied,
            position_embedding_type="rope",
            rotary_base=int(_THETA),
        )
    randomize_(model, seed)
    if (
        tied
        and ps.get_pipeline_model_parallel_world_size() > 1
        and (model.pre_process or model.post_process)
    ):
        # As Megatron does at construction: zero the last stage's embedding copy and
        # all-reduce it with the first stage's, which randomize_ just changed.
        weight = model.shared_embedding_or_output_weight()
        if not model.pre_process:
            weight.data.zero_()
        dist.all_reduce(weight.data, group=ps.get_embedding_group())
    return model


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter values of order 1 that differ per tensor, in place.

    Norm weights become ``1 + noise`` and biases noise, so a swapped norm or a
    dropped bias changes the logits. A tensor-parallel shard draws from its own
    stream (rank-dependent); a replicated parameter draws the same values on
    every rank, as Megatron requires. Names are the stage-local names, which is
    fine: only tensor-parallel peers must agree.
    """
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            partitioned = bool(getattr(param, "tensor_model_parallel", False))
            key = (
                zlib.crc32(name.encode()) ^ (seed * 7919) ^ (tp_rank * 104729 if partitioned else 0)
            )
            gen = torch.Generator().manual_seed(key)
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.dim() == 1 and "bias" not in name:
                param.copy_(1.0 + 0.2 * noise)
            elif param.dim() == 1:
                param.copy_(0.2 * noise)
            else:
                # Scaled by 1/sqrt(fan_in) so that activations and logits stay of order 1.
                param.copy_(noise / param.shape[-1] ** 0.5)


def megatron_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, seq, padded_vocab]`` of a single-stage model (any TP), on the CPU."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    # Eval mode: megatron refuses MoE with TP > 1 and no sequence parallelism only in training.
    model.eval()
    with cpu_megatron(), torch.no_grad():
        logits: torch.Tensor = model(tokens, positions, None)
    return logits.detach()


def pipeline_logits(models: Sequence[Any], tokens: torch.Tensor) -> torch.Tensor | None:
    """Forward through a pipeline (any TP) by hand; logits on the last stage, else ``None``.

    ``models`` is this rank's model chunk list (one chunk without virtual
    pipelining). Activations ``[seq, batch, hidden]`` move between stages with
    ``send``/``recv`` over the pipeline group.
    """
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    rank, size = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    shape = (tokens.shape[1], tokens.shape[0], _HIDDEN)
    out: torch.Tensor | None = None
    with cpu_megatron(), torch.no_grad():
        for chunk in models:
            chunk.eval()
            if not chunk.pre_process:
                hidden = torch.empty(shape)
                dist.recv(hidden, group=group, group_src=(rank - 1) % size)
                chunk.set_input_tensor(hidden)
            out = chunk(tokens, positions, None)
            if not chunk.post_process:
                dist.send(out.contiguous(), group=group, group_dst=(rank + 1) % size)
                out = None
    return None if out is None else out.detach()


def hf_config_kwargs(family: str, *, tied: bool = False) -> dict[str, Any]:
    """Keyword arguments of the transformers config matching :func:`build_tiny_gpt`.

    For ``transformers.AutoConfig.for_model(family, **kwargs)``: the true
    vocabulary (no padding), no sliding window (Megatron attends to the whole
    causal context), and the family's :attr:`TinyGPT.hf_extra`.
    """
    p = FAMILY_PRESETS[family]
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=_HIDDEN,
        intermediate_size=_FFN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        num_key_value_heads=_GROUPS,
        head_dim=p.head_dim,
        rms_norm_eps=_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": _THETA},
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attention_dropout=0.0,
        **dict(p.hf_extra),
    )


def hf_config(family: str, *, tied: bool = False) -> Any:
    """The transformers config matching :func:`build_tiny_gpt` (see :func:`hf_config_kwargs`)."""
    import transformers

    return transformers.AutoConfig.for_model(family, **hf_config_kwargs(family, tied=tied))
