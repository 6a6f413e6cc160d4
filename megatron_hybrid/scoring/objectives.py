"""Calibration objectives other than next-token loss.

``policy_gradient``: for calibration step k, sample ``group_size`` completions per prompt from
the base model, reward them, compute group-normalised advantages and behaviour log-probs, and feed
the GRPO loss through Megatron's schedule. At the base the importance ratio is 1, so the gradient
is the on-policy policy gradient ``-sum_i A_i grad log pi(y_i)`` (normalised per token) that the
first GRPO step would follow. Rollouts are cached per k so that the probe's P steps and a second
pass see the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from megatron.core import parallel_state

from megatron_hybrid.rl.advantages import group_advantages
from megatron_hybrid.rl.generation import LogprobSpec, generate, rollout_seed, sequence_logprobs
from megatron_hybrid.rl.grpo import GRPOConfig, RLBatch, _policy_forward_step, make_micro_batches
from megatron_hybrid.rl.losses import normalizer_count
from megatron_hybrid.rl.rewards import get_reward_function, score_completions

__all__ = ["policy_gradient_source"]


def policy_gradient_source(
    chunks: Sequence[torch.nn.Module],
    prompts: Callable[[int], Sequence[tuple[list[int], str]]],
    cfg: GRPOConfig,
    *,
    decode: Callable[[list[int]], str],
    stop_token: int | Sequence[int],
    vocab_size: int,
    seed: int = 0,
) -> tuple[Callable[[int], list[RLBatch]], Callable]:
    """``(batches, forward_step)`` for :func:`~megatron_hybrid.scoring.run.score_modules`.

    Args:
        chunks: the base model chunks being scored (plain, not DDP-wrapped).
        prompts: ``prompts(k)`` -> this DP rank's (prompt ids, answer) pairs for step k.
        cfg: rollout settings (group size, sampling, reward, loss).
    """
    cache: dict[int, list[RLBatch]] = {}
    reward_fn = get_reward_function(cfg.reward)
    spec = LogprobSpec.of(cfg.sampling, vocab_size)  # the sampler's distribution

    def batches(k: int) -> list[RLBatch]:
        if k in cache:
            return cache[k]
        pairs = list(prompts(k))
        expanded = [p for p, _ in pairs for _ in range(cfg.group_size)]
        answers = [a for _, a in pairs for _ in range(cfg.group_size)]
        training = [c.training for c in chunks]
        try:
            for c in chunks:
                c.eval()
            rollout = generate(
                chunks,
                expanded,
                cfg.sampling,
                stop_token=stop_token,
                vocab_size=vocab_size,
                # Each DP rank samples its own completions (the same across its model-parallel
                # group, as generate requires).
                seed=rollout_seed(seed, k, parallel_state.get_data_parallel_rank()),
                micro_batch_size=cfg.micro_batch_size,
            )
            old = sequence_logprobs(
                chunks,
                rollout.tokens,
                micro_batch_size=cfg.micro_batch_size,
                spec=spec,
            )
        finally:
            for c, t in zip(chunks, training):
                c.train(t)
        rewards, _ = score_completions(
            reward_fn, [decode(c) for c in rollout.completions()], answers
        )
        adv = group_advantages(rewards, cfg.group_size, scale=cfg.scale_advantages)
        cache[k] = make_micro_batches(rollout, old, adv, None, cfg.micro_batch_size)
        return cache[k]

    def normalizer(micro: Sequence[RLBatch]) -> torch.Tensor:
        # The loss's own normaliser (tokens, sequences or a constant), as the GRPO update uses.
        return sum(normalizer_count(b.loss_mask, cfg.loss) for b in micro)

    batches.normalizer = normalizer  # read by the calibration passes (see BatchSource)
    return batches, partial(_policy_forward_step, cfg.loss, spec)
