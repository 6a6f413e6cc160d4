"""Worker: rewards scored once per model replica (``score_per_replica``), on 2 ranks.

The reward function gives each rank a different answer (its global rank, and an error on rank 1),
as a non-deterministic reward would. At TP=2 both ranks hold one replica and must get rank 0's
rewards and stats; at DP=2 each rank is its own replica and keeps its own. Prints ``OK <layout>``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.rl.reward_consensus import score_per_replica
from megatron_hybrid.runtime.distributed import ParallelConfig, initialize_runtime


def rank_dependent(completion: str, answer: str) -> float:
    rank = dist.get_rank()
    if rank == 1 and completion == "b":
        raise RuntimeError("only rank 1 fails")
    return float(rank) + len(completion)


def main() -> int:
    completions, answers = ["a", "b", "cc"], ["1", "2", "3"]
    for layout, tp in (("tp2", 2), ("dp2", 1)):
        initialize_runtime(ParallelConfig(tensor_model_parallel_size=tp), seed=0)
        rewards, stats = score_per_replica(rank_dependent, completions, answers)
        rank = dist.get_rank()
        leader = 0 if tp == 2 else rank
        want = torch.tensor([leader + 1.0, leader + 1.0, leader + 2.0])
        if leader == 1:
            want[1] = 0.0
        if not torch.equal(rewards, want):
            raise AssertionError(
                f"{layout} rank {rank}: rewards {rewards.tolist()}, want {want.tolist()}"
            )
        if (stats.num, stats.errors) != (3, int(leader == 1)):
            raise AssertionError(f"{layout} rank {rank}: stats {stats}")
        if leader == 1 and "RuntimeError: only rank 1 fails" not in (stats.first_error or ""):
            raise AssertionError(f"{layout} rank {rank}: first error {stats.first_error!r}")
        dist.barrier()
        if rank == 0:
            print(f"OK {layout}", flush=True)
        parallel_state.destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
