"""Worker: one GRPO step with dynamic sampling (``filter_groups``) at DP=2.

Data-parallel rank 0 gets prompts whose groups all score the same (the filter drops every one of
them); rank 1 gets prompts whose rewards vary within each group. With ``--all-equal`` both ranks
get only all-equal groups. Rank 0 saves whether the trainable weights changed, whether the ranks
agree on them afterwards, and the step's kept-group count.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.data.arith import CharTokenizer
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan
from megatron_hybrid.peft.plan import HybridPlan
from megatron_hybrid.rl.generation import SamplingConfig
from megatron_hybrid.rl.grpo import GRPOConfig, grpo_step
from megatron_hybrid.rl.rewards import register_reward_function
from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime
from megatron_hybrid.train.step import OptimConfig, build_optimizer, wrap_ddp
from tests.sharding import load_full_state_dict
from tests.workers.hybrid_model import MODEL_CFG, PLAN


@register_reward_function("test_parity_or_constant")
def parity_or_constant(completion: str, answer: str) -> float:
    """``answer == "same"``: always 0 (an all-equal group); otherwise the parity of the first
    completion character, which varies across samples."""
    if answer == "same" or not completion:
        return 0.0
    return float(ord(completion[0]) % 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--all-equal", action="store_true")
    args = parser.parse_args()
    parallel = ParallelConfig()
    initialize_runtime(parallel, seed=1234)
    assert parallel_state.get_data_parallel_world_size() == 2
    chunks = build_model(MODEL_CFG, parallel)
    load_full_state_dict(
        chunks, torch.load(args.reference, weights_only=True)["weights"], MODEL_CFG
    )
    apply_hybrid_plan(chunks, HybridPlan.from_dict(PLAN))
    ddp = wrap_ddp(chunks)
    optim = OptimConfig(lr=1e-2)
    opt = build_optimizer(ddp, optim)
    tok = CharTokenizer()
    rank = parallel_state.get_data_parallel_rank()
    answer = "same" if rank == 0 or args.all_equal else "vary"
    prompts = [(tok.encode(f"{i}+{i}="), answer) for i in range(1, 3)]
    cfg = GRPOConfig(
        prompts_per_step=4,
        group_size=8,
        micro_batch_size=8,
        reward="test_parity_or_constant",
        filter_groups=True,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=4),
    )

    def trainable() -> torch.Tensor:
        return torch.cat(
            [p.detach().flatten().clone() for c in ddp for p in c.parameters() if p.requires_grad]
        )

    before = trainable()
    stats = grpo_step(
        ddp,
        opt,
        prompts,
        cfg,
        decode=tok.decode,
        stop_token=tok.eos_id,
        vocab_size=tok.vocab_size,
        seed=11 + rank,
        optim=optim,
        step=0,
        total_steps=1,
    )
    after = trainable()
    gathered = [torch.empty_like(after) for _ in range(2)]
    dist.all_gather(gathered, after)
    if dist.get_rank() == 0:
        torch.save(
            {
                "changed": not torch.equal(before, after),
                "ranks_agree": torch.equal(gathered[0], gathered[1]),
                "kept_groups": stats.kept_groups,
                "loss_is_none": stats.loss is None,
            },
            args.out,
        )
    destroy_runtime()


if __name__ == "__main__":
    main()
