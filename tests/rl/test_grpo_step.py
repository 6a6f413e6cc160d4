"""A whole GRPO step on one rank: the on-policy shortcut for the old log-probabilities."""

from __future__ import annotations

import pytest
import torch

import megatron_hybrid.rl.grpo as grpo_module
from megatron_hybrid.data.arith import CharTokenizer
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan, candidate_names
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.plan import PeftSpec
from megatron_hybrid.rl.generation import SamplingConfig
from megatron_hybrid.rl.grpo import GRPOConfig, grpo_step
from megatron_hybrid.rl.rewards import register_reward_function
from megatron_hybrid.train.step import OptimConfig, build_optimizer, wrap_ddp

MODEL = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=20,
    max_sequence_length=16,
)
OPTIM = OptimConfig(lr=1e-2)


@register_reward_function("test_first_char_parity")
def first_char_parity(completion: str, answer: str) -> float:
    """Varies across the samples of a group, so advantages are nonzero."""
    return float(ord(completion[0]) % 2) if completion else 0.0


def _trainable(ddp) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in ddp[0].module.named_parameters() if p.requires_grad
    }


def _step(ddp, cfg: GRPOConfig, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One GRPO step from the weights ``start`` with a fresh optimizer; the weights after it."""
    params = dict(ddp[0].module.named_parameters())
    with torch.no_grad():
        for n, w in start.items():
            params[n].copy_(w)
    tok = CharTokenizer()
    prompts = [(tok.encode(f"{i}+{i}="), str(2 * i)) for i in range(1, 5)]
    grpo_step(
        ddp,
        build_optimizer(ddp, OPTIM),
        prompts,
        cfg,
        decode=tok.decode,
        stop_token=tok.eos_id,
        vocab_size=tok.vocab_size,
        seed=5,
        optim=OPTIM,
        step=0,
        total_steps=1,
    )
    return _trainable(ddp)


@pytest.mark.parametrize("loss", ["grpo", "gspo"])
def test_on_policy_shortcut_gives_the_recomputed_update(single_rank_runtime, monkeypatch, loss):
    """With one update per rollout the update's own detached log-probabilities are the old ones:
    the same update as a separate old-log-prob pass, with one pass fewer."""
    chunks = build_model(MODEL, single_rank_runtime)
    spec = PeftSpec(
        fft_modules=["decoder.layers.1.mlp.linear_fc1"], lora=LoRAConfig(rank=2, b_init="gaussian")
    )
    apply_hybrid_plan(chunks, spec.resolve(candidate_names(chunks)))
    ddp = wrap_ddp(chunks)
    start = _trainable(ddp)
    passes = []
    real = grpo_module.sequence_logprobs
    monkeypatch.setattr(
        grpo_module, "sequence_logprobs", lambda *a, **k: passes.append(1) or real(*a, **k)
    )

    def config(**kw) -> GRPOConfig:
        return GRPOConfig(
            prompts_per_step=4,
            group_size=4,
            micro_batch_size=6,  # 16 rows: three micro-batches, the last padded
            reward="test_first_char_parity",
            sampling=SamplingConfig(temperature=0.8, max_new_tokens=4),
            loss={"loss": loss},
            **kw,
        )

    shortcut = _step(ddp, config(), start)
    assert not passes
    recomputed = _step(ddp, config(recompute_old_logprobs=True), start)
    assert len(passes) == 1
    moved = [n for n in start if not torch.equal(start[n], shortcut[n])]
    assert moved, "the step did not change the weights"
    for name, value in recomputed.items():
        torch.testing.assert_close(shortcut[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_recompute_flag_is_validated():
    assert GRPOConfig().reuses_policy_logprobs
    assert not GRPOConfig(updates_per_rollout=2).reuses_policy_logprobs
    with pytest.raises(ValueError, match="grpo.recompute_old_logprobs must be true or false"):
        GRPOConfig(recompute_old_logprobs="yes")
