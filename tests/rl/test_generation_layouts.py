"""Greedy generation and log-probabilities at TP=2, TP=2+SP and PP=2 equal TP=1."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import launch, worker_path

pytestmark = pytest.mark.multirank

LAYOUTS = {
    "tp2": (2, ["--tp", "2"]),
    "tp2_sp": (2, ["--tp", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pp", "2"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generation")
    launch(
        worker_path("hybrid_model"),
        1,
        "--reference",
        str(tmp / "ref.pt"),
        "--make-reference",
        timeout=300,
    )
    launch(
        worker_path("generation_layouts"),
        1,
        "--reference",
        str(tmp / "ref.pt"),
        "--out",
        str(tmp / "tp1.pt"),
        timeout=300,
    )
    return tmp, torch.load(tmp / "tp1.pt", weights_only=True)


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
    out = tmp / f"{layout}.pt"
    launch(
        worker_path("generation_layouts"),
        nproc,
        "--reference",
        str(tmp / "ref.pt"),
        "--out",
        str(out),
        *args,
        timeout=300,
    )
    got = torch.load(out, weights_only=True)
    assert torch.equal(got["tokens"], ref["tokens"])
    assert torch.equal(got["lengths"], ref["lengths"])
    mask = ref["mask"].bool()
    torch.testing.assert_close(got["logprobs"][mask], ref["logprobs"][mask], rtol=1e-5, atol=1e-5)
    assert got["sampled_equal"]
