"""The smallest real engine: named plain tensors that an update copies into.

:class:`TensorEngine` holds its weights as a mapping of name -> tensor and does
what every engine with named parameters does, nothing more: at ``begin`` it
refuses a manifest its parameters cannot take (:func:`check_fits`), and at commit
it copies the staged buckets into them (:func:`copy_into`), one copy of the model.
It stands in for a rollout engine wherever the model itself does not matter
(tests, benchmarks, many engines on one machine). The two functions are the
pieces a real engine reuses; :class:`~asyncsync.engines.HFEngine` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..buckets import Bucket, BucketManifest, dtype_name
from ..errors import ManifestMismatchError
from ..receiver import StagingReceiver

__all__ = ["TensorEngine", "check_fits", "copy_into", "copy_named", "tensor_engine_actor"]


def check_fits(
    params: Mapping[str, torch.Tensor],
    manifest: Sequence[BucketManifest],
    *,
    owner: str = "this engine",
    complete: Iterable[Sequence[str]] | None = None,
) -> None:
    """Raise :class:`~asyncsync.ManifestMismatchError` unless ``params`` can take ``manifest``.

    Every tensor of the manifest must name a parameter with the same shape and
    dtype. ``complete``: groups of names (tied weights share one tensor under
    several names) of which the update must write at least one each; ``None``
    accepts partial updates. ``owner`` names the model in the messages.
    """
    for bucket in manifest:
        for meta in bucket.index:
            param = params.get(meta.name)
            if param is None:
                raise ManifestMismatchError(f"tensor {meta.name!r} is not a parameter of {owner}")
            if tuple(param.shape) != meta.shape or dtype_name(param.dtype) != meta.dtype:
                raise ManifestMismatchError(
                    f"tensor {meta.name!r}: {meta.dtype}{list(meta.shape)} does not fit the "
                    f"model's {dtype_name(param.dtype)}{list(param.shape)}"
                )
    if complete is None:
        return
    groups = list(complete)
    sent = {name for bucket in manifest for name in bucket.names}
    missing = [g[0] for g in groups if sent.isdisjoint(g)]
    if missing:
        raise ManifestMismatchError(
            f"the update leaves {len(missing)} of {len(groups)} parameters of {owner} "
            f"unwritten, e.g. {missing[:3]}"
        )


def copy_named(
    params: Mapping[str, torch.Tensor], named: Iterable[tuple[str, torch.Tensor]]
) -> int:
    """Copy each ``(name, tensor)`` into the parameter of that name; return the bytes copied.

    Blocking (run it in a worker thread: torch releases the GIL while copying).
    Raises ``KeyError`` naming a tensor the parameters do not have (check names
    first with :func:`check_fits`; the parameters before it were already written).
    """
    copied = 0
    with torch.no_grad():
        for name, tensor in named:
            try:
                dst = params[name]
            except KeyError:
                raise KeyError(f"no parameter named {name!r}") from None
            dst.copy_(tensor)
            copied += tensor.numel() * tensor.element_size()
    return copied


def copy_into(params: Mapping[str, torch.Tensor], buckets: Iterable[Bucket]) -> int:
    """:func:`copy_named` of every tensor of ``buckets`` (zero-copy views of their payloads)."""
    return sum(copy_named(params, bucket.named_tensors()) for bucket in buckets)


class TensorEngine(StagingReceiver):
    """An engine whose weights are ``params`` (name -> tensor), updated in place at commit.

    Args:
        params: the weights; the engine owns them from now on. Every update must
            write all of them (a partial one would serve a mix of two versions).

    Readers of :attr:`params` see a commit's copy in progress; an engine that
    serves requests while it updates guards them as :class:`~asyncsync.engines.HFEngine`
    does.
    """

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.params: dict[str, torch.Tensor] = dict(params)

    def check_manifest(self, manifest: Sequence[BucketManifest]) -> None:
        check_fits(self.params, manifest, complete=[(name,) for name in self.params])

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        await asyncio.to_thread(copy_into, self.params, buckets)


def tensor_engine_actor(cls: type[TensorEngine] = TensorEngine, **ray_options: Any) -> Any:
    """``ray.remote(cls)`` as an async actor (``max_concurrency=16`` unless given)."""
    import ray

    ray_options.setdefault("max_concurrency", 16)
    return ray.remote(cls).options(**ray_options)
