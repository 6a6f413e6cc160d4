"""Singular values from Gram matrices and the spectral scores, against ``torch.linalg.svdvals``."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.scoring.spectra import (
    SCORE_FUNCTIONS,
    SpectralStats,
    get_score_function,
    gram_top_singular_values,
    randomized_top_singular_values,
    register_score,
)


def gaussian(rows: int, cols: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def decaying(rows: int, cols: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    """U diag(decay^i) V^T with random orthonormal U, V (float64)."""
    n = min(rows, cols)
    U = torch.linalg.qr(gaussian(rows, n, seed)).Q
    V = torch.linalg.qr(gaussian(cols, n, seed + 1)).Q
    s = decay ** torch.arange(n, dtype=torch.float64)
    return U @ torch.diag(s) @ V.mT


def reference(G: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k singular values of G in float64, zero-padded to k."""
    s = torch.linalg.svdvals(G.to(torch.float64))[:k]
    return torch.cat([s, s.new_zeros(k - s.numel())])


def gram(G: torch.Tensor, side: str) -> torch.Tensor:
    return G.mT @ G if side == "in" else G @ G.mT


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("shape", [(30, 12), (12, 30)], ids=["tall", "wide"])
@pytest.mark.parametrize(
    "dtype, rtol", [(torch.float64, 1e-6), (torch.float32, 1e-4)], ids=["fp64", "fp32"]
)
def test_gram_top_singular_values_match_svdvals(shape, side, dtype, rtol):
    G = gaussian(*shape, seed=1, dtype=dtype)
    k = min(shape)
    top = gram_top_singular_values(gram(G, side), k)
    assert top.dtype == torch.float64 and top.shape == (k,)
    torch.testing.assert_close(top, reference(G, k), rtol=rtol, atol=0)
    assert torch.all(top[:-1] >= top[1:]), "not descending"


@pytest.mark.parametrize("side", ["in", "out"])
def test_gram_k_beyond_the_rank_of_G_gives_zeros(side):
    G = gaussian(20, 3, seed=2) @ gaussian(3, 15, seed=3)  # rank 3
    k = 6
    top = gram_top_singular_values(gram(G, side), k)
    ref = torch.linalg.svdvals(G)
    torch.testing.assert_close(top[:3], ref[:3], rtol=1e-6, atol=0)
    # sqrt of round-off-sized (possibly negative, clamped) eigenvalues: ~sqrt(eps) * s_1.
    assert torch.all(top[3:] >= 0)
    assert torch.all(top[3:] <= 1e-6 * ref[0])


def test_gram_k_beyond_the_side_is_zero_padded():
    G = gaussian(7, 4, seed=4)
    top = gram_top_singular_values(G.mT @ G, 6)
    assert top.shape == (6,)
    torch.testing.assert_close(top[:4], torch.linalg.svdvals(G), rtol=1e-6, atol=0)
    assert torch.equal(top[4:], torch.zeros(2, dtype=torch.float64))


def test_gram_rejects_non_square_and_negative_k():
    with pytest.raises(ValueError, match="square"):
        gram_top_singular_values(torch.zeros(3, 4), 1)
    with pytest.raises(ValueError, match="k must be"):
        gram_top_singular_values(torch.zeros(3, 3), -1)


def _operator(G: torch.Tensor, calls: list[int] | None = None):
    def apply_gram(Q: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(Q.shape[1])
        return G.mT @ (G @ Q)

    return apply_gram


@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("shape", [(80, 50), (50, 80)], ids=["tall", "wide"])
def test_randomized_matches_svdvals_on_a_decaying_spectrum(shape, k):
    G = decaying(*shape, seed=5)
    top = randomized_top_singular_values(_operator(G), shape[1], k, seed=3)
    assert top.shape == (k,) and top.dtype == torch.float64
    torch.testing.assert_close(top, reference(G, k), rtol=1e-2, atol=0)


def test_randomized_makes_iters_plus_one_products_of_width_k_plus_oversample():
    G = decaying(40, 30, seed=6)
    calls: list[int] = []
    randomized_top_singular_values(_operator(G, calls), 30, 5, oversample=3, iters=2)
    assert calls == [8, 8, 8]
    calls.clear()
    # The subspace width is capped at dim; then the result is exact.
    top = randomized_top_singular_values(_operator(G, calls), 30, 25, oversample=10, iters=0)
    assert calls == [30]
    torch.testing.assert_close(top, reference(G, 25), rtol=1e-6, atol=0)


def test_randomized_same_seed_gives_identical_results():
    G = gaussian(40, 30, seed=7)
    a = randomized_top_singular_values(_operator(G), 30, 4, seed=11, iters=1)
    b = randomized_top_singular_values(_operator(G), 30, 4, seed=11, iters=1)
    c = randomized_top_singular_values(_operator(G), 30, 4, seed=12, iters=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # a flat spectrum and one iteration: the seed shows


def test_randomized_float32_and_zero_padding():
    G = decaying(30, 6, seed=8).float()
    top = randomized_top_singular_values(_operator(G), 6, 9, dtype=torch.float32)
    assert top.dtype == torch.float32 and top.shape == (9,)
    torch.testing.assert_close(top.double(), reference(G, 9), rtol=1e-4, atol=1e-6)


def test_zero_matrix_gives_zero_singular_values_and_scores():
    Z = torch.zeros(10, 6, dtype=torch.float64)
    assert torch.equal(gram_top_singular_values(Z.mT @ Z, 3), torch.zeros(3, dtype=torch.float64))
    top = randomized_top_singular_values(_operator(Z), 6, 3)
    assert torch.equal(top, torch.zeros(3, dtype=torch.float64))
    stats = SpectralStats(frobenius_sq=0.0, top_singular_values=top, rank=3)
    for name, fn in SCORE_FUNCTIONS.items():
        assert fn(stats) == 0.0, name


def _stats_and_svdvals(r: int) -> tuple[SpectralStats, torch.Tensor]:
    G = gaussian(25, 15, seed=9)
    s = torch.linalg.svdvals(G)
    stats = SpectralStats(frobenius_sq=G.square().sum().item(), top_singular_values=s[:r], rank=r)
    return stats, s


@pytest.mark.parametrize("r", [1, 4, 8])
def test_each_score_matches_a_hand_computation_from_svdvals(r):
    stats, s = _stats_and_svdvals(r)
    sq = s.square()
    expected = {
        "residual": sq[r:].sum().item(),
        "residual_frac": (sq[r:].sum() / sq.sum()).item(),
        "grad_norm": sq.sum().sqrt().item(),
        "stable_rank": (sq.sum() / sq[0]).item(),
    }
    assert set(expected) <= set(SCORE_FUNCTIONS)
    for name, value in expected.items():
        assert get_score_function(name)(stats) == pytest.approx(value, rel=1e-9), name


def test_residual_is_clamped_at_zero_when_rank_r_captures_everything():
    G = gaussian(12, 2, seed=10) @ gaussian(2, 9, seed=11)
    s = torch.linalg.svdvals(G)
    # frobenius_sq a hair below sum s_i^2 (round-off of a rank-2 G at r = 4).
    stats = SpectralStats(
        frobenius_sq=s.square().sum().item() * (1 - 1e-12), top_singular_values=s[:4], rank=4
    )
    assert get_score_function("residual")(stats) == 0.0
    assert get_score_function("residual_frac")(stats) == 0.0


def test_residual_needs_rank_singular_values():
    stats = SpectralStats(frobenius_sq=1.0, top_singular_values=torch.ones(2), rank=3)
    with pytest.raises(ValueError, match="needs 3 singular values"):
        get_score_function("residual")(stats)


def test_spectral_stats_validation():
    with pytest.raises(ValueError, match="1-D"):
        SpectralStats(frobenius_sq=1.0, top_singular_values=torch.ones(2, 2), rank=1)
    with pytest.raises(ValueError, match="rank"):
        SpectralStats(frobenius_sq=1.0, top_singular_values=torch.ones(2), rank=-1)
    with pytest.raises(ValueError, match="frobenius_sq"):
        SpectralStats(frobenius_sq=-1.0, top_singular_values=torch.ones(2), rank=1)


def test_unknown_score_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown spectral score 'residul'") as info:
        get_score_function("residul")
    for name in ("residual", "residual_frac", "grad_norm", "stable_rank"):
        assert name in str(info.value)


def test_register_score_adds_a_function_and_refuses_duplicates():
    try:

        @register_score("test_top1")
        def top1(stats: SpectralStats) -> float:
            return float(stats.top_singular_values[0])

        stats, s = _stats_and_svdvals(2)
        assert get_score_function("test_top1")(stats) == pytest.approx(s[0].item())
        with pytest.raises(ValueError, match="already registered"):
            register_score("residual")(top1)
    finally:
        SCORE_FUNCTIONS.pop("test_top1", None)
