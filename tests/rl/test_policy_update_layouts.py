"""A policy update on a fixed rollout is the same for any micro-batch split, DP split, TP and PP."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import make_reference, run_against_reference
from tests.workers.policy_update_layouts import METRICS

pytestmark = pytest.mark.multirank

CASES = {
    # name: (nproc, args)
    "micro2": (1, ["--micro-batch-size", "2"]),
    "dp2_micro2": (2, ["--micro-batch-size", "2"]),
    "tp2": (2, ["--tp", "2", "--micro-batch-size", "4"]),
    "pp2": (2, ["--pp", "2", "--micro-batch-size", "2"]),
}


CLIP = 1e-3  # far below the update's gradient norm: clipping always binds
VARIANTS = {
    # name: worker args
    "grpo": ["--loss", "grpo"],
    "gspo": ["--loss", "gspo"],
    "dr_grpo": ["--loss", "dr_grpo"],
    "grpo-clip": ["--loss", "grpo", "--clip-grad", str(CLIP)],
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, tmp_path_factory):
    """(variant, tmp dir, the TP=1 / DP=1 / one-micro-batch update). ``grpo-clip``: grpo with
    ``optim.clip_grad``, whose coefficient needs the norm over every shard and stage."""
    tmp = tmp_path_factory.mktemp(f"policy_{request.param}")
    make_reference("hybrid_model", tmp / "ref.pt")
    base = run_against_reference(
        "policy_update_layouts", 1, tmp / "ref.pt", tmp / "base.pt", *VARIANTS[request.param]
    )
    return request.param, tmp, base


@pytest.mark.parametrize("case", list(CASES))
def test_update_is_split_and_layout_invariant(reference, case):
    variant, tmp, want = reference
    if variant in ("gspo", "dr_grpo") and case in ("tp2", "pp2"):
        pytest.skip(
            "layouts are covered with grpo; gspo / dr_grpo check the micro-batch and DP splits"
        )
    nproc, args = CASES[case]
    got = run_against_reference(
        "policy_update_layouts",
        nproc,
        tmp / "ref.pt",
        tmp / f"{case}.pt",
        *VARIANTS[variant],
        *args,
    )
    # Computed on the last stage and broadcast: rank 0 holds them at PP=2 too.
    assert {"loss", *METRICS} <= set(got)
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(
            got[key], value, rtol=1e-5, atol=1e-5, msg=f"{variant} {case}: {key}"
        )


def test_clipping_binds_and_changes_the_update(tmp_path):
    """The ``grpo-clip`` variant is not the plain update: the norm exceeds ``CLIP`` and the
    clipped step moves the weights differently (with Adam's large eps the step scales with g)."""
    ref = tmp_path / "ref.pt"
    make_reference("hybrid_model", ref)
    plain, clipped = [
        run_against_reference("policy_update_layouts", 1, ref, tmp_path / f"{n}.pt", *VARIANTS[n])
        for n in ("grpo", "grpo-clip")
    ]
    assert float(plain["grad_norm"]) > 10 * CLIP
    torch.testing.assert_close(clipped["grad_norm"], plain["grad_norm"])  # reported before clipping
    moved = [k for k in plain if k != "grad_norm" and not torch.allclose(plain[k], clipped[k])]
    assert moved, "clip_grad did not change the update"
