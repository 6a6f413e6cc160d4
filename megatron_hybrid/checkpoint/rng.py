"""Random-number-generator states of one rank, saved per (pipeline, tensor, data)-parallel rank.

Each rank's generators differ (Megatron's model-parallel RNG stream is seeded per TP rank), so the
states are a ``ShardedObject`` with one entry per rank, not a common value. They are restored only
when the loading layout equals the saving layout; at another layout there is no meaningful mapping
from old ranks to new ones (a resumed run then draws fresh dropout masks, and is still exact when
dropout is off).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

__all__ = ["RNG_KEY", "capture_rng_state", "restore_rng_state", "rng_sharded_object"]

RNG_KEY = "rng_state"


def capture_rng_state() -> dict:
    """This process's generator states: torch (CPU and CUDA), Megatron's tracker, Python, NumPy."""
    state = {
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_sharded_object(state: dict | None = None) -> ShardedObject:
    """The ``ShardedObject`` of this rank's states (``state=None``: a placeholder for loading).

    Global shape ``(pp, tp, dp)``; this rank's entry is at its (pp, tp, dp) rank.
    """
    ps = parallel_state
    shape = (
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )
    offset = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    return ShardedObject(RNG_KEY, state, shape, offset, replica_id=0)
