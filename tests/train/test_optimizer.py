"""build_optimizer's learning rates per parameter kind: full weights, LoRA A, LoRA B (LoRA+)."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.data.arith import ArithTask, CharTokenizer, make_sft_batch
from megatron_hybrid.train.step import OptimConfig, build_optimizer, lm_forward_backward
from tests.tiny_hybrid import tiny_hybrid_ddp


def _kind(name: str) -> str:
    if name.endswith("lora_A"):
        return "A"
    return "B" if name.endswith("lora_B") else "full"


@pytest.mark.parametrize(("mult", "ratio"), [(1.0, 1.0), (3.0, 1.0), (3.0, 4.0), (1.0, 16.0)])
def test_first_adam_step_moves_each_kind_by_its_rate(single_rank_runtime, mult, ratio):
    """Adam's first step moves every element with a nonzero gradient by about its group's rate
    (m / sqrt(v) = sign(g)), so the step sizes show the rate each parameter really got."""
    ddp = tiny_hybrid_ddp(single_rank_runtime)
    lr = 1e-3
    optim = OptimConfig(lr=lr, lora_lr_mult=mult, loraplus_lr_ratio=ratio, weight_decay=0.0)
    opt = build_optimizer(ddp, optim)
    params = {n: p for n, p in ddp[0].module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    batch = make_sft_batch(
        ArithTask().sample(4, torch.Generator().manual_seed(0)), CharTokenizer(), 16
    )
    lm_forward_backward(ddp, [batch])
    ok, _, _ = opt.step()
    assert ok
    want = {"full": lr, "A": lr * mult, "B": lr * mult * ratio}
    seen = set()
    for name, p in params.items():
        step = (p.detach() - before[name]).abs()
        moved = step[step > 0]
        assert moved.numel(), name
        torch.testing.assert_close(
            moved.median(), torch.tensor(want[_kind(name)]), rtol=0.02, atol=0.0, msg=name
        )
        seen.add(_kind(name))
    assert seen == {"full", "A", "B"}


def test_loraplus_ratio_is_validated():
    with pytest.raises(ValueError, match=r"optim.loraplus_lr_ratio must be a number > 0"):
        OptimConfig(lr=1e-3, loraplus_lr_ratio=0)
