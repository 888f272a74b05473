"""The smallest real engine: named plain tensors that an update copies into.

:class:`TensorEngine` holds its weights as a mapping of name -> tensor and does
what every engine with named parameters does, nothing more: at ``begin`` it
refuses a manifest its parameters cannot take (:func:`check_fits`), and at commit
it copies the staged buckets into them (:func:`copy_into`), one copy of the model;
a delta session's commit writes only the words that changed (:func:`write_changed`).
It stands in for a rollout engine wherever the model itself does not matter
(tests, benchmarks, many engines on one machine). The two functions are the
pieces a real engine reuses; :class:`~asyncsync.engines.HFEngine` does.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from .._checks import check_int, check_iterable, check_str, check_type
from ..buckets import Bucket, BucketManifest, dtype_name, tensor_digest
from ..errors import ConfigError, InvalidStepError, ProtocolError
from ..protocol import Stamp
from ..receiver import StagingReceiver

__all__ = [
    "TensorEngine",
    "check_fits",
    "copy_into",
    "copy_named",
    "copy_threads",
    "write_changed",
    "tensor_engine_actor",
]


def check_fits(
    params: Mapping[str, torch.Tensor],
    manifest: Sequence[BucketManifest],
    *,
    owner: str = "this engine",
    complete: Iterable[Sequence[str]] | None = None,
) -> None:
    """Raise :class:`~asyncsync.ProtocolError` unless ``params`` can take ``manifest``.

    Every tensor of the manifest must name a parameter with the same shape and
    dtype. ``complete``: groups of names (tied weights share one tensor under
    several names) of which the update must write at least one each; ``None``
    accepts partial updates. ``owner`` names the model in the messages. Arguments
    of the wrong type raise :class:`~asyncsync.ConfigError` (``params``, ``owner``,
    ``complete``) or :class:`~asyncsync.ProtocolError` (``manifest``).
    """
    check_params(params, "check_fits: params")
    check_str(owner, "check_fits: owner", ConfigError)
    check_manifest_type(manifest, "check_fits")
    if complete is not None:
        check_iterable(complete, "check_fits: complete", ConfigError)
        complete = list(complete)
        bad = [g for g in complete if isinstance(g, str) or not isinstance(g, Sequence)]
        if bad:
            raise ConfigError(
                f"check_fits: complete must hold sequences of names, got {bad[0]!r:.80}"
            )
    for bucket in manifest:
        for meta in bucket.index:
            param = params.get(meta.name)
            if param is None:
                raise ProtocolError(f"tensor {meta.name!r} is not a parameter of {owner}")
            if tuple(param.shape) != meta.shape or dtype_name(param.dtype) != meta.dtype:
                raise ProtocolError(
                    f"tensor {meta.name!r}: {meta.dtype}{list(meta.shape)} does not fit the "
                    f"model's {dtype_name(param.dtype)}{list(param.shape)}"
                )
    if complete is None:
        return
    groups = list(complete)
    sent = {name for bucket in manifest for name in bucket.names}
    missing = [g[0] for g in groups if sent.isdisjoint(g)]
    if missing:
        raise ProtocolError(
            f"the update leaves {len(missing)} of {len(groups)} parameters of {owner} "
            f"unwritten, e.g. {missing[:3]}"
        )


def check_params(params: object, what: str) -> None:
    """Raise :class:`~asyncsync.ConfigError` unless ``params`` maps names to tensors."""
    if not isinstance(params, Mapping):
        raise ConfigError(
            f"{what} must be a mapping of name -> torch.Tensor, got {type(params).__name__}: "
            f"{params!r:.80}"
        )
    for name, tensor in params.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{what}: names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"{what}: {name!r} is a {type(tensor).__name__}, not a torch.Tensor")


def check_manifest_type(manifest: object, what: str) -> None:
    """Raise :class:`~asyncsync.ProtocolError` unless ``manifest`` is a sequence of
    :class:`~asyncsync.BucketManifest`."""
    if isinstance(manifest, str | bytes) or not isinstance(manifest, Sequence):
        raise ProtocolError(
            f"{what}: manifest must be a sequence of BucketManifest, got "
            f"{type(manifest).__name__}: {manifest!r:.80}"
        )
    for i, bucket in enumerate(manifest):
        if not isinstance(bucket, BucketManifest):
            raise ProtocolError(
                f"{what}: manifest entry {i} is a {type(bucket).__name__}, not a BucketManifest"
            )


def check_update(buckets: object, version: object, what: str) -> None:
    """Raise a typed error unless ``buckets`` is a sequence of :class:`~asyncsync.Bucket` and
    ``version`` a step (an int >= -1): the arguments of an engine's ``apply``."""
    if isinstance(buckets, str | bytes) or not isinstance(buckets, Sequence):
        raise ProtocolError(
            f"{what}: buckets must be a sequence of Bucket, got {type(buckets).__name__}: "
            f"{buckets!r:.80}"
        )
    for i, bucket in enumerate(buckets):
        check_type(bucket, Bucket, f"{what}: bucket {i}", ProtocolError)
    check_int(version, f"{what}: version", InvalidStepError, low=-1)


_PARALLEL_MIN_BYTES = 8 << 20
"""Below this many bytes a copy runs in one thread (starting threads costs more)."""

_MAX_THREADS = 1024
"""Most threads a copy may be split over (a copy is bound by memory bandwidth long before)."""


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

    Every pair is checked first: a name the parameters do not have, a value that
    is not a tensor, or a shape or dtype other than its parameter's raises
    :class:`~asyncsync.ProtocolError` naming the tensor before anything is
    written (check names before any bucket moves with :func:`check_fits`).
    ``threads`` (an int >= 1, else :class:`~asyncsync.ConfigError`) > 1 splits the bytes into
    that many equal shares (cutting large tensors between rows of their flat
    view) copied at once; torch releases the GIL while copying. Blocking: run it
    in a worker thread.
    """
    check_params(params, "copy_named: params")
    check_iterable(named, "copy_named: named", ProtocolError)
    check_int(threads, "copy_named: threads", ConfigError, low=1, high=_MAX_THREADS)
    pairs = []
    for item in named:
        if not isinstance(item, tuple) or len(item) != 2:
            raise ProtocolError(f"copy_named: expected (name, tensor) pairs, got {item!r:.80}")
        name, tensor = item
        dst = params.get(name) if isinstance(name, str) else None
        if dst is None:
            raise ProtocolError(f"copy_named: no parameter named {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ProtocolError(
                f"copy_named: {name!r} is a {type(tensor).__name__}, not a torch.Tensor"
            )
        if tensor.shape != dst.shape or tensor.dtype != dst.dtype:
            raise ProtocolError(
                f"copy_named: tensor {name!r}: {dtype_name(tensor.dtype)}{list(tensor.shape)} "
                f"does not fit the parameter's {dtype_name(dst.dtype)}{list(dst.shape)}"
            )
        pairs.append((dst, tensor))
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

    ``threads``: how many copy at once (``None``: :func:`copy_threads`). Raises
    :class:`~asyncsync.ProtocolError` for an item of ``buckets`` that is not
    a :class:`~asyncsync.Bucket`, and what :func:`copy_named` raises.
    """
    check_iterable(buckets, "copy_into: buckets", ProtocolError)
    buckets = list(buckets)
    for i, bucket in enumerate(buckets):
        check_type(bucket, Bucket, f"copy_into: bucket {i}", ProtocolError)
    if threads is not None:
        check_int(threads, "copy_into: threads", ConfigError, low=1, high=_MAX_THREADS)
    named = [pair for bucket in buckets for pair in bucket.named_tensors()]
    return copy_named(params, named, threads=copy_threads() if threads is None else threads)


SCATTER_BELOW_INVERSE = 128
"""A tensor takes single changed words when fewer than 1 in this many of its words
changed, else a whole copy: on two cores, writing 0.2% of a 256 MiB model's words
one by one took 17-21 ms against 32 ms for the copy, 0.5% about the same, 1.4%
40-43 ms (measured, see the Delta sync guide)."""
_WORD_DTYPES = frozenset({2, 4, 8})
"""Element sizes whose tensors take single 2-byte words (all but 1-byte dtypes)."""


def write_changed(
    params: Mapping[str, torch.Tensor],
    buckets: Sequence[Bucket],
    changes: Sequence[np.ndarray | None],
    *,
    threads: int | None = None,
) -> int:
    """Write into ``params`` only the 2-byte words of ``buckets`` listed in ``changes``.

    ``changes[i]``: ascending word indices of bucket ``i`` (``None``: the whole
    bucket, as :func:`copy_into`). A tensor with any changed word is copied whole
    when that is faster (1 word in :data:`SCATTER_BELOW_INVERSE` or more changed)
    or it cannot take single words (not contiguous, a 1-byte dtype, at an odd
    offset); an unchanged tensor is not touched. Only right when ``params`` hold
    the version the changes are relative to (see
    :meth:`~asyncsync.StagingReceiver.apply_changes`). Returns
    the words written (whole tensors count all theirs). Blocking; buckets split
    over ``threads`` threads (``None``: :func:`copy_threads`).
    """
    from ..delta import run_split

    check_params(params, "write_changed: params")
    check_update(buckets, 0, "write_changed")
    if isinstance(changes, str | bytes) or not isinstance(changes, Sequence):
        raise ProtocolError(
            f"write_changed: changes must be a sequence, got {type(changes).__name__}: "
            f"{changes!r:.80}"
        )
    if len(buckets) != len(changes):
        raise ProtocolError(
            f"write_changed: {len(changes)} change lists for {len(buckets)} buckets"
        )
    for i, changed in enumerate(changes):
        if changed is not None and not (
            isinstance(changed, np.ndarray) and changed.ndim == 1 and changed.dtype.kind in "iu"
        ):
            raise ProtocolError(
                f"write_changed: changes[{i}] must be None or a 1-D integer array, got "
                f"{type(changed).__name__}: {changed!r:.80}"
            )
    if threads is not None:
        check_int(threads, "write_changed: threads", ConfigError, low=1, high=_MAX_THREADS)

    def one(bucket: Bucket, changed: np.ndarray | None) -> int:
        if changed is None:
            return copy_named(params, bucket.named_tensors(), threads=1) // 2
        words = bucket.buffer.view(np.uint16) if bucket.buffer.nbytes % 2 == 0 else None
        written = 0
        # Every tensor's first and last word, found at once (in the indices' own dtype:
        # a search with other ints would convert the whole array, per call).
        edges = np.array(
            [(m.offset // 2, (m.offset + m.nbytes + 1) // 2) for m in bucket.index],
            dtype=changed.dtype,
        ).reshape(-1, 2)
        cuts = np.searchsorted(changed, edges)
        with torch.no_grad():
            for meta, (name, src), (lo, hi), (a, b) in zip(
                bucket.index, bucket.named_tensors(), edges.tolist(), cuts.tolist(), strict=True
            ):
                if meta.nbytes == 0 or a == b:
                    continue
                dst = params.get(name)
                if dst is None:
                    raise ProtocolError(f"tensor {name!r} is not a parameter of this engine")
                if words is not None and (
                    (b - a) * SCATTER_BELOW_INVERSE < hi - lo
                    and meta.offset % 2 == 0
                    and meta.nbytes % 2 == 0
                    and dst.is_contiguous()
                    and dst.element_size() in _WORD_DTYPES
                    and dst.dtype == src.dtype
                    and dst.shape == src.shape
                ):
                    index = changed[a:b]
                    target = dst.detach().view(-1).view(torch.int16).numpy()
                    target[index - lo] = words[index].view(np.int16)
                    written += b - a
                else:
                    dst.copy_(src)
                    written += hi - lo
        return written

    jobs = [
        functools.partial(one, bucket, changed)
        for bucket, changed in zip(buckets, changes, strict=True)
    ]
    return sum(run_split(jobs, copy_threads() if threads is None else threads))


class TensorEngine(StagingReceiver):
    """An engine whose weights are ``params`` (name -> tensor), updated in place at commit.

    Args:
        params: the weights (at least one), name -> dense tensor; the engine owns
            them from now on. Every update must write all of them (a partial one
            would serve a mix of two versions). Anything else raises
            :class:`~asyncsync.ConfigError`.

    Read :attr:`params` inside ``async with self.serving() as stamp:`` (see
    :class:`~asyncsync.StagingReceiver`): a commit's copy never runs meanwhile,
    and ``stamp`` names the weights read. :meth:`served_digests` does so.
    """

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        check_params(params, "TensorEngine: params")
        if not params:
            raise ConfigError("TensorEngine: params must name at least one tensor, got {}")
        for name, tensor in params.items():
            if tensor.layout != torch.strided or tensor.is_meta or tensor.is_quantized:
                raise ConfigError(
                    f"TensorEngine: params {name!r} must be a dense tensor with data, got "
                    f"{'a meta' if tensor.is_meta else tensor.layout} tensor"
                )
        super().__init__()
        self.params: dict[str, torch.Tensor] = dict(params)

    def check_manifest(self, manifest: Sequence[BucketManifest]) -> None:
        check_fits(self.params, manifest, complete=[(name,) for name in self.params])

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        check_update(buckets, version, "TensorEngine.apply")
        await asyncio.to_thread(copy_into, self.params, buckets)

    async def apply_changes(
        self,
        buckets: Sequence[Bucket],
        changes: Sequence[np.ndarray | None],
        version: int,
    ) -> None:
        """Write only the changed words of a delta session (:func:`write_changed`).

        A subclass that overrides :meth:`apply` (and not this) gets its ``apply``
        with the whole buckets instead: what it adds there is never skipped.
        """
        if type(self).apply is not TensorEngine.apply:
            await self.apply(buckets, version)
            return
        check_update(buckets, version, "TensorEngine.apply_changes")
        await asyncio.to_thread(write_changed, self.params, buckets, changes)

    async def served_digests(self) -> tuple[Stamp, dict[str, int]]:
        """The stamp of the served weights and the xxh3 digest of each, read under one lease."""
        async with self.serving() as stamp:
            digests = await asyncio.to_thread(
                lambda: {name: tensor_digest(t) for name, t in self.params.items()}
            )
        return stamp, digests


def tensor_engine_actor(cls: type[TensorEngine] = TensorEngine, **ray_options: Any) -> Any:
    """``ray.remote(cls)`` as an async actor (``max_concurrency=16`` unless given).

    Raises :class:`~asyncsync.ConfigError` for a ``cls`` that is not a
    :class:`TensorEngine` class, or Ray options Ray refuses (naming them).
    """
    import ray

    if not isinstance(cls, type) or not issubclass(cls, TensorEngine):
        raise ConfigError(f"tensor_engine_actor: cls must be a TensorEngine class, got {cls!r}")

    ray_options.setdefault("max_concurrency", 16)
    return remote_options(ray.remote(cls), ray_options, "tensor_engine_actor")


def remote_options(actor_class: Any, ray_options: dict[str, Any], what: str) -> Any:
    """``actor_class.options(**ray_options)``, Ray's refusal raised as ConfigError naming them."""
    max_concurrency = ray_options.get("max_concurrency")
    check_int(max_concurrency, f"{what}: max_concurrency", ConfigError, low=1)
    try:
        return actor_class.options(**ray_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: Ray refuses the options {ray_options!r}: {exc}") from None
