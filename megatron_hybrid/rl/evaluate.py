"""Held-out accuracy: greedy completions scored with a verifiable reward, over data-parallel ranks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.rl.generation import SamplingConfig, generate
from megatron_hybrid.rl.reward_consensus import score_per_replica
from megatron_hybrid.rl.rewards import get_reward_function

__all__ = ["greedy_accuracy"]


@torch.no_grad()
def greedy_accuracy(
    chunks: Sequence[torch.nn.Module],
    pairs: Sequence[tuple[list[int], str]],
    *,
    decode: Callable[[list[int]], str],
    stop_token: int | Sequence[int],
    vocab_size: int,
    max_new_tokens: int,
    reward: str = "exact_int",
    micro_batch_size: int = 128,
) -> float:
    """Fraction of ``pairs`` (prompt ids, answer) whose greedy completion earns reward 1.

    Every rank passes the same full list; data-parallel rank d evaluates rows d, d + D, ...
    and the counts are all-reduced, so the result is identical on every rank.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = list(pairs)[dp_rank::dp_size]
    correct = 0.0
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        for s in range(0, len(mine), micro_batch_size):
            part = mine[s : s + micro_batch_size]
            rollout = generate(
                chunks,
                [p for p, _ in part],
                SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens),
                stop_token=stop_token,
                vocab_size=vocab_size,
            )
            texts = [decode(c) for c in rollout.completions()]
            rewards, _ = score_per_replica(get_reward_function(reward), texts, [a for _, a in part])
            correct += float((rewards == 1).sum())
    finally:
        for c, t in zip(chunks, was_training):
            c.train(t)
    total = torch.tensor([correct, float(len(mine))], dtype=torch.float64)
    dp = parallel_state.get_data_parallel_group()
    if dp.size() > 1:
        dist.all_reduce(total, group=dp)
    return float(total[0] / total[1].clamp(min=1))
