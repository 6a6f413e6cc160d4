"""A GPTModel with a mixed plan (FFT + LoRA) at TP=2, TP=2+SP, PP=2, PP=2 x VPP=2, TP=2 x PP=2
and DP=2 gives the loss, trainable gradients and post-step trainables of the TP=1 reference."""

from __future__ import annotations

import pytest
import torch

from tests.multirank import make_reference, run_against_reference

pytestmark = pytest.mark.multirank

LAYOUTS = {
    "tp2": (2, ["--tp", "2"]),
    "tp2_sp": (2, ["--tp", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pp", "2"]),
    "pp2_vpp2": (2, ["--pp", "2", "--vpp", "2"]),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
    "dp2": (2, []),
}


def _run(tmp, nproc, args, name):
    return run_against_reference("hybrid_model", nproc, tmp / "ref.pt", tmp / f"{name}.pt", *args)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid_layouts")
    make_reference("hybrid_model", tmp / "ref.pt")
    return tmp, _run(tmp, 1, [], "tp1")


def test_reference_is_not_trivial(reference):
    _, ref = reference
    assert ref["loss_after"] < ref["loss"]
    lora_b = [k for k in ref["after"] if k.endswith("lora_B")]
    fft = [k for k in ref["after"] if k.endswith("linear_fc1.weight")]
    assert lora_b and fft
    assert all(ref["after"][k].abs().sum() > 0 for k in lora_b)
    assert all(ref["grads"][k].abs().sum() > 0 for k in ref["grads"])
    total, fft_params, lora_params = ref["summary"]
    assert fft_params > 0 and lora_params > 0 and fft_params + lora_params < total


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_tp1(reference, layout):
    tmp, ref = reference
    nproc, args = LAYOUTS[layout]
    got = _run(tmp, nproc, args, layout)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["loss_after"] == pytest.approx(ref["loss_after"], rel=1e-5)
    assert got["summary"] == ref["summary"]
    assert set(got["grads"]) == set(ref["grads"])
    for key, want in ref["grads"].items():
        torch.testing.assert_close(
            got["grads"][key], want, rtol=1e-5, atol=1e-5, msg=f"grad of {key}"
        )
    for key, want in ref["after"].items():
        torch.testing.assert_close(
            got["after"][key], want, rtol=1e-5, atol=1e-5, msg=f"{key} after the step"
        )
