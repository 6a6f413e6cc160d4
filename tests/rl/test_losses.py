"""Policy losses: hand values, a loop reference, split invariance, clipping, registry, config."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_hybrid.rl.losses import (
    POLICY_LOSSES,
    PolicyLossConfig,
    compute_policy_loss,
    get_policy_loss,
    k3_kl,
    normalizer_count,
    register_policy_loss,
)

DT = torch.float64
COMBOS = [
    ("grpo", "token"),
    ("grpo", "sequence"),
    ("grpo", "constant"),
    ("gspo", "token"),
    ("gspo", "sequence"),
    ("gspo", "constant"),
    ("dr_grpo", "constant"),
]


def make_cfg(loss="grpo", normalization=None, **kw) -> PolicyLossConfig:
    kw.setdefault("max_response_length", 8)
    return PolicyLossConfig(loss=loss, normalization=normalization, **kw)


def run(cfg, lp, old, adv, mask, ref=None, normalizer=None):
    if normalizer is None:
        normalizer = normalizer_count(mask, cfg)
    return compute_policy_loss(lp, old, adv, mask, cfg, ref_logprobs=ref, normalizer=normalizer)


def random_batch(seed, b=6, t=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=DT) * 3
    lp = (old + 0.4 * torch.randn(b, t, generator=g, dtype=DT)).requires_grad_(True)
    ref = old + 0.3 * torch.randn(b, t, generator=g, dtype=DT)
    adv = torch.randn(b, generator=g, dtype=DT)
    adv[1] = 0.0
    mask = torch.zeros(b, t, dtype=DT)
    for i in range(b):
        start = int(torch.randint(0, 3, (1,), generator=g))
        length = int(torch.randint(1, t - start + 1, (1,), generator=g))
        mask[i, start : start + length] = 1.0
    mask[2] = 0.0  # a padding row
    return lp, old, ref, adv, mask


# -- hand-computed values -------------------------------------------------------------------------
def hand_batch():
    """Row 0: ratios 1.5 and 0.9 with A=+1; row 1: ratio 0.5 with A=-2; last column is padding."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, -1.0]], dtype=DT)
    lp = (old + torch.tensor([[math.log(1.5), math.log(0.9), 0.0], [math.log(0.5), 0, 0]])).to(DT)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=DT)
    adv = torch.tensor([1.0, -2.0], dtype=DT)
    return lp.requires_grad_(True), old, adv, mask


@pytest.mark.parametrize(
    ("normalization", "expected"),
    # token losses: -min(1.5, 1.2) = -1.2, -0.9, and -min(-1.0, -1.6) = 1.6
    [("token", -0.5 / 3), ("sequence", (-1.05 + 1.6) / 2), ("constant", -0.5 / (2 * 4))],
)
def test_grpo_hand_values(normalization, expected):
    lp, old, adv, mask = hand_batch()
    cfg = make_cfg("grpo", normalization, max_response_length=4)
    loss, metrics = run(cfg, lp, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=DT))
    loss.backward()
    # Only the unclipped token (row 0, ratio 0.9) has a gradient: -A * r / divisor.
    divisor = {"token": 3, "sequence": 2 * 2, "constant": 8}[normalization]
    expected_grad = torch.zeros(2, 3, dtype=DT)
    expected_grad[0, 1] = -0.9 / divisor
    torch.testing.assert_close(lp.grad, expected_grad)
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(2 / 3, dtype=DT))
    torch.testing.assert_close(metrics["clip_frac_low"], torch.tensor(1 / 3, dtype=DT))
    torch.testing.assert_close(metrics["clip_frac_high"], torch.tensor(1 / 3, dtype=DT))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor(2.9 / 3, dtype=DT))
    assert "kl" not in metrics and metrics["num_tokens"] == 3 and metrics["num_sequences"] == 2


def test_gspo_hand_values():
    lp, old, adv, mask = hand_batch()
    cfg = make_cfg("gspo")  # sequence normalisation by default
    loss, metrics = run(cfg, lp, old, adv, mask)
    s0 = math.sqrt(1.5 * 0.9)  # geometric mean of the row-0 ratios, inside [0.8, 1.2]
    torch.testing.assert_close(loss, torch.tensor((-s0 + 1.6) / 2, dtype=DT))
    loss.backward()
    # Row 0: -A * s0 / |y_0| / G at each token; row 1 (ratio 0.5, A < 0) is clipped.
    expected_grad = torch.tensor([[-s0 / 4, -s0 / 4, 0.0], [0.0, 0.0, 0.0]], dtype=DT)
    torch.testing.assert_close(lp.grad, expected_grad)
    torch.testing.assert_close(metrics["clip_frac"], torch.tensor(0.5, dtype=DT))
    torch.testing.assert_close(metrics["ratio_mean"], torch.tensor((s0 + 0.5) / 2, dtype=DT))


def test_k3_kl_values_and_kl_term():
    lp = torch.tensor([[-1.0, -1.0]], dtype=DT)
    ref = torch.tensor([[-1.0, -1.0 + math.log(2)]], dtype=DT)
    torch.testing.assert_close(k3_kl(lp, ref), torch.tensor([[0.0, 1 - math.log(2)]], dtype=DT))
    cfg = make_cfg("grpo", "token", kl_coef=0.5)
    mask = torch.ones(1, 2, dtype=DT)
    loss, metrics = run(cfg, lp, lp.clone(), torch.zeros(1, dtype=DT), mask, ref=ref)
    torch.testing.assert_close(metrics["kl"], torch.tensor((1 - math.log(2)) / 2, dtype=DT))
    torch.testing.assert_close(loss, 0.5 * metrics["kl"])  # A = 0: only the KL term remains


# -- loop reference -------------------------------------------------------------------------------
def loop_reference(cfg, lp, old, ref, adv, mask):
    """Scalar-by-scalar loss with Python loops; differentiable (built from 0-d tensor ops)."""
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    b, t = mask.shape
    rows, n_tokens, n_seqs = [], 0, 0
    for i in range(b):
        idx = [j for j in range(t) if mask[i, j] != 0]
        if not idx:
            continue
        n_seqs += 1
        n_tokens += len(idx)
        seq_ratio = None
        if cfg.loss == "gspo":
            seq_ratio = math.exp(sum(float(lp[i, j].detach() - old[i, j]) for j in idx) / len(idx))
        terms = []
        for j in idx:
            if seq_ratio is None:
                r = torch.exp(lp[i, j] - old[i, j])
            else:  # value seq_ratio, gradient seq_ratio * d lp
                r = seq_ratio * torch.exp(lp[i, j] - lp[i, j].detach())
            a = float(adv[i])
            term = -torch.minimum(r * a, torch.clamp(r, lo, hi) * a)
            d = ref[i, j] - lp[i, j]
            terms.append(term + cfg.kl_coef * (torch.exp(d) - d - 1))
        rows.append(sum(terms) / len(idx) if cfg.normalization == "sequence" else sum(terms))
    divisor = {
        "token": n_tokens,
        "sequence": n_seqs,
        "constant": n_seqs * cfg.max_response_length,
    }[cfg.normalization]
    return sum(rows) / divisor


@pytest.mark.parametrize(("loss_name", "normalization"), COMBOS)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference(loss_name, normalization, seed):
    lp, old, ref, adv, mask = random_batch(seed)
    cfg = make_cfg(loss_name, normalization, eps_low=0.1, eps_high=0.3, kl_coef=0.05)
    loss, metrics = run(cfg, lp, old, adv, mask, ref=ref)
    (grad,) = torch.autograd.grad(loss, lp)
    expected = loop_reference(cfg, lp, old, ref, adv, mask)
    (expected_grad,) = torch.autograd.grad(expected, lp)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert not any(m.requires_grad for m in metrics.values())
    kl_cfg = make_cfg(loss_name, normalization, eps_low=0.1, eps_high=0.3)
    torch.testing.assert_close(
        metrics["pg_loss"], loop_reference(kl_cfg, lp, old, lp.detach(), adv, mask).detach()
    )


def test_masked_positions_may_hold_inf_and_nan():
    lp, old, ref, adv, mask = random_batch(3)
    dirty_lp = torch.where(mask.bool(), lp.detach(), torch.tensor(float("-inf"), dtype=DT))
    dirty_lp.requires_grad_(True)
    dirty_old = torch.where(mask.bool(), old, torch.tensor(float("nan"), dtype=DT))
    for name in ("grpo", "gspo"):
        cfg = make_cfg(name, kl_coef=0.1)
        loss, metrics = run(cfg, dirty_lp, dirty_old, adv, mask, ref=ref)
        (grad,) = torch.autograd.grad(loss, dirty_lp)
        clean, _ = run(cfg, lp, old, adv, mask, ref=ref)
        torch.testing.assert_close(loss, clean)
        assert torch.isfinite(grad).all() and (grad[mask == 0] == 0).all()
        assert all(torch.isfinite(v).all() for v in metrics.values())


# -- split invariance -----------------------------------------------------------------------------
@pytest.mark.parametrize(("loss_name", "normalization"), COMBOS)
def test_micro_batches_and_dp_ranks_sum_to_the_whole_batch(loss_name, normalization):
    lp, old, ref, adv, mask = random_batch(5, b=8)
    cfg = make_cfg(loss_name, normalization, eps_low=0.1, eps_high=0.25, kl_coef=0.02)
    whole, whole_metrics = run(cfg, lp, old, adv, mask, ref=ref)
    (whole_grad,) = torch.autograd.grad(whole, lp)

    # Two simulated DP ranks with two micro-batches each; the normaliser is the "all-reduced" sum.
    ranks = [[slice(0, 1), slice(1, 4)], [slice(4, 7), slice(7, 8)]]
    micro = [s for rank in ranks for s in rank]
    global_count = sum(normalizer_count(mask[s], cfg) for s in micro)
    assert global_count == normalizer_count(mask, cfg)
    per_rank = []
    for rank in ranks:
        per_rank.append(
            sum(run(cfg, lp[s], old[s], adv[s], mask[s], ref[s], global_count)[0] for s in rank)
        )
    total = sum(per_rank)
    (total_grad,) = torch.autograd.grad(total, lp)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(total_grad, whole_grad)

    # pg_loss and kl add up the same way.
    parts = [run(cfg, lp[s], old[s], adv[s], mask[s], ref[s], global_count)[1] for s in micro]
    for key in ("pg_loss", "kl"):
        torch.testing.assert_close(sum(p[key] for p in parts), whole_metrics[key])

    # Megatron's calculate_per_token_loss mode: raw sums, divided by the summed counts.
    raw = sum(run(cfg, lp[s], old[s], adv[s], mask[s], ref[s], 1.0)[0] for s in micro)
    torch.testing.assert_close(raw / global_count, whole)


# -- clipping -------------------------------------------------------------------------------------
def one_token_grad(ratio, advantage, eps_low, eps_high, loss="grpo"):
    old = torch.zeros(1, 1, dtype=DT)
    lp = torch.full((1, 1), math.log(ratio), dtype=DT, requires_grad=True)
    cfg = make_cfg(loss, "token", eps_low=eps_low, eps_high=eps_high)
    loss_value, metrics = run(cfg, lp, old, torch.tensor([advantage], dtype=DT), torch.ones(1, 1))
    loss_value.backward()
    return float(lp.grad), metrics


@pytest.mark.parametrize("loss", ["grpo", "gspo"])
def test_separate_low_and_high_clip_bounds(loss):
    # ratio 0.75, A < 0: clipped by eps_low=0.2 (bound 0.8), not by eps_low=0.3 (bound 0.7).
    grad, m = one_token_grad(0.75, -1.0, eps_low=0.2, eps_high=0.3, loss=loss)
    assert grad == 0 and m["clip_frac_low"] == 1 and m["clip_frac_high"] == 0
    grad, m = one_token_grad(0.75, -1.0, eps_low=0.3, eps_high=0.0, loss=loss)
    assert grad == pytest.approx(0.75) and m["clip_frac"] == 0
    # ratio 1.25, A > 0: clipped by eps_high=0.2, not by the clip-higher eps_high=0.28.
    grad, m = one_token_grad(1.25, 1.0, eps_low=0.3, eps_high=0.2, loss=loss)
    assert grad == 0 and m["clip_frac_high"] == 1 and m["clip_frac_low"] == 0
    grad, m = one_token_grad(1.25, 1.0, eps_low=0.0, eps_high=0.28, loss=loss)
    assert grad == pytest.approx(-1.25) and m["clip_frac"] == 0
    # The clip never binds on the side that lowers the objective: ratio 1.25 with A < 0.
    grad, m = one_token_grad(1.25, -1.0, eps_low=0.2, eps_high=0.2, loss=loss)
    assert grad == pytest.approx(1.25) and m["clip_frac"] == 0


@pytest.mark.parametrize("normalization", ["token", "sequence", "constant"])
def test_gspo_equals_grpo_on_one_token_sequences(normalization):
    g = torch.Generator().manual_seed(7)
    b, t = 5, 4
    old = -torch.rand(b, t, generator=g, dtype=DT)
    lp = (old + 0.5 * torch.randn(b, t, generator=g, dtype=DT)).requires_grad_(True)
    adv = torch.randn(b, generator=g, dtype=DT)
    mask = torch.zeros(b, t, dtype=DT)
    mask[torch.arange(b), torch.tensor([0, 3, 1, 2, 3])] = 1.0
    results = {}
    for name in ("grpo", "gspo"):
        cfg = make_cfg(name, normalization, eps_low=0.15, eps_high=0.25)
        loss, metrics = run(cfg, lp, old, adv, mask)
        results[name] = (loss, torch.autograd.grad(loss, lp)[0], metrics)
    for a, b_ in zip(results["grpo"][:2], results["gspo"][:2]):
        torch.testing.assert_close(a, b_)
    for key in ("clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "pg_loss"):
        torch.testing.assert_close(results["grpo"][2][key], results["gspo"][2][key])


# -- Dr.GRPO --------------------------------------------------------------------------------------
def test_dr_grpo_normaliser_and_loss():
    lp, old, _, adv, mask = random_batch(11)
    cfg = PolicyLossConfig(loss="dr_grpo", max_response_length=16)
    assert cfg.normalization == "constant"
    rows_with_tokens = int((mask.sum(1) > 0).sum())
    assert rows_with_tokens == mask.shape[0] - 1  # the padding row does not count
    count = normalizer_count(mask, cfg)
    assert count.dtype == torch.int64 and int(count) == rows_with_tokens * 16
    loss, _ = run(cfg, lp, old, adv, mask)
    token_cfg = make_cfg("grpo", "token")
    token_loss, _ = run(token_cfg, lp, old, adv, mask)
    # Same token sum, different divisor: number of tokens vs sequences * max_response_length.
    n_tokens = int(mask.sum())
    torch.testing.assert_close(loss, token_loss * n_tokens / (rows_with_tokens * 16))


def test_dr_grpo_refuses_other_normalisations():
    with pytest.raises(ValueError, match="requires normalization='constant'"):
        PolicyLossConfig(loss="dr_grpo", normalization="token", max_response_length=4)
    with pytest.raises(ValueError, match="needs max_response_length"):
        PolicyLossConfig(loss="dr_grpo")
    lp, old, _, adv, mask = random_batch(0)
    with pytest.raises(ValueError, match="dr_grpo needs normalization='constant'"):
        get_policy_loss("dr_grpo")(lp, old, adv, mask, make_cfg("grpo", "token"), normalizer=1.0)


def test_default_normalisations():
    assert PolicyLossConfig().normalization == "token"
    assert PolicyLossConfig(loss="gspo").normalization == "sequence"
    assert PolicyLossConfig(loss="gspo", normalization="token").normalization == "token"


def test_normalizer_counts():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    assert int(normalizer_count(mask, make_cfg("grpo", "token"))) == 4
    assert int(normalizer_count(mask, make_cfg("grpo", "sequence"))) == 2
    assert int(normalizer_count(mask, make_cfg("grpo", "constant", max_response_length=5))) == 10


def test_tensor_normalizer_and_bool_mask():
    lp, old, _, adv, mask = random_batch(2)
    cfg = make_cfg("grpo", "token")
    a, _ = run(cfg, lp, old, adv, mask, normalizer=float(mask.sum()))
    b, _ = run(cfg, lp, old, adv, mask.bool(), normalizer=torch.tensor(float(mask.sum())))
    torch.testing.assert_close(a, b)


def test_float32_inputs_stay_float32():
    lp, old, _, adv, mask = random_batch(2)
    loss, metrics = run(make_cfg(), lp.detach().float(), old.float(), adv.float(), mask.float())
    assert loss.dtype == torch.float32 and metrics["clip_frac"].dtype == torch.float32


# -- errors, registry, config ---------------------------------------------------------------------
def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown policy loss 'ppo'.*'dr_grpo', 'grpo', 'gspo'"):
        get_policy_loss("ppo")
    with pytest.raises(ValueError, match=r"unknown loss 'ppo'.*'dr_grpo', 'grpo', 'gspo'"):
        PolicyLossConfig(loss="ppo")


def test_shape_and_input_errors():
    lp, old, _, adv, mask = random_batch(0)
    cfg = make_cfg()
    with pytest.raises(ValueError, match="advantages must be"):
        run(cfg, lp, old, adv[:, None].expand_as(mask), mask)
    with pytest.raises(ValueError, match="old_logprobs must have the mask's shape"):
        run(cfg, lp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        run(make_cfg(kl_coef=0.1), lp, old, adv, mask)
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        run(cfg, lp, old, adv, mask, normalizer=0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps_low": 1.0}, "eps_low must be < 1"),
        ({"eps_high": -0.1}, "eps_high must be a finite number >= 0"),
        ({"kl_coef": float("nan")}, "kl_coef must be a finite number"),
        ({"eps_low": "0.2"}, "eps_low must be a finite number"),
        ({"normalization": "mean"}, "normalization must be one of"),
        ({"max_response_length": 0}, "max_response_length must be a positive integer"),
        ({"normalization": "constant"}, "needs max_response_length"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kwargs)


def test_registering_a_loss():
    @register_policy_loss("test_zero", normalization="sequence")
    def zero_loss(logprobs, old_logprobs, advantages, mask, cfg, *, ref_logprobs=None, normalizer):
        return (logprobs * 0).sum() / normalizer, {}

    try:
        cfg = PolicyLossConfig(loss="test_zero")
        assert cfg.normalization == "sequence" and get_policy_loss("test_zero") is zero_loss
        with pytest.raises(ValueError, match="already registered"):
            register_policy_loss("test_zero")(zero_loss)
    finally:
        POLICY_LOSSES.pop("test_zero")


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_gspo_token_form_has_the_sequence_level_gradient(normalization):
    """With one advantage per sequence, GSPO-token's gradient is GSPO's: differentiate s_i itself."""
    lp, old, _, adv, mask = random_batch(4)
    cfg = make_cfg("gspo", normalization, eps_low=0.1, eps_high=0.1)
    loss, _ = run(cfg, lp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, lp)
    m = mask.bool()
    lengths = m.sum(1)
    s = torch.exp(torch.where(m, lp - old, 0).sum(1) / lengths.clamp(min=1))
    per_seq = -torch.minimum(s * adv, s.clamp(0.9, 1.1) * adv)
    per_seq = torch.where(lengths > 0, per_seq, 0)
    weight = 1.0 if normalization == "sequence" else lengths  # token: each token carries -A s_i
    expected = (per_seq * weight).sum() / normalizer_count(mask, cfg)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, lp)[0])
