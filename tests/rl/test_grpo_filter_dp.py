"""Dynamic sampling at DP=2: a rank whose groups are all filtered out still takes part in the
other ranks' update (it used to cancel the step on every rank); no kept group anywhere, no step."""

from __future__ import annotations

import pytest

from tests.multirank import make_reference, run_against_reference

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo_filter")
    make_reference("hybrid_model", tmp / "ref.pt")
    return tmp


def test_an_emptied_rank_joins_the_update(reference):
    got = run_against_reference("grpo_filter_dp", 2, reference / "ref.pt", reference / "one.pt")
    assert got["kept_groups"] == 2  # rank 1's two groups; rank 0's two were dropped
    assert got["changed"] and got["ranks_agree"]


def test_no_kept_group_no_update(reference):
    got = run_against_reference(
        "grpo_filter_dp", 2, reference / "ref.pt", reference / "none.pt", "--all-equal"
    )
    assert got["kept_groups"] == 0
    assert not got["changed"] and got["ranks_agree"] and got["loss_is_none"]
