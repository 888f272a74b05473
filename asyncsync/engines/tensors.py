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
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..buckets import Bucket, BucketManifest, dtype_name
from ..errors import ManifestMismatchError
from ..receiver import StagingReceiver

__all__ = [
    "TensorEngine",
    "check_fits",
    "copy_into",
    "copy_named",
    "copy_threads",
    "tensor_engine_actor",
]


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


_PARALLEL_MIN_BYTES = 8 << 20
"""Below this many bytes a copy runs in one thread (starting threads costs more)."""


def copy_threads() -> int:
    """Default threads of :func:`copy_into`: this process's cores, at most 4.

    A copy into memory is bound by memory bandwidth, which a few cores saturate.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def copy_named(
    params: Mapping[str, torch.Tensor],
    named: Iterable[tuple[str, torch.Tensor]],
    *,
    threads: int = 1,
) -> int:
    """Copy each ``(name, tensor)`` into the parameter of that name; return the bytes copied.

    Every name is looked up first: a ``KeyError`` naming a tensor the parameters
    do not have is raised before anything is written (check names before any
    bucket moves with :func:`check_fits`). ``threads`` > 1 splits the bytes into
    that many equal shares (cutting large tensors between rows of their flat
    view) copied at once; torch releases the GIL while copying. Blocking: run it
    in a worker thread.
    """
    pairs = []
    for name, tensor in named:
        try:
            pairs.append((params[name], tensor))
        except KeyError:
            raise KeyError(f"no parameter named {name!r}") from None
    total = sum(src.numel() * src.element_size() for _, src in pairs)
    with torch.no_grad():
        if threads <= 1 or total < _PARALLEL_MIN_BYTES:
            for dst, src in pairs:
                dst.copy_(src)
            return total
        shares = _shares(pairs, total, threads)
        if len(shares) == 1:
            _copy_share(shares[0])
            return total
        with ThreadPoolExecutor(len(shares) - 1) as pool:
            rest = [pool.submit(_copy_share, share) for share in shares[1:]]
            _copy_share(shares[0])
            for future in rest:
                future.result()
    return total


def _shares(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], total: int, threads: int
) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``pairs`` cut into ``threads`` runs of about ``total / threads`` bytes each."""
    target = -(-total // threads)
    shares: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[]]
    room = target
    for dst, src in pairs:
        size = src.element_size()
        divisible = (
            dst.is_contiguous()
            and src.is_contiguous()
            and dst.dtype == src.dtype
            and dst.shape == src.shape
        )
        if divisible:
            d, s, start, n = dst.view(-1), src.view(-1), 0, src.numel()
            while start < n:
                if room < size and len(shares) < threads:
                    shares.append([])
                    room = target
                last = len(shares) == threads  # the last share takes whatever is left
                take = n - start if last else min(n - start, max(1, room // size))
                shares[-1].append((d[start : start + take], s[start : start + take]))
                start += take
                room -= take * size
        else:
            if room <= 0 and len(shares) < threads:
                shares.append([])
                room = target
            shares[-1].append((dst, src))
            room -= src.numel() * size
    return [share for share in shares if share]


def _copy_share(share: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for dst, src in share:
            dst.copy_(src)


def copy_into(
    params: Mapping[str, torch.Tensor], buckets: Iterable[Bucket], *, threads: int | None = None
) -> int:
    """:func:`copy_named` of every tensor of ``buckets`` (zero-copy views of their payloads).

    ``threads``: how many copy at once (``None``: :func:`copy_threads`).
    """
    named = [pair for bucket in buckets for pair in bucket.named_tensors()]
    return copy_named(params, named, threads=copy_threads() if threads is None else threads)


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
