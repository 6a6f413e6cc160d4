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


@pytest.mark.parametrize("lora_lr_mult", [1.0, 3.0])  # Megatron's default groups / ours
def test_weight_decay_skips_biases_as_megatron_marks_them(single_rank_runtime, lora_lr_mult):
    """A step with zero gradients moves a parameter only through weight decay: the fully
    fine-tuned module's weight decays by lr x wd, its bias (Megatron's wd_mult = 0) does not."""
    from dataclasses import replace

    from megatron_hybrid.models.provider import build_model
    from megatron_hybrid.peft.apply import apply_hybrid_plan, candidate_names
    from megatron_hybrid.peft.config import LoRAConfig
    from megatron_hybrid.peft.plan import PeftSpec
    from megatron_hybrid.train.step import wrap_ddp
    from tests.tiny_hybrid import MODEL

    model = replace(MODEL, add_bias_linear=True)
    chunks = build_model(model, single_rank_runtime)
    fft = "decoder.layers.1.mlp.linear_fc1"
    spec = PeftSpec(fft_modules=[fft], lora=LoRAConfig(rank=2))
    apply_hybrid_plan(chunks, spec.resolve(candidate_names(chunks)))
    ddp = wrap_ddp(chunks)
    lr, wd = 1e-2, 0.1
    opt = build_optimizer(ddp, OptimConfig(lr=lr, weight_decay=wd, lora_lr_mult=lora_lr_mult))
    module = ddp[0].module.get_submodule(fft)
    module.bias.data.fill_(1.0)
    module.weight.data.fill_(1.0)
    for p in ddp[0].module.parameters():
        if p.requires_grad:
            p.main_grad.zero_()
    ok, _, _ = opt.step()
    assert ok
    assert torch.equal(module.bias, torch.ones_like(module.bias))
    torch.testing.assert_close(module.weight, torch.full_like(module.weight, 1 - lr * wd))
