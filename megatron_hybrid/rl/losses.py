"""Policy-gradient losses for RL on verifiable rewards: GRPO, GSPO and Dr.GRPO.

Each loss is a pure function registered by name (no ``torch.distributed``, no ``.item()``)::

    count = normalizer_count(mask, cfg)          # this micro-batch; the caller all-reduces it
    loss, metrics = get_policy_loss(cfg.loss)(
        logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs=ref, normalizer=global_count
    )

Shapes: ``logprobs``, ``old_logprobs``, ``ref_logprobs`` and ``mask`` are ``[B, T]`` (``mask``
nonzero on response tokens, zero on prompt and padding; values at masked positions are ignored and
may be anything, even ``inf``/``nan``); ``advantages`` is ``[B]``, one per sequence.

Normalisation. The loss is a SUM over this micro-batch divided by a GLOBAL ``normalizer``, so that
the losses (and gradients) of all micro-batches and data-parallel ranks add up to the whole-batch
loss. With ``l[i, t]`` the per-token loss (policy term plus ``kl_coef`` times the k3 estimate)::

    token:     sum_{i,t} l[i, t]     / global number of response tokens
    sequence:  sum_i mean_t l[i, t]  / global number of sequences
    constant:  sum_{i,t} l[i, t]     / (global number of sequences * max_response_length)

``constant`` is Dr.GRPO's: no length bias from per-sequence means, no batch-dependent token count.
:func:`normalizer_count` gives this micro-batch's share of the denominator; a row whose mask is all
zero (padding) adds nothing to either side. Two ways to drive Megatron's schedule:

* pre-normalised: sum the counts over micro-batches, all-reduce over the DP group, pass the total
  as ``normalizer``; nothing may divide again (Megatron without ``calculate_per_token_loss``
  divides by the number of micro-batches and averages over DP ranks);
* ``calculate_per_token_loss=True``: pass ``normalizer=1.0`` and return ``normalizer_count`` as the
  loss function's second output; Megatron sums it over micro-batches and DP ranks and divides the
  gradients by the total.

Metrics are detached tensors. ``pg_loss`` and ``kl`` (present when ``ref_logprobs`` is given,
whatever ``kl_coef``) are normalised like the loss, so they add up over micro-batches and ranks
the same way; ``clip_frac*`` and ``ratio_mean`` are means over this micro-batch's response tokens
(GSPO: over its sequences), whose number is ``stat_count``: average them with that weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from megatron_hybrid.config import check_int

__all__ = [
    "NORMALIZATIONS",
    "POLICY_LOSSES",
    "PolicyLossConfig",
    "PolicyLossFn",
    "compute_policy_loss",
    "dr_grpo_loss",
    "get_policy_loss",
    "grpo_loss",
    "gspo_loss",
    "k3_kl",
    "normalizer_count",
    "register_policy_loss",
]

NORMALIZATIONS = ("token", "sequence", "constant")

# exp() of a log-ratio beyond this overflows float32 soon after; verl clamps the same way (at 10).
# A clamped token has no gradient: for A > 0 the clip removes it anyway, but for A < 0 PPO keeps the
# unclipped -A r term, whose gradient the clamp drops. That only happens once a token's probability
# rose e^20-fold since sampling, far outside any trust region the clip is meant to keep.
_LOG_RATIO_CLAMP = 20.0


class PolicyLossFn(Protocol):
    """The signature every registered loss has (see the module docstring for shapes)."""

    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        cfg: PolicyLossConfig,
        *,
        ref_logprobs: Tensor | None = None,
        normalizer: Tensor | float,
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


POLICY_LOSSES: dict[str, PolicyLossFn] = {}
"""Registered losses by name; add one with :func:`register_policy_loss`."""

# name -> (normalisation used when the config leaves it None, whether no other one is allowed)
_LOSS_NORMALIZATION: dict[str, tuple[str, bool]] = {}


def register_policy_loss(
    name: str, *, normalization: str = "token", fixed: bool = False
) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering a loss under ``name``.

    Args:
        normalization: the normalisation a :class:`PolicyLossConfig` naming this loss gets when it
            leaves ``normalization`` unset.
        fixed: when True, a config naming this loss with any other normalisation is an error.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")

    def register(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        POLICY_LOSSES[name] = fn
        _LOSS_NORMALIZATION[name] = (normalization, fixed)
        return fn

    return register


def default_normalization(name: str) -> str | None:
    """The normalisation a config naming loss ``name`` gets when it leaves it unset (None for an
    unknown name: :class:`PolicyLossConfig` reports those)."""
    entry = _LOSS_NORMALIZATION.get(name)
    return entry[0] if entry else None


def get_policy_loss(name: str) -> PolicyLossFn:
    """The loss registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown policy loss {name!r}; valid names: {sorted(POLICY_LOSSES)}"
        ) from None


@dataclass
class PolicyLossConfig:
    """Settings shared by the policy losses."""

    loss: str = "grpo"
    """Registered loss name: ``grpo``, ``gspo`` or ``dr_grpo`` (or one added by
    :func:`register_policy_loss`)."""
    eps_low: float = 0.2
    """Lower clip bound: ratios below ``1 - eps_low`` stop pushing down negative-advantage
    samples. In [0, 1)."""
    eps_high: float = 0.2
    """Upper clip bound: ratios above ``1 + eps_high`` stop pushing up positive-advantage samples.
    DAPO's clip-higher raises it (e.g. 0.28). GSPO's sequence ratios stay near 1: the paper uses
    3e-4 / 4e-4 for the two bounds; nothing here changes them for you."""
    normalization: str | None = None
    """``token``, ``sequence`` or ``constant`` (see the module docstring). None takes the loss's
    default: ``grpo`` token (DAPO/verl), ``gspo`` sequence (the GSPO paper's 1/G sum_i 1/|y_i|),
    ``dr_grpo`` constant, which is also the only one it accepts."""
    kl_coef: float = 0.0
    """Weight of the k3 KL estimate to the reference policy; > 0 requires ``ref_logprobs``."""
    max_response_length: int | None = None
    """Response-token budget, the ``constant`` normalisation's per-sequence divisor (required by
    it); it should be the generation limit, not the longest response of a batch."""

    def __post_init__(self) -> None:
        if self.loss not in POLICY_LOSSES:
            raise ValueError(
                f"policy_loss.loss: unknown loss {self.loss!r}; valid names: {sorted(POLICY_LOSSES)}"
            )
        for name in ("eps_low", "eps_high", "kl_coef"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"policy_loss.{name} must be a finite number >= 0, got {value!r}")
        if self.eps_low >= 1:
            raise ValueError(
                f"policy_loss.eps_low must be < 1 (lower bound 1 - eps_low > 0), got {self.eps_low}"
            )
        default, fixed = _LOSS_NORMALIZATION[self.loss]
        if self.normalization is None:
            self.normalization = default
        elif self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"policy_loss.normalization must be one of {NORMALIZATIONS} or null, "
                f"got {self.normalization!r}"
            )
        elif fixed and self.normalization != default:
            raise ValueError(
                f"policy_loss.loss={self.loss!r} requires normalization={default!r}, got "
                f"{self.normalization!r} (leave it unset)"
            )
        mrl = self.max_response_length
        check_int("policy_loss.max_response_length", mrl, optional=True)
        if self.normalization == "constant" and mrl is None:
            raise ValueError(
                "policy_loss.normalization='constant' (Dr.GRPO) needs max_response_length"
            )


def normalizer_count(mask: Tensor, cfg: PolicyLossConfig) -> Tensor:
    """This micro-batch's share of the global normaliser, an int64 scalar on ``mask``'s device.

    ``token``: number of response tokens; ``sequence``: number of rows with at least one response
    token; ``constant``: that times ``cfg.max_response_length``. Sum it over micro-batches and
    all-reduce it over the data-parallel group to get the ``normalizer`` of the loss functions.
    """
    m = _as_bool_mask(mask)
    if cfg.normalization == "token":
        return m.sum(dtype=torch.int64)
    num_sequences = m.any(dim=-1).sum(dtype=torch.int64)
    if cfg.normalization == "sequence":
        return num_sequences
    return num_sequences * cfg.max_response_length


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0).

    Unbiased for the KL under samples of pi, and never negative, unlike ``logp - ref``.
    """
    d = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1


@register_policy_loss("grpo", normalization="token")
def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: PolicyLossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    normalizer: Tensor | float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level PPO clipped surrogate with one advantage per sequence (GRPO, DAPO).

    ``r[i, t] = exp(logp - old_logp)``, per-token loss
    ``-min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i)``, normalised by ``cfg.normalization``.
    """
    lp, old, ref, m, adv = _prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, cfg)
    ratio = torch.exp((lp - old).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    pg = _clipped_surrogate(ratio, adv, cfg)
    low, high = _clipped_regions(ratio.detach(), adv, cfg)
    num_tokens = m.sum().to(lp.dtype)
    stats = {
        "clip_frac_low": _masked_mean(low, m, num_tokens),
        "clip_frac_high": _masked_mean(high, m, num_tokens),
        "ratio_mean": _masked_mean(ratio.detach(), m, num_tokens),
        "stat_count": num_tokens,
    }
    return _finish(pg, lp, ref, m, cfg, cfg.normalization, normalizer, stats)


@register_policy_loss("gspo", normalization="sequence")
def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: PolicyLossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    normalizer: Tensor | float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO, in its GSPO-token form: a sequence-level ratio with per-token gradients.

    ``s_i = exp(mean_t (logp - old_logp))`` over sequence i's response tokens, and
    ``s[i, t] = sg[s_i] * exp(logp[i, t] - sg[logp[i, t]])``: its value is ``s_i`` at every token,
    its gradient ``s_i * grad logp[i, t]``. Per-token loss
    ``-min(s[i, t] A_i, clip(s[i, t], 1 - eps_low, 1 + eps_high) A_i)``, so the clip decision is
    made per sequence. With the default ``sequence`` normalisation the gradient is the paper's
    ``1/G sum_i s_i A_i 1/|y_i| sum_t grad logp[i, t]``; with a sequence-level advantage this is
    exactly GSPO (GSPO-token exists to allow per-token advantages later).
    """
    lp, old, ref, m, adv = _prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, cfg)
    lengths = m.sum(dim=-1)
    mean_log_ratio = (lp - old).sum(dim=-1) / lengths.clamp(min=1)
    seq_ratio = torch.exp(mean_log_ratio.detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    token_ratio = seq_ratio[:, None] * torch.exp(lp - lp.detach())
    # token_ratio's value is seq_ratio at every token, so the clip decision is per sequence.
    pg = _clipped_surrogate(token_ratio, adv, cfg)
    low, high = _clipped_regions(seq_ratio[:, None], adv, cfg)
    has_tokens = lengths > 0
    num_sequences = has_tokens.sum().to(lp.dtype)
    stats = {
        "clip_frac_low": _masked_mean(low[:, 0], has_tokens, num_sequences),
        "clip_frac_high": _masked_mean(high[:, 0], has_tokens, num_sequences),
        "ratio_mean": _masked_mean(seq_ratio, has_tokens, num_sequences),
        "stat_count": num_sequences,
    }
    return _finish(pg, lp, ref, m, cfg, cfg.normalization, normalizer, stats)


@register_policy_loss("dr_grpo", normalization="constant", fixed=True)
def dr_grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: PolicyLossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    normalizer: Tensor | float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr.GRPO: the GRPO surrogate with the ``constant`` normalisation (its only one).

    Pair it with unscaled advantages (``group_advantages(..., scale=False)``), as the paper does.
    ``cfg.normalization`` must be ``constant`` (a config with ``loss='dr_grpo'`` gets it by
    default); anything else is an error rather than silently renormalising.
    """
    if cfg.normalization != "constant":
        raise ValueError(
            f"dr_grpo needs normalization='constant', got {cfg.normalization!r}; build the "
            "config with loss='dr_grpo' to get it"
        )
    return grpo_loss(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        cfg,
        ref_logprobs=ref_logprobs,
        normalizer=normalizer,
    )


def compute_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: PolicyLossConfig,
    *,
    ref_logprobs: Tensor | None = None,
    normalizer: Tensor | float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss named by ``cfg.loss`` (same arguments and result as the registered functions)."""
    return get_policy_loss(cfg.loss)(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        cfg,
        ref_logprobs=ref_logprobs,
        normalizer=normalizer,
    )


# -- shared pieces -------------------------------------------------------------------------------
def _as_bool_mask(mask: Tensor) -> Tensor:
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _prepare(logprobs, old_logprobs, advantages, mask, ref_logprobs, cfg):
    """Check shapes, upcast to >= float32 and zero every masked position.

    Zeroing with ``where`` (not a multiply) keeps ``inf``/``nan`` at masked positions out of both
    the loss and the gradients.
    """
    m = _as_bool_mask(mask)
    named = {"logprobs": logprobs, "old_logprobs": old_logprobs}
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    for name, t in named.items():
        if t.shape != m.shape:
            raise ValueError(
                f"{name} must have the mask's shape {tuple(m.shape)}, got {tuple(t.shape)}"
            )
    if advantages.shape != m.shape[:1]:
        raise ValueError(
            f"advantages must be [B] = {tuple(m.shape[:1])} (one per sequence), "
            f"got {tuple(advantages.shape)}"
        )
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={cfg.kl_coef} > 0 needs ref_logprobs")
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)

    def clean(t: Tensor) -> Tensor:
        return torch.where(m, t.to(dtype), zero)

    ref = clean(ref_logprobs.detach()) if ref_logprobs is not None else None
    adv = advantages.detach().to(dtype)[:, None]
    return clean(logprobs), clean(old_logprobs.detach()), ref, m, adv


def _clipped_surrogate(ratio: Tensor, adv: Tensor, cfg: PolicyLossConfig) -> Tensor:
    """Per-token ``-min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A)``.

    Outside the clip range ``clamp`` has zero gradient, so a clipped token contributes none.
    """
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    return torch.maximum(-adv * ratio, -adv * clipped)


def _clipped_regions(ratio: Tensor, adv: Tensor, cfg) -> tuple[Tensor, Tensor]:
    """Where the clip removes the gradient: below ``1 - eps_low`` with A < 0, above with A > 0."""
    low = (ratio < 1 - cfg.eps_low) & (adv < 0)
    high = (ratio > 1 + cfg.eps_high) & (adv > 0)
    return low, high


def _masked_mean(values: Tensor, m: Tensor, count: Tensor) -> Tensor:
    return torch.where(m, values.to(count.dtype), 0).sum() / count.clamp(min=1)


def _aggregate(per_token: Tensor, m: Tensor, normalization: str, normalizer) -> Tensor:
    per_token = torch.where(m, per_token, 0)
    if normalization == "sequence":
        total = (per_token.sum(dim=-1) / m.sum(dim=-1).clamp(min=1)).sum()
    else:
        total = per_token.sum()
    return total / normalizer


def _finish(pg, lp, ref, m, cfg, normalization, normalizer, stats):
    if isinstance(normalizer, int | float) and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer!r}")
    pg_loss = _aggregate(pg, m, normalization, normalizer)
    metrics = {"pg_loss": pg_loss.detach()}
    loss = pg_loss
    if ref is not None:
        kl = _aggregate(k3_kl(lp, ref), m, normalization, normalizer)
        metrics["kl"] = kl.detach()
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl
    metrics["clip_frac"] = stats["clip_frac_low"] + stats["clip_frac_high"]
    metrics.update(stats)
    metrics["num_tokens"] = m.sum().to(lp.dtype)
    metrics["num_sequences"] = m.any(dim=-1).sum().to(lp.dtype)
    return loss, metrics
