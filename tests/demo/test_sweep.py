"""`megatron-hybrid demo --sweep`: learning rates per mode on the validation split."""

from __future__ import annotations

import json

import pytest

from tests.demo.cli import demo_cli
from tests.demo.test_pool import TINY


@pytest.mark.slow
def test_sweep_writes_every_mode_rate_multiplier_and_seed_with_the_best_mean(tmp_path):
    out = tmp_path / "sweep"
    proc = demo_cli(
        "--sweep",
        "sft",
        "--lrs",
        "3e-3",
        "--lora-mults",
        "1,3",
        "--sweep-seeds",
        "0,1",
        "--out",
        str(out),
        *TINY,
        "modes=[fft,lora]",
        f"cache_dir={tmp_path / 'cache'}",
        "workers=2",
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "sweep_sft.json").read_text())
    assert set(data) == {"fft", "lora"}
    # fft has no adapters: one point; lora crosses the rate with both multipliers
    assert [(r["lr"], r["lora_lr_mult"]) for r in data["fft"]["results"]] == [(3e-3, 1.0)]
    assert [(r["lr"], r["lora_lr_mult"]) for r in data["lora"]["results"]] == [
        (3e-3, 1.0),
        (3e-3, 3.0),
    ]
    for entry in data.values():
        for r in entry["results"]:
            assert set(r["per_seed"]) == {"0", "1"}
            assert all(0.0 <= acc <= 1.0 for acc in r["per_seed"].values())
            assert r["mean"] == pytest.approx(sum(r["per_seed"].values()) / 2)
        best = max(entry["results"], key=lambda r: (r["mean"], -r["lr"], -r["lora_lr_mult"]))
        assert entry["best"] == {k: best[k] for k in ("lr", "lora_lr_mult", "mean")}
    assert "best sft lora" in proc.stdout
    assert not (out / "results.json").exists()  # a sweep is not a benchmark run


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lrs", "1e-3,fast", "--lrs must be comma-separated numbers, got '1e-3,fast'"),
        ("--lora-mults", "", "--lora-mults must be comma-separated numbers, got ''"),
        ("--sweep-seeds", "0,1.5", "--sweep-seeds must be comma-separated integers, got '0,1.5'"),
    ],
)
def test_bad_sweep_values_are_refused_before_any_work(tmp_path, flag, value, message):
    proc = demo_cli("--sweep", "sft", flag, value, "--out", str(tmp_path / "x"))
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flag", ["--lrs", "--lora-mults", "--sweep-seeds"])
def test_sweep_flags_without_sweep_are_refused(tmp_path, flag):
    proc = demo_cli(flag, "1", "--out", str(tmp_path / "x"))
    assert proc.returncode != 0
    assert f"{flag} only applies with --sweep sft|grpo" in proc.stderr
    assert not (tmp_path / "x").exists()
