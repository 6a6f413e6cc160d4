"""Distributed scores at TP=1, TP=2, PP=2, TP=2 x PP=2 and DP=2 equal a single-process reference
built from ``torch.linalg.svdvals`` of the full accumulated gradient / probe weight change."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.scoring.selection import Candidate, select_fft_modules
from tests.multirank import make_reference, run_against_reference
from tests.workers.score_layouts import SELECT

pytestmark = pytest.mark.multirank

LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["--tp", "2"]),
    "pp2": (2, ["--pp", "2"]),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
    "dp2": (2, []),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score_layouts")
    make_reference("score_layouts", tmp / "ref.pt")
    return tmp, torch.load(tmp / "ref.pt", weights_only=True)


def test_probe_restores_base_weights_bitwise(reference):
    assert reference[1]["probe_restored_bitwise"]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scores_and_selection_match_svdvals_reference(reference, layout):
    tmp, ref = reference
    nproc, args = LAYOUTS[layout]
    got = run_against_reference(
        "score_layouts", nproc, tmp / "ref.pt", tmp / f"{layout}.pt", *args, weights_only=False
    )
    for method, keys in (
        ("residual", ("residual", "residual_frac", "grad_norm", "stable_rank")),
        ("probe_residual", ("probe_residual", "probe_residual_frac", "epd")),
    ):
        table = got[method]["scores"]
        assert set(table) == set(ref["scores"]), "every candidate of every stage is in the table"
        for name, want in ref["scores"].items():
            for key in keys:
                assert table[name][key] == pytest.approx(want[key], rel=1e-4), (
                    f"{layout} {name} {key}"
                )
        want_sel = select_fft_modules(
            [
                Candidate(n, got[method]["shapes"][n][1], s[method])
                for n, s in ref["scores"].items()
            ],
            SELECT,
        )
        assert got[method]["selection"] == want_sel
        assert len(want_sel) == 4  # ceil(0.2 x 16)


def test_probe_groups_smaller_than_all_candidates_are_refused_at_pp2():
    from tests.multirank import launch, worker_path

    out = launch(worker_path("probe_groups_pp"), 2, timeout=180).stdout
    assert "OK rank 0" in out and "OK rank 1" in out, out
