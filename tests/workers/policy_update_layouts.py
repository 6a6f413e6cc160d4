"""Worker: one GRPO/GSPO policy update on a FIXED rollout at a TP/PP/DP layout.

The rollout (tokens, completion masks, behaviour log-probs, advantages) is built deterministically
on every rank; data-parallel rank d takes its contiguous share of the sequences, split into
micro-batches. After one optimizer step rank 0 saves the full trainable tensors; the test compares
them with the TP=1 / DP=1 / one-micro-batch reference. This checks that the loss, normalised by the
GLOBAL token / sequence count, gives the whole-batch update for any micro-batch and DP split, and
that the reported loss and metrics are the whole batch's (DP-global) too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan
from megatron_hybrid.peft.plan import HybridPlan
from megatron_hybrid.rl.generation import Rollout
from megatron_hybrid.rl.grpo import make_micro_batches, policy_update
from megatron_hybrid.rl.losses import PolicyLossConfig
from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime
from megatron_hybrid.train.step import OptimConfig, build_optimizer, wrap_ddp
from tests.sharding import gather_full_state_dict, load_full_state_dict
from tests.workers.hybrid_model import MODEL_CFG, PLAN, lora_layout

ROWS, WIDTH = 8, 14
METRICS = ("pg_loss", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "num_tokens")


def fixed_rollout() -> tuple[Rollout, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 17, (ROWS, WIDTH), generator=g)
    prompt = torch.randint(3, 7, (ROWS,), generator=g)
    lengths = torch.minimum(prompt + torch.randint(2, 7, (ROWS,), generator=g), torch.tensor(WIDTH))
    old = -torch.rand(ROWS, WIDTH - 1, generator=g) * 3  # behaviour log-probs (off-policy ratios)
    adv = torch.randn(ROWS, generator=g)
    return Rollout(tokens, prompt, lengths), old, adv


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=ROWS)
    parser.add_argument("--loss", default="grpo")
    parser.add_argument("--clip-grad", type=float, default=0.0)
    args = parser.parse_args()
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp
    )
    initialize_runtime(parallel, seed=1234)
    chunks = build_model(MODEL_CFG, parallel)
    load_full_state_dict(
        chunks, torch.load(args.reference, weights_only=True)["weights"], MODEL_CFG
    )
    apply_hybrid_plan(chunks, HybridPlan.from_dict(PLAN))
    ddp = wrap_ddp(chunks)
    # Large eps (see hybrid_model.py): the update then depends on the gradient's scale, so a
    # clipping coefficient that differed across shards or layouts would show.
    optim = OptimConfig(lr=1e-2, adam_eps=1e-3, clip_grad=args.clip_grad)
    opt = build_optimizer(ddp, optim)

    rollout, old, adv = fixed_rollout()
    dp_rank = parallel_state.get_data_parallel_rank()
    share = ROWS // parallel_state.get_data_parallel_world_size()
    rows = slice(dp_rank * share, (dp_rank + 1) * share)
    mine = Rollout(rollout.tokens[rows], rollout.prompt_lengths[rows], rollout.lengths[rows])
    micro = make_micro_batches(mine, old[rows], adv[rows], None, args.micro_batch_size)
    loss_cfg = PolicyLossConfig(
        loss=args.loss,
        eps_low=0.2,
        eps_high=0.28,
        max_response_length=WIDTH if args.loss == "dr_grpo" else None,
    )
    loss, metrics = policy_update(ddp, opt, micro, loss_cfg, optim, 0, 1)

    after = [
        {n: p.detach().clone() for n, p in c.module.named_parameters() if p.requires_grad}
        for c in ddp
    ]
    full = gather_full_state_dict(after, MODEL_CFG, layout_fn=lora_layout, replica_atol=0.0)
    if torch.distributed.get_rank() == 0:
        full["grad_norm"] = torch.tensor(metrics["grad_norm"])  # pre-clip, over all shards
        # On every stage (broadcast from the last one); DP-global.
        # No KL term: the policy-gradient part is the whole loss, whatever the micro-batches.
        assert abs(metrics["pg_loss"] - loss) <= 1e-6 * max(1.0, abs(loss)), (metrics, loss)
        full["loss"] = torch.tensor(loss, dtype=torch.float64)
        for key in METRICS:
            full[key] = torch.tensor(metrics[key], dtype=torch.float64)
        torch.save(full, args.out)
    destroy_runtime()


if __name__ == "__main__":
    main()
