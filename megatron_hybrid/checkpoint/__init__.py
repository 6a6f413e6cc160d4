"""Sharded checkpoints: base model, trainables only (LoRA + FFT + optimizer + RNG + step + data
position), atomic commit with a ``latest`` marker, resharding to any TP/PP/DP layout."""

from megatron_hybrid.checkpoint.commit import (
    CheckpointError,
    read_latest,
    resolve_checkpoint,
    verify_checkpoint,
)
from megatron_hybrid.checkpoint.config import CheckpointConfig
from megatron_hybrid.checkpoint.io import (
    TrainingState,
    current_layout,
    load_model,
    load_trainables,
    save_model,
    save_trainables,
)
from megatron_hybrid.checkpoint.metadata import CheckpointMeta, read_meta

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointMeta",
    "TrainingState",
    "current_layout",
    "load_model",
    "load_trainables",
    "read_latest",
    "read_meta",
    "resolve_checkpoint",
    "save_model",
    "save_trainables",
    "verify_checkpoint",
]
