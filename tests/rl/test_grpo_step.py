"""A whole GRPO step on one rank: the on-policy shortcut for the old log-probabilities."""

from __future__ import annotations

import pytest
import torch

import megatron_hybrid.rl.grpo as grpo_module
from megatron_hybrid.data.arith import CharTokenizer
from megatron_hybrid.rl.generation import SamplingConfig
from megatron_hybrid.rl.grpo import GRPOConfig, grpo_step
from megatron_hybrid.rl.losses import register_policy_loss
from megatron_hybrid.rl.rewards import register_reward_function
from megatron_hybrid.train.step import OptimConfig, build_optimizer
from tests.tiny_hybrid import tiny_hybrid_ddp

OPTIM = OptimConfig(lr=1e-2)


@register_reward_function("test_first_char_parity")
def first_char_parity(completion: str, answer: str) -> float:
    """Varies across the samples of a group, so advantages are nonzero."""
    return float(ord(completion[0]) % 2) if completion else 0.0


@register_policy_loss("test_plain_policy_gradient")
def plain_policy_gradient(logprobs, old_logprobs, advantages, mask, cfg, *, ref_logprobs=None,
                          normalizer):  # fmt: skip
    """A user's loss with only the metrics it cares about (no counts, no ``stat_count``)."""
    m = mask.bool()
    loss = -(torch.where(m, logprobs * advantages[:, None], 0.0)).sum() / normalizer
    return loss, {"pg_loss": loss.detach(), "logprob_mean": logprobs[m].mean().detach()}


def _trainable(ddp) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in ddp[0].module.named_parameters() if p.requires_grad}


def _step(ddp, cfg: GRPOConfig, start: dict[str, torch.Tensor], stats: list | None = None):
    """One GRPO step from the weights ``start`` with a fresh optimizer; the weights after it
    (its :class:`StepStats` appended to ``stats``)."""
    params = dict(ddp[0].module.named_parameters())
    with torch.no_grad():
        for n, w in start.items():
            params[n].copy_(w)
    tok = CharTokenizer()
    prompts = [(tok.encode(f"{i}+{i}="), str(2 * i)) for i in range(1, 5)]
    result = grpo_step(
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
    if stats is not None:
        stats.append(result)
    return _trainable(ddp)


def _config(loss: str, reward: str = "test_first_char_parity", **kw) -> GRPOConfig:
    return GRPOConfig(
        prompts_per_step=4,
        group_size=4,
        micro_batch_size=6,  # 16 rows: three micro-batches, the last padded
        reward=reward,
        sampling=SamplingConfig(temperature=0.8, max_new_tokens=4),
        loss={"loss": loss},
        **kw,
    )


@pytest.mark.parametrize("loss", ["grpo", "gspo"])
def test_on_policy_shortcut_gives_the_recomputed_update(single_rank_runtime, monkeypatch, loss):
    """With one update per rollout the update's own detached log-probabilities are the old ones:
    the same update as a separate old-log-prob pass, with one pass fewer."""
    ddp = tiny_hybrid_ddp(single_rank_runtime)
    start = _trainable(ddp)
    passes = []
    real = grpo_module.sequence_logprobs
    monkeypatch.setattr(
        grpo_module, "sequence_logprobs", lambda *a, **k: passes.append(1) or real(*a, **k)
    )
    shortcut = _step(ddp, _config(loss), start)
    assert not passes
    recomputed = _step(ddp, _config(loss, recompute_old_logprobs=True), start)
    assert len(passes) == 1
    moved = [n for n in start if not torch.equal(start[n], shortcut[n])]
    assert moved, "the step did not change the weights"
    for name, value in recomputed.items():
        torch.testing.assert_close(shortcut[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_a_registered_loss_with_only_its_own_metrics_trains(single_rank_runtime):
    """Metrics are averaged over the response tokens when a loss gives no ``stat_count``."""
    ddp = tiny_hybrid_ddp(single_rank_runtime)
    start = _trainable(ddp)
    stats = []
    after = _step(ddp, _config("test_plain_policy_gradient"), start, stats)
    assert any(not torch.equal(start[n], after[n]) for n in start)
    metrics = stats[0].metrics
    assert set(metrics) == {"pg_loss", "logprob_mean", "grad_norm"}
    assert metrics["pg_loss"] == pytest.approx(stats[0].loss)
    assert metrics["logprob_mean"] < 0


def test_recompute_flag_is_validated():
    assert GRPOConfig().reuses_policy_logprobs
    assert not GRPOConfig(updates_per_rollout=2).reuses_policy_logprobs
    with pytest.raises(ValueError, match="grpo.recompute_old_logprobs must be true or false"):
        GRPOConfig(recompute_old_logprobs="yes")


@register_reward_function("test_fails_on_odd_first_char")
def fails_on_odd_first_char(completion: str, answer: str) -> float:
    if completion and ord(completion[0]) % 2:
        raise ZeroDivisionError(f"cannot score {completion!r}")
    return 1.0


def test_failed_reward_calls_are_counted_and_the_first_one_is_kept(single_rank_runtime):
    ddp = tiny_hybrid_ddp(single_rank_runtime)
    stats: list = []
    _step(ddp, _config("grpo", reward="test_fails_on_odd_first_char"), _trainable(ddp), stats)
    (result,) = stats
    assert 0 < result.reward_errors < 16, result
    assert result.reward_timeouts == 0
    assert result.reward_first_error is not None
    assert result.reward_first_error.startswith("completion ")
    assert "ZeroDivisionError: cannot score" in result.reward_first_error


def test_adapter_dropout_is_off_in_the_policy_update(single_rank_runtime):
    """Old log-probabilities come from a pass without dropout; with adapter dropout in the update
    the first update's ratio would not be 1 (spurious clipping)."""
    ddp = tiny_hybrid_ddp(single_rank_runtime, lora_dropout=0.5)
    stats: list = []
    _step(ddp, _config("grpo", recompute_old_logprobs=True), _trainable(ddp), stats)
    metrics = stats[0].metrics
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5), metrics
    assert metrics["clip_frac"] == 0.0, metrics
    assert ddp[0].module.decoder.layers[0].self_attention.linear_qkv.dropout is not None
