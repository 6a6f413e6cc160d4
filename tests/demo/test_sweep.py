"""`megatron-hybrid demo --sweep`: learning rates per mode on the validation split."""

from __future__ import annotations

import json

import pytest

from tests.demo.cli import demo_cli
from tests.demo.test_pool import TINY


@pytest.mark.slow
def test_sweep_writes_every_mode_and_rate_with_the_best_on_validation(tmp_path):
    out = tmp_path / "sweep"
    proc = demo_cli(
        "--sweep",
        "sft",
        "--lrs",
        "1e-4,3e-3",
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
    for entry in data.values():
        assert [lr for lr, _ in entry["results"]] == [1e-4, 3e-3]
        assert all(0.0 <= acc <= 1.0 for _, acc in entry["results"])
        best = max(entry["results"], key=lambda x: (x[1], -x[0]))
        assert entry["best_lr"] == best[0]
    assert not (out / "results.json").exists()  # a sweep is not a benchmark run


def test_bad_sweep_rates_are_refused_before_any_work(tmp_path):
    proc = demo_cli("--sweep", "sft", "--lrs", "1e-3,fast", "--out", str(tmp_path / "x"))
    assert proc.returncode != 0
    assert "--lrs must be comma-separated numbers, got '1e-3,fast'" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_lrs_without_sweep_is_refused(tmp_path):
    proc = demo_cli("--lrs", "1e-3", "--out", str(tmp_path / "x"))
    assert proc.returncode != 0
    assert "--lrs only applies with --sweep sft|grpo" in proc.stderr
    assert not (tmp_path / "x").exists()
