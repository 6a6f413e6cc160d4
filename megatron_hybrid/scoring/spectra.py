"""Top singular values from Gram matrices, and the spectral scores built on them.

Pure math, no ``torch.distributed``: :mod:`megatron_hybrid.scoring.sharded` wraps it for tensor
parallelism. For a matrix G (``out x in``) with singular values s_1 >= s_2 >= ...::

    ||G||_F^2 = sum_i s_i^2                     (all of the first-order signal)
    sum_{i<=r} s_i^2                            (what the best rank-r update can reach)
    residual  = ||G||_F^2 - sum_{i<=r} s_i^2    (what it cannot reach: the score)

The singular values come from a PSD Gram matrix M = G^T G (``in x in``) or G G^T (``out x out``),
whose eigenvalues are s_i^2, either formed explicitly (:func:`gram_top_singular_values`) or applied
as an operator (:func:`randomized_top_singular_values`), which is what lets a tensor-parallel caller
sum per-shard Grams with one all-reduce instead of gathering G.

Numerics: working through M squares G's condition number, so a singular value s_i carries an
absolute error of about ``eps * s_1^2 / s_i``. Both solvers therefore compute in float64 (then
``eps * s_1^2 / s_i`` is far below what float32 or bfloat16 inputs resolve). The residual
``||G||_F^2 - sum s_i^2`` cancels when G is nearly rank r; it is clamped at 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "SCORE_FUNCTIONS",
    "SpectralStats",
    "get_score_function",
    "grad_norm",
    "gram_top_singular_values",
    "randomized_top_singular_values",
    "register_score",
    "residual",
    "residual_frac",
    "stable_rank",
]


def _top_k_sqrt(eigenvalues: torch.Tensor, k: int) -> torch.Tensor:
    """sqrt of the k largest of ascending PSD eigenvalues, descending, zero-padded to length k."""
    s = eigenvalues.clamp_min(0).sqrt().flip(0)[:k]
    if s.numel() < k:
        s = torch.cat([s, s.new_zeros(k - s.numel())])
    return s


def gram_top_singular_values(gram: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k singular values of G from its Gram matrix M = G^T G or G G^T (``d x d``, PSD).

    Costs one dense symmetric eigendecomposition, O(d^3) time and O(d^2) memory.

    Args:
        gram: the PSD Gram matrix; only its lower triangle is read (``torch.linalg.eigvalsh``).
        k: how many singular values to return (``k >= 0``).

    Returns:
        float64 tensor ``[k]``, descending, on ``gram``'s device. Negative eigenvalues (round-off
        of a PSD matrix) are clamped to 0, and entries beyond ``d`` are 0, so a G of rank below k
        yields trailing zeros.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {tuple(gram.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return _top_k_sqrt(torch.linalg.eigvalsh(gram.to(torch.float64)), k)


def randomized_top_singular_values(
    apply_gram: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int,
    *,
    oversample: int = 8,
    iters: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Top-k singular values of G by block subspace iteration on M = G^T G (or G G^T).

    M (``dim x dim``, PSD) is only touched through ``apply_gram(Q) = M @ Q`` for ``Q``
    ``dim x q`` with ``q = min(dim, k + oversample)``. Q0 is Gaussian from
    ``torch.Generator().manual_seed(seed)`` on the CPU, so every rank that passes the same seed
    starts from the same Q0 whatever its device; Q is re-orthonormalised (QR) after every product,
    and the result is the Rayleigh-Ritz estimate: eigenvalues of ``T = Q^T M Q`` (``q x q``).

    Cost: ``iters + 1`` products with M (``iters`` power steps plus the Rayleigh-Ritz one), and
    QRs of ``dim x q``. When the caller's product needs communication (an all-reduce of the
    ``dim x q`` result over the TP group) that is O(dim * q) per product, against O(dim^2) for
    forming M and O(out * in) for gathering G.

    Accuracy: the i-th Ritz value's error decays roughly like ``(s_{q+1} / s_i)^(4 * iters)``, so a
    decaying spectrum and a few iterations suffice; a flat spectrum needs more oversampling.
    With ``q == dim`` the subspace is the whole space and the result is exact up to round-off.

    Args:
        apply_gram: ``Q -> M @ Q``; must return a ``dim x q`` tensor of ``dtype``.
        dim: the side of M.
        k: how many singular values to return (``k >= 0``).
        oversample: extra subspace columns beyond k.
        iters: power iterations before Rayleigh-Ritz (0: a plain randomized range finder).
        seed: seed of Q0; ranks that cooperate in ``apply_gram`` must pass the same one.
        dtype: working precision of Q.
        device: where Q lives (default CPU).

    Returns:
        tensor ``[k]`` of ``dtype``, descending, zero-padded beyond ``dim``.
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if k < 0 or oversample < 0 or iters < 0:
        raise ValueError(f"k, oversample and iters must be >= 0, got {k}, {oversample}, {iters}")
    q = min(dim, k + oversample)
    if q == 0:
        return torch.zeros(0, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(seed)
    Q = torch.randn(dim, q, generator=gen, dtype=dtype).to(device)
    Q = torch.linalg.qr(Q).Q
    for _ in range(iters):
        Q = torch.linalg.qr(apply_gram(Q)).Q
    T = Q.mT @ apply_gram(Q)
    # Symmetrise against round-off; eigvalsh would read only the lower triangle anyway.
    T = 0.5 * (T + T.mT)
    return _top_k_sqrt(torch.linalg.eigvalsh(T), k)


@dataclass(frozen=True, eq=False)
class SpectralStats:
    """What every spectral score needs to know about one module's matrix G.

    Compared by identity (``eq=False``): ``==`` on a tensor field would not give a bool.
    """

    frobenius_sq: float
    """||G||_F^2 (the sum of all squared singular values, not just the top ones)."""
    top_singular_values: torch.Tensor
    """The largest singular values of G, descending, 1-D (at least ``rank`` of them for residuals)."""
    rank: int
    """The LoRA rank r the module would get."""

    def __post_init__(self) -> None:
        if self.top_singular_values.ndim != 1:
            raise ValueError(
                "top_singular_values must be 1-D, got shape "
                f"{tuple(self.top_singular_values.shape)}"
            )
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.frobenius_sq < 0:
            raise ValueError(f"frobenius_sq must be >= 0, got {self.frobenius_sq}")


SCORE_FUNCTIONS: dict[str, Callable[[SpectralStats], float]] = {}
"""Registered spectral scores by name (larger = more in need of full fine-tuning)."""


def register_score(
    name: str,
) -> Callable[[Callable[[SpectralStats], float]], Callable[[SpectralStats], float]]:
    """Decorator adding a ``SpectralStats -> float`` function to :data:`SCORE_FUNCTIONS`."""

    def decorator(fn: Callable[[SpectralStats], float]) -> Callable[[SpectralStats], float]:
        if name in SCORE_FUNCTIONS:
            raise ValueError(f"score {name!r} is already registered")
        SCORE_FUNCTIONS[name] = fn
        return fn

    return decorator


def get_score_function(name: str) -> Callable[[SpectralStats], float]:
    """The registered score called ``name``; ValueError naming the valid ones otherwise."""
    try:
        return SCORE_FUNCTIONS[name]
    except KeyError:
        valid = ", ".join(sorted(SCORE_FUNCTIONS))
        raise ValueError(f"unknown spectral score {name!r}; valid names: {valid}") from None


@register_score("residual")
def residual(stats: SpectralStats) -> float:
    """||G||_F^2 - sum_{i<=r} s_i^2, clamped at 0: the squared norm a rank-r update cannot reach."""
    s = stats.top_singular_values
    if s.numel() < stats.rank:
        raise ValueError(
            f"residual at rank {stats.rank} needs {stats.rank} singular values, got {s.numel()}"
        )
    captured = s[: stats.rank].to(torch.float64).square().sum().item()
    return max(stats.frobenius_sq - captured, 0.0)


@register_score("residual_frac")
def residual_frac(stats: SpectralStats) -> float:
    """residual / ||G||_F^2 in [0, 1] (scale-free); 0 for a zero matrix."""
    if stats.frobenius_sq == 0:
        return 0.0
    return min(residual(stats) / stats.frobenius_sq, 1.0)


@register_score("grad_norm")
def grad_norm(stats: SpectralStats) -> float:
    """||G||_F."""
    return stats.frobenius_sq**0.5


@register_score("stable_rank")
def stable_rank(stats: SpectralStats) -> float:
    """||G||_F^2 / s_1^2 (between 1 and rank(G)); 0 for a zero matrix."""
    s = stats.top_singular_values
    if stats.frobenius_sq == 0:
        return 0.0
    if s.numel() == 0:
        raise ValueError("stable_rank needs the largest singular value, got none")
    s1_sq = s[0].to(torch.float64).square().item()
    return stats.frobenius_sq / s1_sq if s1_sq > 0 else 0.0
