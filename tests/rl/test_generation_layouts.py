"""Greedy generation and log-probabilities at TP=2, TP=2+SP and PP=2 equal TP=1."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import make_reference, run_against_reference

pytestmark = pytest.mark.multirank

LAYOUTS = {
    "tp2": (2, ["--tp", "2"]),
    "tp2_sp": (2, ["--tp", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pp", "2"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generation")
    make_reference("hybrid_model", tmp / "ref.pt")
    return tmp, run_against_reference("generation_layouts", 1, tmp / "ref.pt", tmp / "tp1.pt")


def test_reference_generation_is_well_formed(reference):
    _, ref = reference
    assert ref["sampled_equal"], "same seed must give the same samples"
    assert (ref["lengths"] > ref["prompt_lengths"]).all()
    mask = ref["mask"]
    assert mask.sum() == (ref["lengths"] - ref["prompt_lengths"]).sum()
    assert (ref["logprobs"] <= 0).all()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_tp1(reference, layout):
    tmp, ref = reference
    nproc, args = LAYOUTS[layout]
    got = run_against_reference(
        "generation_layouts", nproc, tmp / "ref.pt", tmp / f"{layout}.pt", *args
    )
    assert torch.equal(got["tokens"], ref["tokens"])
    assert torch.equal(got["lengths"], ref["lengths"])
    mask = ref["mask"].bool()
    torch.testing.assert_close(got["logprobs"][mask], ref["logprobs"][mask], rtol=1e-5, atol=1e-5)
    assert got["sampled_equal"]
