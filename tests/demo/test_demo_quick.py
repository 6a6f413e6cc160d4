"""The ``--quick`` benchmark preset runs end to end and writes the documented results schema."""

from __future__ import annotations

import json

import pytest

from tests.demo.cli import demo_cli
from tests.multirank import REPO_ROOT, launch

pytestmark = pytest.mark.slow

FIELDS = {
    "mode",
    "stage",
    "seed",
    "final_heldout_accuracy",
    "reward_curve",
    "wall_time_s",
    "trainable_params",
    "optimizer_state_bytes",
    "peak_memory_bytes",
}


def test_demo_quick_smoke(tmp_path):
    out = tmp_path / "demo"
    proc = demo_cli(
        "--quick",
        "--out",
        str(out),
        f"cache_dir={tmp_path / 'cache'}",
        "tensorboard=false",
        threads=2,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    assert {(r["stage"], r["mode"]) for r in runs} == {
        (s, m)
        for s in ("sft", "grpo")
        for m in ("fft", "lora", "hybrid", "hybrid-random", "hybrid-gradnorm")
    }
    for r in runs:
        assert FIELDS <= set(r)
        assert 0.0 <= r["final_heldout_accuracy"] <= 1.0
        assert r["trainable_params"] > 0 and r["optimizer_state_bytes"] > 0
    by_mode = {r["mode"]: r for r in runs if r["stage"] == "sft"}
    assert (
        by_mode["lora"]["trainable_params"]
        < by_mode["hybrid"]["trainable_params"]
        < by_mode["fft"]["trainable_params"]
    )
    assert all(r["reward_curve"] for r in runs if r["stage"] == "grpo")
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    # the GRPO runs start from the half-trained start (the quick preset: its 40-step schedule)
    start = data["starts"]["grpo"]
    assert start["steps"] == 40 or start["accuracy"] >= start["target_accuracy"]
    assert "Every run starts from the base fine-tuned" in (out / "report.md").read_text()
    assert "sft" not in data["starts"]
    # a mode whose plan equals hybrid's for a seed reports hybrid's run, marked as shared
    by_key = {(r["stage"], r["mode"], r["seed"]): r for r in runs}
    for (stage, mode, seed), r in by_key.items():
        if mode == "hybrid-gradnorm":
            h = by_key[(stage, "hybrid", seed)]
            same = r["fft_modules"] == h["fft_modules"]
            assert (r.get("shared_with") == "hybrid") == same
            if same:
                assert r["accuracy_curve"] == h["accuracy_curve"]


def test_demo_quick_under_torchrun_at_dp2_writes_one_cached_base(tmp_path):
    """Two data-parallel ranks share the base and GRPO-start cache files: one writer per
    model-parallel rank, no temporary file left behind, and the results written once (by rank 0)."""
    out, cache = tmp_path / "demo", tmp_path / "cache"
    launch(
        REPO_ROOT / "megatron_hybrid" / "cli.py",
        2,
        "demo", "--quick", "--out", str(out), f"cache_dir={cache}", "tensorboard=false",
        timeout=900,
    )  # fmt: skip
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 3, names  # no temporary file left behind
    assert [n.split("-")[0] + n[n.index("-tp") :] for n in names if n.endswith(".pt")] == [
        "base-tp1pp1-mp0.pt",
        "start-tp1pp1-mp0.pt",
    ]
    assert sum(n.startswith("start-") and n.endswith(".json") for n in names) == 1
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 10 and all(0.0 <= r["final_heldout_accuracy"] <= 1.0 for r in runs)
