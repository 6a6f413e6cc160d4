"""A policy update on a fixed rollout is the same for any micro-batch split, DP split, TP and PP."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import launch, worker_path

pytestmark = pytest.mark.multirank

CASES = {
    # name: (nproc, args)
    "micro2": (1, ["--micro-batch-size", "2"]),
    "dp2_micro2": (2, ["--micro-batch-size", "2"]),
    "tp2": (2, ["--tp", "2", "--micro-batch-size", "4"]),
    "pp2": (2, ["--pp", "2", "--micro-batch-size", "2"]),
}


@pytest.fixture(scope="module", params=["grpo", "gspo", "dr_grpo"])
def reference(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"policy_{request.param}")
    launch(
        worker_path("hybrid_model"),
        1,
        "--reference",
        str(tmp / "ref.pt"),
        "--make-reference",
        timeout=300,
    )
    launch(
        worker_path("policy_update_layouts"),
        1,
        "--reference",
        str(tmp / "ref.pt"),
        "--out",
        str(tmp / "base.pt"),
        "--loss",
        request.param,
        timeout=300,
    )
    return request.param, tmp, torch.load(tmp / "base.pt", weights_only=True)


@pytest.mark.parametrize("case", list(CASES))
def test_update_is_split_and_layout_invariant(reference, case):
    loss, tmp, want = reference
    if loss != "grpo" and case in ("tp2", "pp2"):
        pytest.skip(
            "layouts are covered with grpo; gspo / dr_grpo check the micro-batch and DP splits"
        )
    nproc, args = CASES[case]
    out = tmp / f"{case}.pt"
    launch(
        worker_path("policy_update_layouts"),
        nproc,
        "--reference",
        str(tmp / "ref.pt"),
        "--out",
        str(out),
        "--loss",
        loss,
        *args,
        timeout=300,
    )
    got = torch.load(out, weights_only=True)
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(
            got[key], value, rtol=1e-5, atol=1e-5, msg=f"{loss} {case}: {key}"
        )
