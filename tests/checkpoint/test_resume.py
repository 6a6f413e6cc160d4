"""Resume through the trainer: 3 steps + save + resume 3 steps gives the losses of 6 uninterrupted
steps, bitwise at the same layout and to float-rounding tolerance after a TP=2 -> TP=1 change."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.multirank import REPO_ROOT, child_env, launch, worker_path

pytestmark = pytest.mark.multirank


def _single(tmp, phase: str) -> dict:
    out = tmp / f"{phase}.pt"
    cmd = [
        sys.executable,
        str(worker_path("ckpt_resume")),
        "--dir",
        str(tmp),
        "--out",
        str(out),
        "--phase",
        phase,
    ]
    env = child_env()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-10000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    same = _single(tmp, "same")
    launch(
        worker_path("ckpt_resume"),
        2,
        "--dir",
        str(tmp),
        "--out",
        str(tmp / "stop.pt"),
        "--tp",
        "2",
        "--phase",
        "stop",
        timeout=600,
    )
    stop = torch.load(tmp / "stop.pt", weights_only=False)
    return same, stop, _single(tmp, "cross")


def test_resume_at_the_same_layout_is_exact(runs):
    same, _, _ = runs
    assert len(same["A"]) == 6 and same["A"][-1] < same["A"][0]
    assert same["B1"] == same["A"][:3]
    assert same["B2"] == same["A"][3:]


def test_save_interval_keep_last_and_latest_marker(runs):
    same, _, _ = runs
    assert same["run_listing"] == ["base", "iter_0000002", "iter_0000003", "latest"]
    assert same["latest"] == "iter_0000003"
    assert same["resumed_listing"] == ["iter_0000006", "latest"]  # the base stays where it was


def test_resume_after_a_tp2_to_tp1_layout_change(runs):
    same, stop, cross = runs
    assert stop["C1"] == pytest.approx(same["A"][:3], rel=1e-5)
    assert cross["C2"] == pytest.approx(same["A"][3:], rel=1e-5)
