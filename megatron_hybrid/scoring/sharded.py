"""Spectral statistics of a tensor-parallel matrix from its shards, never gathering it.

A matrix G (a weight gradient or a weight difference, ``out x in``) sharded like its weight over
the t ranks of a TP group::

    column-parallel (linear_qkv, linear_fc1)        row-parallel (linear_proj, linear_fc2)
    G = [G_1; G_2; ...; G_t]   (G_i: out/t x in)    G = [G_1, G_2, ..., G_t]   (G_i: out x in/t)
    G^T G = sum_i G_i^T G_i    (in x in)            G G^T = sum_i G_i G_i^T    (out x out)

The Gram matrix on the unsharded side is a sum of per-rank terms, so one all-reduce of a ``d x d``
matrix (solver ``exact``) or of a ``d x q`` product per iteration (solver ``randomized``) gives
every rank the same singular values; ||G||_F^2 is a sum of local sums. For Megatron's four
candidate modules d is the hidden size either way.

The singular values of the result equal those of G, so row or column *permutations* of G across
the shards do not matter: the SwiGLU ``linear_fc1`` shard ``[gate_i; up_i]`` is rank i's rows of a
row permutation of the full ``[gate; up]``, and is passed as an ordinary column-parallel shard.

Here ``tp_group=None`` means "no tensor parallelism" (no communication), not the default group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_hybrid.scoring.spectra import (
    SpectralStats,
    gram_top_singular_values,
    randomized_top_singular_values,
)

__all__ = ["PARALLEL_MODES", "SOLVERS", "CommStats", "sharded_spectral_stats"]

PARALLEL_MODES = ("column", "row", "replicated")
SOLVERS = ("exact", "randomized")


@dataclass(frozen=True)
class CommStats:
    """Communication of one :func:`sharded_spectral_stats` call, seen from one rank."""

    all_reduce_bytes: int
    """Sum of the sizes of the tensors this call passed to ``all_reduce`` (0 without TP)."""
    all_reduce_calls: int
    """Number of ``all_reduce`` calls (each is one latency-bound collective)."""
    gather_bytes: int
    """What gathering the full matrix would have moved: full numel x the shard's element size."""

    @property
    def ratio(self) -> float:
        """all_reduce_bytes / gather_bytes (below 1: cheaper than gathering G)."""
        return self.all_reduce_bytes / self.gather_bytes if self.gather_bytes else 0.0


class _AllReduce:
    """Sums tensors over a group in place, keeping count of bytes and calls."""

    def __init__(self, group) -> None:
        self.group = group
        self.bytes = 0
        self.calls = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
        return tensor


def sharded_spectral_stats(
    shard: torch.Tensor,
    parallel_mode: str,
    tp_group: dist.ProcessGroup | None,
    k: int,
    *,
    rank: int | None = None,
    solver: str = "exact",
    oversample: int = 8,
    iters: int = 4,
    seed: int = 0,
) -> tuple[SpectralStats, CommStats]:
    """||G||_F^2 and the top-k singular values of the TP-sharded G, identical on every TP rank.

    Collective over ``tp_group``: every rank of it must call this with the same ``parallel_mode``,
    ``k``, ``solver``, ``oversample``, ``iters`` and ``seed``.

    Args:
        shard: this rank's piece of G, sharded like the weight: ``column``: ``out/t x in`` (rows
            sharded; the SwiGLU ``[gate_i; up_i]`` shard is fine, see the module docstring);
            ``row``: ``out x in/t`` (columns sharded); ``replicated``: the full ``out x in``.
            Any float dtype; computed in float64.
        parallel_mode: ``column``, ``row`` or ``replicated`` (no communication; the smaller side's
            Gram is used).
        tp_group: the tensor-parallel group; None (or a group of size 1) means the shard is the
            full matrix.
        k: how many singular values to compute.
        rank: the LoRA rank stored in the stats (default k).
        solver: ``exact`` forms the ``d x d`` local Gram (O(d^2) memory and communication, O(d^3)
            eigendecomposition); ``randomized`` runs :func:`randomized_top_singular_values` with
            ``iters + 1`` all-reduces of ``d x min(d, k + oversample)``.
        oversample, iters, seed: for ``randomized`` (see there); ignored by ``exact``.

    Returns:
        ``(stats, comm)``: the :class:`SpectralStats` (singular values: float64 on the CPU,
        zero-padded beyond ``d``) and this rank's :class:`CommStats`.
    """
    if parallel_mode not in PARALLEL_MODES:
        raise ValueError(f"parallel_mode must be one of {PARALLEL_MODES}, got {parallel_mode!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if shard.ndim != 2:
        raise ValueError(f"shard must be a matrix, got shape {tuple(shard.shape)}")
    tp_size = 1 if tp_group is None else dist.get_world_size(group=tp_group)
    if parallel_mode == "replicated" or tp_size == 1:
        group, shards = None, 1
    else:
        group, shards = tp_group, tp_size
    gather_bytes = shard.numel() * shards * shard.element_size()

    g = shard.detach().to(torch.float64)
    # Work on the side of the Gram that is a sum over shards: in-side (G^T G) for column, out-side
    # (G G^T) for row; without sharding, the smaller one. Transposing G swaps the two.
    if parallel_mode == "row" or (group is None and g.shape[0] < g.shape[1]):
        g = g.mT
    dim = g.shape[1]
    all_reduce = _AllReduce(group)

    if solver == "exact":
        gram = all_reduce(g.mT @ g)
        # trace(G^T G) = ||G||_F^2: no separate all-reduce needed.
        frobenius_sq = torch.diagonal(gram).sum()
        top = gram_top_singular_values(gram, k)
    else:
        frobenius_sq = all_reduce(g.square().sum())
        top = randomized_top_singular_values(
            lambda Q: all_reduce(g.mT @ (g @ Q)),
            dim,
            k,
            oversample=oversample,
            iters=iters,
            seed=seed,
            dtype=torch.float64,
            device=g.device,
        )
    stats = SpectralStats(
        frobenius_sq=float(frobenius_sq.item()),
        top_singular_values=top.cpu(),
        rank=k if rank is None else rank,
    )
    comm = CommStats(
        all_reduce_bytes=all_reduce.bytes,
        all_reduce_calls=all_reduce.calls,
        gather_bytes=gather_bytes,
    )
    return stats, comm
