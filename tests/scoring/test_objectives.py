"""The policy-gradient calibration objective equals plain autograd of the GRPO loss on the rollouts."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_hybrid.data.arith import ArithTask, CharTokenizer
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.rl.generation import SamplingConfig
from megatron_hybrid.rl.grpo import GRPOConfig
from megatron_hybrid.rl.losses import PolicyLossConfig, get_policy_loss, normalizer_count
from megatron_hybrid.runtime.distributed import ParallelConfig
from megatron_hybrid.scoring.calibration import accumulate_gradients
from megatron_hybrid.scoring.objectives import policy_gradient_source
from megatron_hybrid.scoring.run import local_candidates
from tests.tiny_hybrid import MODEL as TINY_MODEL

MODEL = replace(TINY_MODEL, max_sequence_length=24)  # the shared tiny model, 24 positions


def _length_reward(completion: str, answer: str, *, end_token: str = "$") -> float:
    """A dense test reward: completions of different lengths get different rewards."""
    return len(completion.split(end_token)[0]) / 10.0


def _arith_source(chunks, cfg: GRPOConfig, num_prompts: int, **kwargs):
    """``policy_gradient_source`` over ``num_prompts`` built-in arithmetic prompts (the same for
    every step), character tokenizer."""
    tok = CharTokenizer()
    gen = torch.Generator().manual_seed(1)
    pairs = [(tok.encode(p), a) for p, a in ArithTask().sample(num_prompts, gen)]
    return policy_gradient_source(
        chunks,
        lambda k: pairs,
        cfg,
        decode=tok.decode,
        stop_token=tok.eos_id,
        vocab_size=tok.vocab_size,
        **kwargs,
    )


@pytest.mark.parametrize("loss", ["grpo", "gspo", "dr_grpo"])
def test_policy_gradient_calibration_matches_autograd(single_rank_runtime, monkeypatch, loss):
    """Each loss with its own normaliser (tokens, sequences, a constant); before, calibration
    divided every loss by the token count."""
    from megatron_hybrid.rl import rewards

    monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "test_length", _length_reward)
    tok = CharTokenizer()
    chunks = build_model(MODEL, ParallelConfig())
    cfg = GRPOConfig(
        prompts_per_step=3,
        group_size=4,
        micro_batch_size=5,
        reward="test_length",
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=5),
        loss=PolicyLossConfig(loss=loss, max_response_length=5),
    )
    batches, forward_step = _arith_source(chunks, cfg, 3)
    micro = batches(0)
    assert batches(0) is micro, "rollouts are cached per step"
    assert any(b.advantages.abs().sum() > 0 for b in micro), "rewards must differ within some group"
    refs = local_candidates(chunks)
    got = accumulate_gradients(chunks, refs, batches, 1, forward_step=forward_step)

    weights = [r.module.weight for r in refs]
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    total = sum(float(normalizer_count(b.loss_mask, cfg.loss)) for b in micro)
    loss_fn = get_policy_loss(cfg.loss.loss)
    for b in micro:
        # The sampler's distribution: softmax over the real vocabulary (padding never sampled).
        logits = chunks[0](b.tokens, b.position_ids, None).float()[..., : tok.vocab_size]
        logprobs = torch.log_softmax(logits, -1).gather(-1, b.labels.unsqueeze(-1)).squeeze(-1)
        loss, _ = loss_fn(
            logprobs, b.old_logprobs, b.advantages, b.loss_mask, cfg.loss, normalizer=total
        )
        loss.backward()
    for ref, w in zip(refs, weights):
        torch.testing.assert_close(
            got[ref.name], w.grad.float(), rtol=1e-4, atol=1e-7, msg=ref.name
        )
        assert w.grad.abs().sum() > 0


def test_policy_gradient_rollouts_differ_across_data_parallel_ranks(
    single_rank_runtime, monkeypatch
):
    """Each DP rank samples its own completions (before, every rank used seed * 7919 + k, so the
    DP-averaged gradient averaged copies of the same samples for identical prompts)."""
    from megatron.core import parallel_state

    from megatron_hybrid.rl.generation import rollout_seed
    from megatron_hybrid.scoring import objectives

    seeds: list[int] = []
    real_generate = objectives.generate

    def recording_generate(*args, seed, **kwargs):
        seeds.append(seed)
        return real_generate(*args, seed=seed, **kwargs)

    monkeypatch.setattr(objectives, "generate", recording_generate)
    chunks = build_model(MODEL, ParallelConfig())
    cfg = GRPOConfig(
        prompts_per_step=1,
        group_size=4,
        micro_batch_size=4,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=5),
    )
    completions = []
    for dp_rank in (0, 1):
        monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda *a, r=dp_rank, **k: r)
        batches, _ = _arith_source(chunks, cfg, 1, seed=3)
        completions.append(torch.cat([b.tokens for b in batches(2)]))
    assert seeds == [rollout_seed(3, 2, 0), rollout_seed(3, 2, 1)]
    assert not torch.equal(completions[0], completions[1])


def test_score_job_refuses_prompts_that_do_not_split_over_data_parallel_ranks(
    single_rank_runtime, monkeypatch
):
    """Before, 16 prompts quietly became 15 at DP=3 (and dp_size prompts once DP > 16)."""
    from megatron.core import parallel_state

    from megatron_hybrid.scoring.job import ScoreJobConfig, _policy_gradient_source

    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda *a, **k: 3)
    cfg = ScoreJobConfig()
    with pytest.raises(ValueError, match=r"grpo.prompts_per_step=16 must be a multiple of .* 3"):
        _policy_gradient_source(build_model(MODEL, ParallelConfig()), cfg)
