"""A reference rollout engine: a Hugging Face ``transformers`` causal LM in an async actor.

The model is built from a config (nothing is downloaded). ``generate`` runs
concurrently with weight updates: generations hold a shared lease on the weights,
a commit takes them exclusively (waiting for generations in flight, holding new
ones back), copies the staged tensors in, and switches the served version in the
same exclusive section (the lease is the receiver's: see
:meth:`~asyncsync.StagingReceiver.serving`). Every generation carries the
:class:`~asyncsync.protocol.Stamp` of the weights it ran on (version and identity),
and none ever runs on a mix of two versions. The model keeps no cache between
generations (``use_cache=False`` per call), so its ``on_commit`` has nothing to drop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._checks import check_int, check_str
from ..buckets import Bucket, BucketManifest, tensor_digest
from ..errors import ConfigError
from ..protocol import Stamp
from ..receiver import StagingReceiver
from .tensors import check_fits, check_update, copy_into, remote_options

__all__ = ["Generation", "HFEngine", "engine_actor"]


@dataclass(frozen=True)
class Generation:
    """Greedy continuations of the prompts, and the weights they ran on (:class:`Stamp`)."""

    stamp: Stamp
    tokens: list[list[int]]

    @property
    def version(self) -> int | None:
        """The version the generation ran on (``None``: initial weights, or none)."""
        return self.stamp.version


class HFEngine(StagingReceiver):
    """A transformers causal LM serving ``generate`` and receiving weight updates.

    Args:
        model_type: a transformers model type, e.g. ``"llama"``, ``"qwen2"``.
        config: keyword arguments of that model's config (sizes, vocab, ...).
        seed: seed of the initial (random) weights.
        num_threads: torch intra-op threads for this engine (``None``: torch's default).

    Raises :class:`~asyncsync.ConfigError` naming the argument for a model type
    transformers does not know, a config it cannot build, or an argument of the
    wrong type, before any global torch setting (threads, seed) is changed.
    """

    def __init__(
        self,
        model_type: str,
        config: dict[str, Any],
        *,
        seed: int = 0,
        num_threads: int | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        check_str(model_type, "HFEngine: model_type", ConfigError)
        if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
            raise ConfigError(
                f"HFEngine: config must be a dict of config keyword arguments, got {config!r:.80}"
            )
        check_int(seed, "HFEngine: seed", ConfigError, low=0, high=2**64 - 1)
        if num_threads is not None:
            check_int(num_threads, "HFEngine: num_threads", ConfigError, low=1, high=4096)
        try:
            model_config = AutoConfig.for_model(model_type, **config)
        except Exception as exc:  # transformers' own validation errors have no common base
            raise ConfigError(
                f"HFEngine: cannot make a config of model_type {model_type!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        super().__init__()
        # A config transformers accepts may still fail to build: put torch's global
        # settings back then, so a refused engine changes nothing.
        threads, rng = torch.get_num_threads(), torch.get_rng_state()
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        torch.manual_seed(seed)
        try:
            self.model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
                model_config
            )
        except Exception as exc:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)
            raise ConfigError(
                f"HFEngine: cannot build a {model_type!r} model from config {config!r:.200}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._vocab_size = int(getattr(model_config, "vocab_size", 0) or 0)
        self._max_positions = int(getattr(model_config, "max_position_embeddings", 0) or 0)
        self.model.eval()
        # Every tensor an update may write, by HF name (tied weights appear under both names).
        self._params: dict[str, torch.Tensor] = dict(self.model.state_dict())
        # Names that share one tensor (tied weights): an update must cover each group.
        groups: dict[tuple[int, int], list[str]] = {}
        for name, t in self._params.items():
            where = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
            groups.setdefault(where, []).append(name)
        self._param_groups = list(groups.values())
        self._generations = 0

    def check_manifest(self, manifest: Sequence[BucketManifest]) -> None:
        """Refuse tensors the model does not have or that do not fit, and partial updates.

        An update must write every parameter (one name of each tied group is
        enough): a partial one would serve a mix of two versions under one stamp.
        """
        check_fits(
            self._params,
            manifest,
            owner=f"this {type(self.model).__name__}",
            complete=self._param_groups,
        )

    async def apply(self, buckets: Sequence[Bucket], version: int) -> None:
        check_update(buckets, version, "HFEngine.apply")
        # The receiver holds the exclusive lease: no generation runs meanwhile.
        await asyncio.to_thread(self._copy_in, buckets)

    def _copy_in(self, buckets: Sequence[Bucket]) -> None:
        copy_into(self._params, buckets)

    async def generate(self, prompts: list[list[int]], max_new_tokens: int = 8) -> Generation:
        """Greedy-decode ``max_new_tokens`` after each prompt (prompts of equal length).

        Raises :class:`~asyncsync.ConfigError` naming the argument unless
        ``prompts`` is a non-empty list of equal-length, non-empty lists of token
        ids in the vocabulary and ``max_new_tokens`` an int >= 0 that keeps every
        sequence within the model's positions.
        """
        self._check_tokens(prompts, "generate: prompts")
        limit = self._max_positions - len(prompts[0]) if self._max_positions else None
        check_int(max_new_tokens, "generate: max_new_tokens", ConfigError, low=0, high=limit)
        async with self.serving() as stamp:
            tokens = await asyncio.to_thread(self._greedy, prompts, max_new_tokens)
        self._generations += 1
        return Generation(stamp, tokens)

    def _greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        ids = torch.tensor(prompts, dtype=torch.long)
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = self.model(input_ids=ids, use_cache=False).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return [row[len(prompts[0]) :] for row in ids.tolist()]

    async def logits(self, tokens: list[list[int]]) -> torch.Tensor:
        """Logits of the served weights on ``tokens`` (for checks against a trainer).

        ``tokens`` as :meth:`generate`'s ``prompts`` (else :class:`~asyncsync.ConfigError`).
        """
        self._check_tokens(tokens, "logits: tokens")
        async with self.serving():
            return await asyncio.to_thread(self._logits, tokens)

    def _check_tokens(self, rows: object, what: str) -> None:
        if not isinstance(rows, list) or not rows:
            raise ConfigError(f"{what} must be a non-empty list of token lists, got {rows!r:.80}")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or not row:
                raise ConfigError(f"{what}[{i}] must be a non-empty list of ints, got {row!r:.80}")
            for token in row:
                if isinstance(token, bool) or not isinstance(token, int):
                    raise ConfigError(f"{what}[{i}] holds {token!r}, not a token id (an int)")
                if token < 0 or (self._vocab_size and token >= self._vocab_size):
                    raise ConfigError(
                        f"{what}[{i}] holds token {token}, outside the vocabulary "
                        f"[0, {self._vocab_size})"
                    )
        lengths = sorted({len(row) for row in rows})
        if len(lengths) > 1:
            raise ConfigError(f"{what} must all have one length, got lengths {lengths}")
        if self._max_positions and lengths[0] > self._max_positions:
            raise ConfigError(
                f"{what} are {lengths[0]} tokens long, more than the model's "
                f"{self._max_positions} positions"
            )

    def _logits(self, tokens: list[list[int]]) -> torch.Tensor:
        with torch.no_grad():
            out: torch.Tensor = self.model(input_ids=torch.tensor(tokens), use_cache=False).logits
            return out

    async def state_digests(self) -> tuple[int | None, dict[str, int]]:
        """``(served version, {name: xxh3 of the parameter's bytes})``."""
        async with self.serving() as stamp:
            digests = await asyncio.to_thread(
                lambda: {name: tensor_digest(t) for name, t in self._params.items()}
            )
            return stamp.version, digests

    async def served_digests(self) -> tuple[Stamp, dict[str, int]]:
        """The stamp of the served weights and the xxh3 digest of each, read under one lease."""
        async with self.serving() as stamp:
            digests = await asyncio.to_thread(
                lambda: {name: tensor_digest(t) for name, t in self._params.items()}
            )
        return stamp, digests

    async def served_version(self) -> int | None:
        return self.version

    async def ping(self) -> None:
        return None


def engine_actor(*, max_concurrency: int = 16, **ray_options: Any) -> Any:
    """``ray.remote(HFEngine)`` with explicit concurrency (generations overlap updates).

    Raises :class:`~asyncsync.ConfigError` for a ``max_concurrency`` that is not an
    int >= 1, or Ray options Ray refuses (naming them).
    """
    import ray

    return remote_options(
        ray.remote(HFEngine), {"max_concurrency": max_concurrency, **ray_options}, "engine_actor"
    )
