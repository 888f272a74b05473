"""The benchmark workload: Llama-shaped weights, a fixed training computation, a weight update.

Both designs run exactly this workload, so what they deliver to the engines can
be compared bit for bit: the weights are a deterministic function of
``(spec, seed, steps trained)``, whatever process computes them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from asyncsync.buckets import aligned, tensor_digest

__all__ = [
    "ModelSpec",
    "TensorSpec",
    "TrainCompute",
    "combined_digest",
    "format_bytes",
    "llama_spec",
    "materialize",
    "parse_size",
    "preallocate",
    "update_weights",
    "weight_digests",
]

_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
}


def parse_size(text: str) -> int:
    """``"256MiB"``, ``"1GiB"``, ``"512kib"``, ``"1e6"`` or ``"4096"`` -> bytes.

    Raises ``ValueError`` for anything else or a size that is not positive.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; use e.g. 256MiB, 1GiB, 4096")
    value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """Binary units, short: ``1.0 GiB``, ``256 MiB``, ``12 KiB``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            value = n / scale
            return (
                f"{value:.0f} {unit}"
                if value >= 10 or value.is_integer()
                else f"{value:.1f} {unit}"
            )
    return f"{n:.0f} B"


@dataclass(frozen=True)
class TensorSpec:
    """Name (Hugging Face Llama naming), shape and dtype of one weight."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style model: bf16 matrices, fp32 norms."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        """Payload bytes of all weights (without bucket alignment padding)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def largest_tensor_bytes(self) -> int:
        return max(aligned(t.nbytes) for t in self.tensors)

    def describe(self) -> str:
        return (
            f"Llama-style h={self.hidden} ffn={self.intermediate} layers={self.layers} "
            f"heads={self.heads}/{self.kv_heads} vocab={self.vocab}: {len(self.tensors)} tensors, "
            f"{format_bytes(self.nbytes)} (bf16 matrices, fp32 norms)"
        )


def _llama(hidden: int, layers: int) -> ModelSpec:
    intermediate = (int(hidden * 2.6875) + 63) // 64 * 64  # Llama-2's 11008 / 4096
    heads = max(1, hidden // 64)
    kv_heads = max(1, heads // 4)  # grouped-query attention
    head_dim = hidden // heads
    vocab = 32000 if hidden >= 512 else 16 * hidden
    bf16, fp32 = "bfloat16", "float32"
    tensors = [TensorSpec("model.embed_tokens.weight", (vocab, hidden), bf16)]
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors += [
            TensorSpec(f"{p}.input_layernorm.weight", (hidden,), fp32),
            TensorSpec(f"{p}.self_attn.q_proj.weight", (heads * head_dim, hidden), bf16),
            TensorSpec(f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden), bf16),
            TensorSpec(f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden), bf16),
            TensorSpec(f"{p}.self_attn.o_proj.weight", (hidden, heads * head_dim), bf16),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (hidden,), fp32),
            TensorSpec(f"{p}.mlp.gate_proj.weight", (intermediate, hidden), bf16),
            TensorSpec(f"{p}.mlp.up_proj.weight", (intermediate, hidden), bf16),
            TensorSpec(f"{p}.mlp.down_proj.weight", (hidden, intermediate), bf16),
        ]
    tensors += [
        TensorSpec("model.norm.weight", (hidden,), fp32),
        TensorSpec("lm_head.weight", (vocab, hidden), bf16),
    ]
    return ModelSpec(hidden, intermediate, layers, heads, kv_heads, vocab, tuple(tensors))


def llama_spec(target_bytes: int) -> ModelSpec:
    """The Llama-style model closest to ``target_bytes`` with realistic proportions.

    Chooses the widest hidden size (a power of two from 64) whose untied
    embedding and LM head take at most a third of the target and whose layers
    are at most an eighth of it, then as many layers as fill the target (at least
    one). 256 MiB gives h=512 x 36 layers, 1 GiB gives h=2048 x 9 layers.
    """
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}")
    hidden = 64
    while True:
        wider = _llama(hidden * 2, 1)
        embed = 2 * wider.tensors[0].nbytes
        layer = sum(t.nbytes for t in wider.tensors if t.name.startswith("model.layers.0."))
        if embed > target_bytes / 3 or layer > target_bytes / 8:
            break
        hidden *= 2
    one = _llama(hidden, 1)
    layer = sum(t.nbytes for t in one.tensors if t.name.startswith("model.layers.0."))
    rest = one.nbytes - layer
    return _llama(hidden, max(1, round((target_bytes - rest) / layer)))


def materialize(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random-looking weights for ``spec`` (same on every process).

    Filled from one 4 MiB normal(0, 0.02) pattern, rotated per tensor, at memory
    speed: generating 1 GiB of random numbers would take seconds per actor.
    """
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.empty(1 << 20, dtype=torch.float32).normal_(0.0, 0.02, generator=gen)
    weights: dict[str, torch.Tensor] = {}
    for i, ts in enumerate(spec.tensors):
        tensor = torch.empty(ts.shape, dtype=ts.torch_dtype)
        flat = tensor.view(-1)
        source = torch.roll(pattern, shifts=i * 7919)
        if len(ts.shape) == 1:
            source = source + 1.0  # norm weights sit around one
        for start in range(0, flat.numel(), source.numel()):
            n = min(source.numel(), flat.numel() - start)
            flat[start : start + n].copy_(source[:n])
        weights[ts.name] = tensor
    return weights


def update_weights(weights: dict[str, torch.Tensor], step: int) -> None:
    """The optimizer update of ``step``: changes values spread over every tensor.

    Deterministic and cheap (a few thousand elements per tensor, strided across
    the whole tensor so every region of every bucket changes).
    """
    with torch.no_grad():
        for i, tensor in enumerate(weights.values()):
            flat = tensor.view(-1)
            stride = max(1, flat.numel() // 4096)
            flat[::stride].add_((step + 1) * 1e-3 + i * 1e-6)


class TrainCompute:
    """A fixed amount of real CPU training compute: ``gflop`` of fp32 matmuls.

    ``run()`` is blocking (call it in a worker thread of an async actor) and uses
    the process's torch threads.
    """

    N = 512

    def __init__(self, gflop: float, seed: int = 0) -> None:
        if gflop < 0:
            raise ValueError(f"gflop must be >= 0, got {gflop}")
        gen = torch.Generator().manual_seed(seed + 1)
        self.a = torch.randn(self.N, self.N, generator=gen) / self.N**0.5
        self.b = torch.randn(self.N, self.N, generator=gen) / self.N**0.5
        self.matmuls = math.ceil(gflop * 1e9 / (2 * self.N**3))

    def run(self) -> float:
        x = self.a
        for _ in range(self.matmuls):
            x = torch.tanh(x @ self.b)
        return float(x[0, 0])


def preallocate(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Engine weights before the first sync: zeros, every page touched."""
    return {ts.name: torch.empty(ts.shape, dtype=ts.torch_dtype).zero_() for ts in spec.tensors}


def weight_digests(weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{name: xxh3 of the tensor's bytes}`` (blocking)."""
    return {name: tensor_digest(t) for name, t in weights.items()}


def combined_digest(digests: dict[str, int]) -> str:
    """One hex digest for a whole ``{name: digest}`` mapping (order-independent)."""
    import xxhash

    text = ";".join(f"{name}={digests[name]:016x}" for name in sorted(digests))
    return f"{xxhash.xxh3_64_intdigest(text.encode()):016x}"
