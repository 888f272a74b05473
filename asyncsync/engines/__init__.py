"""Rollout engines that implement the receiver protocol (see :mod:`asyncsync.receiver`)."""

from __future__ import annotations

from .hf import Generation, HFEngine, engine_actor

__all__ = ["Generation", "HFEngine", "engine_actor"]
