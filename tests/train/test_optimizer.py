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


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"adam_beta1": 1.5}, "optim.adam_beta1"),
        ({"adam_beta2": 1.0}, "optim.adam_beta2"),
        ({"adam_eps": 0.0}, "optim.adam_eps"),
        ({"lr": float("inf")}, "optim.lr"),
        ({"lora_lr_mult": float("inf")}, "optim.lora_lr_mult"),
    ],
)
def test_optim_config_names_the_bad_key(kw, key):
    """Before, bad Adam settings failed inside torch without a key, and infinite rates passed."""
    with pytest.raises(ValueError, match=rf"{key} must be a number"):
        OptimConfig(**kw)


@pytest.mark.parametrize(
    ("warmup", "total", "want"),
    [
        (2, 6, [0.5, 1.0, 1.0, 0.853553, 0.5, 0.146447]),
        (0, 2, [1.0, 0.5]),
        (0, 4, [1.0, 0.853553, 0.5, 0.146447]),
    ],
)
def test_cosine_reaches_its_floor_after_the_last_step_not_at_it(warmup, total, want):
    """Before, the last step ran at the floor (learning rate 0 by default): a wasted step."""
    from megatron_hybrid.train.step import learning_rate_factor

    optim = OptimConfig(warmup_steps=warmup, decay="cosine")
    got = [learning_rate_factor(optim, s, total) for s in range(total)]
    assert got == pytest.approx(want, abs=1e-6)
    floored = OptimConfig(warmup_steps=warmup, decay="cosine", min_lr_ratio=0.1)
    assert learning_rate_factor(floored, total, total) == pytest.approx(0.1)


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_a_non_finite_gradient_stops_the_run_naming_the_step(single_rank_runtime, clip):
    """Megatron's fp32 optimizer steps on NaN gradients (it checks only through an fp16 loss
    scaler); before, `train optim.lr=1e30` went on at loss NaN and exited 0."""
    from megatron_hybrid.train.step import optimizer_step

    ddp = tiny_hybrid_ddp(single_rank_runtime)
    opt = build_optimizer(ddp, OptimConfig(lr=1e-3, clip_grad=clip))
    batch = make_sft_batch(
        ArithTask().sample(4, torch.Generator().manual_seed(0)), CharTokenizer(), 16
    )
    lm_forward_backward(ddp, [batch])
    assert optimizer_step(opt, "step 1") > 0
    lm_forward_backward(ddp, [batch])
    trainable = [p for p in ddp[0].module.parameters() if p.requires_grad]
    trainable[0].main_grad.view(-1)[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite gradients \(norm nan\)"):
        optimizer_step(opt, "step 2")
