"""Score completions once per model replica, so the ranks that hold one model agree on rewards.

The tensor- and pipeline-parallel ranks of one model replica sample the same completions, but a
reward function need not be deterministic across processes: a call that times out on one rank and
finishes on another, or one that reads a clock or a file, would score differently. TP shards would
then back-propagate different advantages, and with dynamic sampling the ranks would keep different
groups and run different numbers of micro-batches (a hang). Scoring on the first rank of the
model-parallel group and broadcasting the result makes every rank of the replica use one answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.rl.rewards import RewardFn, RewardStats, score_completions

__all__ = ["score_per_replica"]


def score_per_replica(
    fn: RewardFn | str,
    completions: Sequence[str],
    answers: Sequence[str],
    *,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, RewardStats]:
    """:func:`score_completions` on the first rank of ``group`` (default: Megatron's
    model-parallel group), broadcast to the others. Rewards ``[N]`` float32 and the stats of that
    one scoring, identical on every rank of the group."""
    group = group if group is not None else parallel_state.get_model_parallel_group()
    if group.size() == 1:
        return score_completions(fn, completions, answers)
    src = dist.get_process_group_ranks(group)[0]
    payload: list = [None]
    if dist.get_rank() == src:
        rewards, stats = score_completions(fn, completions, answers)
        payload = [(rewards.tolist(), stats)]
    dist.broadcast_object_list(payload, src=src, group=group)
    values, stats = payload[0]
    return torch.tensor(values, dtype=torch.float32), stats
