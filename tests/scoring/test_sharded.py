"""Sharded spectral statistics: one process (no TP) here, TP=4 and TP=2 in a 4-rank worker.

The worker (``tests/workers/sharded_spectra.py``) compares column, gated-column, row and replicated
shards under both solvers with ``torch.linalg.svdvals`` of the full matrix, checks that every TP
rank holds identical stats, and that only all-reduces (smaller than a gather) were used.
"""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.scoring.sharded import CommStats, sharded_spectral_stats
from tests.multirank import launch, worker_path


def _decaying(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    n = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, n, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(cols, n, generator=gen, dtype=torch.float64)).Q
    return U @ torch.diag(0.7 ** torch.arange(n, dtype=torch.float64)) @ V.mT


@pytest.mark.parametrize("solver", ["exact", "randomized"])
@pytest.mark.parametrize("mode", ["column", "row", "replicated"])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)], ids=["tall", "wide"])
def test_without_tp_the_shard_is_the_full_matrix(shape, mode, solver):
    full = _decaying(*shape, seed=3).float()
    stats, comm = sharded_spectral_stats(full, mode, None, 5, solver=solver)
    ref = torch.linalg.svdvals(full.double())
    rtol = 1e-4 if solver == "exact" else 1e-2
    torch.testing.assert_close(stats.top_singular_values, ref[:5], rtol=rtol, atol=0)
    assert stats.frobenius_sq == pytest.approx(full.double().square().sum().item(), rel=1e-10)
    assert stats.rank == 5
    assert comm == CommStats(all_reduce_bytes=0, all_reduce_calls=0, gather_bytes=40 * 24 * 4)
    assert comm.ratio == 0.0


def test_a_tp_group_of_size_one_communicates_nothing(single_rank_runtime):
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    full = torch.randn(12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16)
    stats, comm = sharded_spectral_stats(full, "column", group, 3, rank=2, solver="randomized")
    assert comm.all_reduce_bytes == 0 and comm.gather_bytes == 12 * 10 * 2
    assert stats.rank == 2 and stats.top_singular_values.dtype == torch.float64
    ref = torch.linalg.svdvals(full.double())[:3]
    torch.testing.assert_close(stats.top_singular_values, ref, rtol=1e-2, atol=0)


def test_k_beyond_the_gram_side_is_zero_padded():
    full = torch.randn(9, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for solver in ("exact", "randomized"):
        stats, _ = sharded_spectral_stats(full, "column", None, 6, solver=solver)
        torch.testing.assert_close(
            stats.top_singular_values[:4], torch.linalg.svdvals(full), rtol=1e-8, atol=0
        )
        assert torch.equal(stats.top_singular_values[4:], torch.zeros(2, dtype=torch.float64))


def test_bad_arguments_are_rejected():
    x = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="parallel_mode"):
        sharded_spectral_stats(x, "colum", None, 1)
    with pytest.raises(ValueError, match="solver"):
        sharded_spectral_stats(x, "row", None, 1, solver="lanczos")
    with pytest.raises(ValueError, match="matrix"):
        sharded_spectral_stats(torch.zeros(4), "row", None, 1)


TP4_AND_TP2 = [
    f"tp={tp} {name} {mode} {solver}"
    for tp in (4, 2)
    for name in ("gaussian", "decaying", "low_rank", "tall", "wide")
    for mode in ("column", "gated", "row", "replicated")
    for solver in ("exact", "randomized")
    if not (solver == "randomized" and name == "gaussian")
]


@pytest.mark.multirank
def test_tp4_and_tp2_shards_match_svdvals_of_the_full_matrix_with_all_reduces_only():
    out = launch(worker_path("sharded_spectra"), 4, "--tp", "4", "2", timeout=300).stdout
    missing = [c for c in TP4_AND_TP2 if f"OK {c} " not in out]
    assert not missing, f"cases that did not report OK: {missing}\n{out}"
