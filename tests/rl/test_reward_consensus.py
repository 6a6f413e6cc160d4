"""Rewards are scored once per model replica: the TP ranks of one model agree on every reward."""

from __future__ import annotations

import pytest

from tests.multirank import launch, worker_path

pytestmark = pytest.mark.multirank


def test_tp_ranks_share_the_first_ranks_rewards_and_dp_ranks_keep_their_own():
    out = launch(worker_path("reward_consensus"), 2, timeout=120).stdout
    assert "OK tp2" in out and "OK dp2" in out, out


def test_one_rank_scores_locally(single_rank_runtime):
    from megatron_hybrid.rl.reward_consensus import score_per_replica

    rewards, stats = score_per_replica(lambda c, a: float(c == a), ["1", "2"], ["1", "3"])
    assert rewards.tolist() == [1.0, 0.0] and stats.num == 2 and stats.errors == 0
