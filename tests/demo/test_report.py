"""Report aggregation: paired differences and summaries against hand computations."""

from __future__ import annotations

import json
import math

import pytest

from megatron_hybrid.demo.report import paired, summarize, write_report


def _run(mode, seed, acc, stage="sft"):
    return {
        "mode": mode,
        "stage": stage,
        "seed": seed,
        "final_heldout_accuracy": acc,
        "reward_curve": [[1, 0.1], [2, 0.2]] if stage == "grpo" else [],
        "accuracy_curve": [[0, 0.0], [10, acc]],
        "loss_curve": [[1, 1.0]],
        "wall_time_s": 1.0,
        "trainable_params": 10,
        "optimizer_state_bytes": 80,
        "peak_memory_bytes": 1000,
        "training_state_bytes": 200,
    }


RUNS = [
    _run("fft", 0, 0.5),
    _run("fft", 1, 0.6),
    _run("fft", 2, 0.7),
    _run("lora", 0, 0.1),
    _run("lora", 1, 0.3),
    _run("lora", 2, 0.2),
    _run("hybrid", 0, 0.4),
    _run("hybrid", 1, 0.5),
    _run("hybrid", 2, 0.6),
]


def test_paired_difference_is_mean_and_standard_error_over_shared_seeds():
    m, se, n = paired(RUNS, "sft", "fft", "lora")
    diffs = [0.4, 0.3, 0.5]
    assert n == 3
    assert m == pytest.approx(sum(diffs) / 3)
    sd = math.sqrt(sum((d - 0.4) ** 2 for d in diffs) / 2)
    assert se == pytest.approx(sd / math.sqrt(3))


def test_paired_ignores_unshared_seeds_and_missing_modes():
    runs = RUNS + [_run("fft", 9, 1.0)]
    assert paired(runs, "sft", "fft", "lora")[2] == 3
    m, se, n = paired(runs, "sft", "fft", "nope")
    assert n == 0 and math.isnan(m)


def test_summarize_means_and_sds():
    s = summarize(RUNS)["sft"]
    assert s["lora"]["acc_mean"] == pytest.approx(0.2)
    assert s["lora"]["acc_sd"] == pytest.approx(0.1)
    assert s["hybrid"]["n"] == 3


def test_final_reward_is_the_mean_of_each_runs_last_steps():
    runs = [_run("fft", 0, 0.2, "grpo"), _run("fft", 1, 0.2, "grpo")]
    runs[0]["reward_curve"] = [[i, 0.0 if i <= 5 else 1.0] for i in range(1, 16)]  # last 10: 1.0
    runs[1]["reward_curve"] = [[1, 0.2], [2, 0.4]]  # fewer than 10 steps: all of them, 0.3
    assert summarize(runs)["grpo"]["fft"]["final_reward"] == pytest.approx((1.0 + 0.3) / 2)
    assert math.isnan(summarize(RUNS)["sft"]["fft"]["final_reward"])


def test_write_report_files(tmp_path):
    data = {
        "config": {"score": {"method": "probe_residual"}},
        "total_wall_time_s": 60.0,
        "plans": {},
        "runs": RUNS + [_run("fft", 0, 0.2, "grpo"), _run("lora", 0, 0.1, "grpo")],
    }
    paths = write_report(data, tmp_path)
    assert [p.name for p in paths] == ["results.json", "report.md", "report.png"]
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["mode"] == "fft"
    md = (tmp_path / "report.md").read_text()
    # hybrid closes (0.5 - 0.2) / (0.6 - 0.2) = 75% of the gap
    assert "| hybrid | 0.500" in md and "75%" in md
    assert "| 75% | - |" in md  # no reward column value for the SFT stage
    assert "| 0.150 |" in md  # GRPO: mean of the reward curve [0.1, 0.2]
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_share_closed_is_only_reported_for_a_significant_fft_lora_gap(tmp_path):
    noisy = [
        _run("fft", 0, 0.30),
        _run("fft", 1, 0.10),
        _run("lora", 0, 0.10),
        _run("lora", 1, 0.20),  # paired gap +0.05 +- 0.15: not significant
        _run("hybrid", 0, 0.2),
        _run("hybrid", 1, 0.2),
    ]
    data = {"config": {"score": {"method": "x"}}, "total_wall_time_s": 1.0, "runs": noisy}
    write_report(data, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "No FFT > LoRA gap of >= 3 paired SE" in md
    assert "%" not in md.split("FFT - LoRA gap")[0].split("| hybrid |")[1]


def test_problem_sets_are_disjoint_and_nonempty_for_small_and_large_spaces():
    from megatron_hybrid.data.arith import ArithTask
    from megatron_hybrid.demo.runner import make_problem_set

    for task in (
        ArithTask(op="*", min_digits=2, max_digits=3, b_min=2, b_max=9),
        ArithTask(op="+", min_digits=3, max_digits=4),
    ):
        ps = make_problem_set(task, 100, 50)
        assert len(ps.test) == 100 and len(ps.val) == 50 and len(ps.train) > 1000
        held = {p for p, _ in ps.test + ps.val}
        assert not held & {p for p, _ in ps.train}


def test_report_says_which_seeds_share_hybrids_run(tmp_path):
    shared = [
        dict(_run("hybrid-gradnorm", s, a), shared_with="hybrid") for s, a in ((0, 0.4), (1, 0.5))
    ]
    data = {
        "config": {"score": {"method": "x"}},
        "total_wall_time_s": 1.0,
        "runs": RUNS + shared + [_run("hybrid-gradnorm", 2, 0.1)],
    }
    write_report(data, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert (
        "hybrid - hybrid-gradnorm: +0.167 +- 0.167 (n=3). Same modules, seed and settings as hybrid for seed(s) 0, 1:"
        in md
    )


def test_report_says_where_the_grpo_runs_start_and_scores_at_the_start(tmp_path):
    data = {
        "config": {"score": {"method": "residual"}},
        "total_wall_time_s": 1.0,
        "starts": {
            "grpo": {"target_accuracy": 0.3, "steps": 260, "accuracy": 0.51, "check_size": 100}
        },
        "plans": {
            "sft": {"scores": {"a": {"params": 1, "residual": 2.0}}},
            "grpo": {"scores": {"b": {"params": 1, "residual": 3.0}}},
        },
        "runs": RUNS + [_run("fft", 0, 0.2, "grpo"), _run("lora", 0, 0.1, "grpo")],
    }
    write_report(data, tmp_path)
    md = (tmp_path / "report.md").read_text()
    sft, grpo = md.split("## Stage: grpo")
    assert "fine-tuned" not in sft.split("Top modules")[0]
    assert (
        "Every run starts from the base fine-tuned (all weights) on this stage's training split "
        "for 260 steps: greedy accuracy 0.510 on 100 validation prompts (target 0.3)."
    ) in grpo
    assert "Top modules by residual at the base (sft data): a (2)" in md
    assert "Top modules by residual at the start (grpo data): b (3)" in md
    assert "missed its target" not in md


def test_report_says_when_the_grpo_start_missed_its_target(tmp_path):
    """Before, a start stuck at 0.000 after all its steps was reported like any other."""
    data = {
        "config": {"score": {"method": "residual"}},
        "total_wall_time_s": 1.0,
        "starts": {
            "grpo": {"target_accuracy": 0.3, "steps": 600, "accuracy": 0.0, "check_size": 100}
        },
        "runs": RUNS + [_run("fft", 0, 0.2, "grpo"), _run("lora", 0, 0.1, "grpo")],
    }
    write_report(data, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "**The start missed its target** (0.000 < 0.3 after 600 steps)" in md
