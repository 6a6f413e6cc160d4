"""Group-relative advantages (GRPO / Dr.GRPO) and DAPO's dynamic-sampling filter.

Rewards come in groups: ``group_size`` completions of one prompt, laid out group after group
(``[num_groups * group_size]``, prompt-major) or as ``[num_groups, group_size]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_hybrid.config import check_int

__all__ = ["dynamic_sampling_mask", "group_advantages"]


def _as_groups(rewards: Tensor, group_size: int) -> Tensor:
    """``[G, n]`` view of ``rewards``, in at least float32."""
    check_int("group_size", group_size)
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(
                f"rewards of shape {tuple(rewards.shape)} do not have group_size={group_size} columns"
            )
        grouped = rewards
    elif rewards.dim() == 1:
        if rewards.numel() % group_size:
            raise ValueError(
                f"{rewards.numel()} rewards do not split into groups of group_size={group_size}"
            )
        grouped = rewards.reshape(-1, group_size)
    else:
        raise ValueError(
            f"rewards must be [num_groups * group_size] or [num_groups, group_size], "
            f"got shape {tuple(rewards.shape)}"
        )
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    if not dtype.is_floating_point:  # bool/int rewards promote to float32
        dtype = torch.float32
    return grouped.to(dtype)


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6
) -> Tensor:
    """One advantage per completion, relative to its group; same shape as ``rewards``.

    ``scale=True`` (GRPO): ``(r - mean_group) / (std_group + eps)`` with the unbiased (Bessel)
    standard deviation, as TRL and verl compute it. ``scale=False`` (Dr.GRPO): ``r - mean_group``.

    A group whose rewards are all equal (which includes ``group_size == 1``) gets exactly 0.0:
    it carries no learning signal, and ``r - mean`` is not always exactly zero in floating point.
    """
    grouped = _as_groups(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    advantages = torch.where(equal, torch.zeros_like(centred), centred)
    return advantages.reshape(rewards.shape)


def dynamic_sampling_mask(rewards: Tensor, group_size: int) -> Tensor:
    """``[num_groups]`` bool, True for groups to keep: those whose rewards are not all equal.

    DAPO's dynamic sampling drops the others (all right or all wrong), whose advantages are zero.
    """
    grouped = _as_groups(rewards, group_size)
    return ~(grouped == grouped[:, :1]).all(dim=1)
