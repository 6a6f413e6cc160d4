"""Initialise ``torch.distributed`` and Megatron's ``parallel_state`` for one process.

Works under ``torchrun`` (reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and as a plain single process (a one-rank gloo group on a free local port).
Backend: with CUDA, NCCL for CUDA tensors and gloo for CPU tensors (``cpu:gloo,cuda:nccl``: the
small bookkeeping collectives, such as token counts, metrics and sampled token ids, run on CPU
tensors); ``gloo`` without CUDA, where the compatibility patches of
:mod:`megatron_hybrid.runtime.cpu_compat` are applied first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from megatron_hybrid.config import check_int
from megatron_hybrid.runtime.cpu_compat import apply_cpu_compat_patches

__all__ = [
    "LAUNCHER_ENV_VARS",
    "ParallelConfig",
    "destroy_runtime",
    "device",
    "initialize_runtime",
    "on_rank0",
    "without_launcher_env",
]

#: Variables ``torchrun`` sets for each rank (a one-rank runtime sets them for itself too). A
#: process that starts a runtime of its own (a demo worker, a test's child) must not inherit them.
LAUNCHER_ENV_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def without_launcher_env(env) -> dict[str, str]:
    """A copy of ``env`` (a mapping of environment variables) without :data:`LAUNCHER_ENV_VARS`."""
    return {k: v for k, v in env.items() if k not in LAUNCHER_ENV_VARS}


@dataclass
class ParallelConfig:
    """Model-parallel layout. The data-parallel size is derived: world / (tp * pp)."""

    tensor_model_parallel_size: int = 1
    """TP degree: column/row-parallel linears shard their weights over this many ranks."""
    pipeline_model_parallel_size: int = 1
    """PP degree: the decoder layers are split into this many stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage (interleaved schedule); None disables interleaving."""
    data_parallel_size: int | None = None
    """Expected DP degree; None derives it (world / (tp x pp)); set it to have a wrong launch fail."""
    sequence_parallel: bool = False
    """Shard activations outside the TP regions along the sequence (needs TP > 1)."""
    backend: str | None = None
    """``nccl`` or ``gloo``; None picks nccl with CUDA, gloo without. ``nccl`` also brings up gloo
    for CPU tensors (``cpu:gloo,cuda:nccl``; see :func:`process_group_backend`)."""
    timeout_minutes: int = 30
    """Collective timeout."""

    def __post_init__(self) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            check_int(f"parallel.{key}", getattr(self, key))
        check_int("parallel.data_parallel_size", self.data_parallel_size, optional=True)
        vpp = self.virtual_pipeline_model_parallel_size
        check_int("parallel.virtual_pipeline_model_parallel_size", vpp, optional=True)
        if vpp is not None:
            if self.pipeline_model_parallel_size < 2 and vpp > 1:
                raise ValueError(
                    "parallel.virtual_pipeline_model_parallel_size > 1 needs "
                    "pipeline_model_parallel_size >= 2"
                )
        if self.sequence_parallel and self.tensor_model_parallel_size < 2:
            raise ValueError("parallel.sequence_parallel needs tensor_model_parallel_size >= 2")
        if self.backend not in (None, "nccl", "gloo"):
            raise ValueError(
                f"parallel.backend must be 'nccl', 'gloo' or null, got {self.backend!r}"
            )


def process_group_backend(requested: str | None, cuda: bool) -> str:
    """The ``torch.distributed`` backend string for ``parallel.backend``.

    NCCL handles only CUDA tensors, and several collectives here reduce small CPU tensors
    (counts, metrics, sampled token ids), so NCCL always comes with gloo for CPU tensors, as in
    verl. Megatron's groups inherit the pair (they are created with ``backend=None``).
    """
    name = requested or ("nccl" if cuda else "gloo")
    if name == "nccl":
        if not cuda:
            raise ValueError("parallel.backend=nccl needs CUDA; use gloo (or null) on CPU")
        return "cpu:gloo,cuda:nccl"
    return name


def device() -> torch.device:
    """The device this rank computes on (its local GPU, or the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize_runtime(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Bring up the process group and Megatron's model-parallel groups, then seed RNGs.

    Idempotent for the process group; (re)creates Megatron's groups every call, so call
    :func:`destroy_runtime` between layouts in one process.
    """
    from megatron.core import parallel_state, tensor_parallel

    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_compat_patches()
    if not dist.is_initialized():
        backend = process_group_backend(parallel.backend, cuda)
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(minutes=parallel.timeout_minutes)
        if "RANK" in os.environ:  # torchrun
            dist.init_process_group(backend, timeout=timeout)
        else:
            # One process: an in-memory store, and no RANK/MASTER_* written to os.environ (child
            # processes would inherit them and collide on the port).
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    world = dist.get_world_size()
    model_parallel = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {parallel.tensor_model_parallel_size} x "
            f"{parallel.pipeline_model_parallel_size}"
            + (
                f"; launch {model_parallel} processes, e.g. torchrun --nproc_per_node {model_parallel}"
                if world == 1
                else ""
            )
        )
    dp = parallel.data_parallel_size
    if dp is not None and dp != world // model_parallel:
        raise ValueError(
            f"parallel.data_parallel_size is {dp} but world size {world} / (tp x pp = "
            f"{model_parallel}) gives {world // model_parallel}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    vpp = parallel.virtual_pipeline_model_parallel_size
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_runtime() -> None:
    """Tear down Megatron's groups and the process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def on_all_ranks(flag: bool, group: dist.ProcessGroup | None = None) -> bool:
    """True when ``flag`` holds on every rank of ``group`` (default: all ranks); ``flag`` itself
    without a process group. Every rank of the group must call it."""
    if not dist.is_initialized():
        return flag
    found = torch.tensor([1 if flag else 0])
    dist.all_reduce(found, op=dist.ReduceOp.MIN, group=group)
    return bool(int(found))


def on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on global rank 0 and return its result on every rank; its error is re-raised
    on every rank, so no rank waits forever for one that failed (file writes, for instance)."""
    result: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            result = [fn(), None]
        except Exception as e:  # noqa: BLE001 - forwarded to all ranks below
            result = [None, e]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise result[1]
    return result[0]
