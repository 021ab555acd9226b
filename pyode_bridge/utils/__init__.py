"""Utilities for training loops: atomic, resumable checkpoints (:mod:`pyode_bridge.utils.checkpoint`).

>>> from pyode_bridge.utils import atomic_save, load_checkpoint, ResumableBatchSampler
"""
from .checkpoint import (
    CheckpointError,
    ResumableBatchSampler,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    remove_stale_temp_files,
    restore_rng_state,
)

__all__ = ["atomic_save", "load_checkpoint", "CheckpointError", "remove_stale_temp_files", "capture_rng_state",
           "restore_rng_state", "ResumableBatchSampler"]
