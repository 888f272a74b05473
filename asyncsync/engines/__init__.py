"""Rollout engines that implement the receiver protocol (see :mod:`asyncsync.receiver`).

:class:`HFEngine` serves a Hugging Face causal LM; :class:`TensorEngine` holds plain
named tensors (a stand-in where the model does not matter). :func:`check_fits` and
:func:`copy_into` (:func:`copy_named`) are the parts of an engine with named
parameters that both share; :func:`write_changed` writes only a delta's changed words.
"""

from __future__ import annotations

from .hf import Generation, HFEngine, engine_actor
from .tensors import (
    TensorEngine,
    check_fits,
    copy_into,
    copy_named,
    copy_threads,
    tensor_engine_actor,
    write_changed,
)

__all__ = [
    "Generation",
    "HFEngine",
    "TensorEngine",
    "check_fits",
    "copy_into",
    "copy_named",
    "copy_threads",
    "engine_actor",
    "tensor_engine_actor",
    "write_changed",
]
