"""Regression: a second forward/backward after an optimizer step must not double the gradient.

Megatron's optimizer leaves ``param.grad`` aliasing ``param.main_grad``; without clearing it the
next backward accumulates into it and DDP adds it to ``main_grad`` again.
"""

from __future__ import annotations

import torch

from megatron_hybrid.data.arith import ArithTask, CharTokenizer, make_sft_batch
from megatron_hybrid.rl.generation import Rollout
from megatron_hybrid.rl.grpo import make_micro_batches, policy_update
from megatron_hybrid.rl.losses import PolicyLossConfig
from megatron_hybrid.train.step import OptimConfig, build_optimizer, lm_forward_backward
from tests.tiny_hybrid import tiny_hybrid_ddp

TINY_LR = OptimConfig(lr=1e-12)  # weights effectively unchanged between the two passes


def _ddp():
    ddp = tiny_hybrid_ddp()
    return ddp, build_optimizer(ddp, TINY_LR)


def _grads(ddp):
    return {n: p.main_grad.clone() for n, p in ddp[0].module.named_parameters() if p.requires_grad}


def test_sft_step_gradients_do_not_accumulate_across_steps(single_rank_runtime):
    ddp, opt = _ddp()
    batch = [
        make_sft_batch(ArithTask().sample(4, torch.Generator().manual_seed(0)), CharTokenizer(), 16)
    ]
    lm_forward_backward(ddp, batch)
    first = _grads(ddp)
    opt.step()
    lm_forward_backward(ddp, batch)
    for name, g in _grads(ddp).items():
        torch.testing.assert_close(g, first[name], rtol=1e-4, atol=1e-8, msg=name)


def test_policy_update_gradients_do_not_accumulate_across_steps(single_rank_runtime):
    ddp, opt = _ddp()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 17, (4, 12), generator=g)
    rollout = Rollout(tokens, torch.tensor([3, 4, 3, 5]), torch.tensor([8, 10, 12, 9]))
    micro = make_micro_batches(
        rollout, -torch.rand(4, 11, generator=g), torch.randn(4, generator=g), None, 2
    )
    cfg = PolicyLossConfig()
    policy_update(ddp, opt, micro, cfg, TINY_LR, 0, 2)
    first = _grads(ddp)
    policy_update(ddp, opt, micro, cfg, TINY_LR, 1, 2)
    for name, grad in _grads(ddp).items():
        torch.testing.assert_close(grad, first[name], rtol=1e-4, atol=1e-8, msg=name)
        assert grad.abs().sum() > 0
