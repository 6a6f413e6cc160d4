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


def test_logprobs_equal_a_plain_log_softmax_of_the_sampling_distribution(reference):
    # The ratio and the KL must be those of the distribution sampled from: softmax(logits / T)
    # over the real vocabulary (the padding rows are never sampled).
    _, ref = reference
    mask = ref["mask"].bool()
    for got, plain in (("logprobs", "plain"), ("logprobs_t07", "plain_t07")):
        torch.testing.assert_close(ref[got][mask], ref[plain][mask], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref["logprobs_t07"][mask], ref["logprobs"][mask], atol=1e-3)


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
    for key in ("logprobs", "logprobs_t07"):
        torch.testing.assert_close(got[key][mask], ref[key][mask], rtol=1e-5, atol=1e-5)
    assert got["sampled_equal"]


def test_padding_rows_of_the_vocabulary_are_masked_per_shard():
    import torch

    from megatron_hybrid.models.vocab import mask_padded_vocab

    logits = torch.arange(12.0).reshape(2, 6)  # ids first .. first + 5
    whole = mask_padded_vocab(logits, vocab_size=4)
    assert torch.isinf(whole[:, 4:]).all() and torch.equal(whole[:, :4], logits[:, :4])
    assert mask_padded_vocab(logits, vocab_size=6) is logits
    shard = mask_padded_vocab(logits, vocab_size=8, first=6)  # the second of two TP shards
    assert torch.equal(shard[:, :2], logits[:, :2]) and torch.isinf(shard[:, 2:]).all()
    assert mask_padded_vocab(logits, vocab_size=12, first=6) is logits
