"""Utilities for training loops: atomic, resumable checkpoints (:mod:`pyode_bridge.utils.checkpoint`).

>>> from pyode_bridge.utils import atomic_save, load_checkpoint, ResumableBatchSampler
"""
from .checkpoint import (
    ResumableBatchSampler,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)

__all__ = ["atomic_save", "load_checkpoint", "capture_rng_state", "restore_rng_state",
           "ResumableBatchSampler"]
