"""Benchmark runs that would train the same model the same way are trained once."""

from __future__ import annotations

from megatron_hybrid.demo.config import ModeOptim
from megatron_hybrid.demo.runner import dedupe_jobs
from megatron_hybrid.peft.plan import HybridPlan, ModuleDecision

NAMES = ["decoder.layers.0.mlp.linear_fc1", "decoder.layers.0.self_attention.linear_qkv"]


def _plan(fft: set[str], seed: int) -> HybridPlan:
    return HybridPlan({n: ModuleDecision("fft" if n in fft else "lora") for n in NAMES}, seed=seed)


def test_identical_plans_share_a_run_and_anything_different_does_not():
    problems = object()
    opt = ModeOptim(lr=1e-3, lora_lr_mult=3.0)
    qkv = {NAMES[1]}
    jobs = [
        ("sft", "hybrid", 0, problems, _plan(qkv, 0), opt),
        ("sft", "hybrid-gradnorm", 0, problems, _plan(qkv, 0), opt),  # same run as 0
        ("sft", "hybrid-random", 0, problems, _plan({NAMES[0]}, 0), opt),  # other modules
        ("sft", "hybrid-gradnorm", 1, problems, _plan(qkv, 1), opt),  # other seed
        ("sft", "hybrid-gradnorm", 0, problems, _plan(qkv, 0), ModeOptim(lr=1e-3)),  # other lr
        ("grpo", "hybrid-gradnorm", 0, problems, _plan(qkv, 0), opt),  # other stage
        ("sft", "hybrid-gradnorm", 0, object(), _plan(qkv, 0), opt),  # other data
    ]
    unique, where = dedupe_jobs(jobs)
    assert where == [0, 0, 1, 2, 3, 4, 5]
    assert [j[1] for j in unique] == ["hybrid"] + [j[1] for j in jobs[2:]]
