"""Group advantages (GRPO, Dr.GRPO) against a loop reference; equal groups; dynamic sampling."""

from __future__ import annotations

import statistics

import pytest
import torch

from megatron_hybrid.rl.advantages import dynamic_sampling_mask, group_advantages


def loop_reference(rewards: list[float], group_size: int, scale: bool, eps: float) -> list[float]:
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        if len(set(group)) == 1:
            out += [0.0] * group_size
            continue
        mean = statistics.fmean(group)
        std = statistics.stdev(group)  # Bessel-corrected, like torch.std
        out += [(r - mean) / (std + eps) if scale else r - mean for r in group]
    return out


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("group_size", [1, 2, 4, 8])
def test_matches_loop_reference(scale, group_size):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randint(0, 3, (6 * group_size,), generator=g).to(torch.float64) / 2
    rewards[:group_size] = 0.5  # one all-equal group
    expected = loop_reference(rewards.tolist(), group_size, scale, 1e-6)
    flat = group_advantages(rewards, group_size, scale=scale)
    torch.testing.assert_close(flat, torch.tensor(expected, dtype=torch.float64))
    grouped = group_advantages(rewards.reshape(-1, group_size), group_size, scale=scale)
    assert grouped.shape == (6, group_size)
    torch.testing.assert_close(grouped.reshape(-1), flat)


def test_hand_values():
    adv = group_advantages(torch.tensor([0.0, 1.0, 1.0, 1.0]), 2, eps=0.0)
    s = 2**-0.5  # unbiased std of (0, 1)
    torch.testing.assert_close(adv, torch.tensor([-0.5 / s, 0.5 / s, 0.0, 0.0]))
    torch.testing.assert_close(
        group_advantages(torch.tensor([0.0, 1.0, 3.0]), 3, scale=False),
        torch.tensor([-4 / 3, -1 / 3, 5 / 3]),
    )


def test_equal_groups_give_exact_zeros_never_nan():
    # 0.1 * 3 / 3 is not exactly 0.1 in floating point, so r - mean alone would not be 0.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float32)
    for scale in (True, False):
        adv = group_advantages(rewards, 3, scale=scale, eps=0.0)
        assert (adv == 0).all()
    single = group_advantages(torch.tensor([1.0, 0.0, 0.3]), 1)
    assert (single == 0).all() and not single.isnan().any()


def test_integer_and_bool_rewards_become_float():
    adv = group_advantages(torch.tensor([True, False]), 2)
    assert adv.dtype == torch.float32 and adv[0] > 0 > adv[1]
    assert group_advantages(torch.tensor([1, 3]), 2, scale=False).tolist() == [-1.0, 1.0]


def test_dynamic_sampling_mask():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    expected = [False, True, False, True]
    assert dynamic_sampling_mask(rewards, 3).tolist() == expected
    assert dynamic_sampling_mask(rewards.reshape(-1), 3).tolist() == expected
    assert dynamic_sampling_mask(torch.tensor([1.0, 0.0]), 1).tolist() == [False, False]


@pytest.mark.parametrize(
    ("shape", "group_size", "match"),
    [
        ((7,), 2, "do not split into groups of group_size=2"),
        ((3, 4), 2, "do not have group_size=2 columns"),
        ((2, 2, 2), 2, "rewards must be"),
        ((4,), 0, "group_size must be a positive integer"),
    ],
)
def test_shape_errors(shape, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(shape), group_size)
    with pytest.raises(ValueError, match=match):
        dynamic_sampling_mask(torch.zeros(shape), group_size)
