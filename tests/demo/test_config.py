"""Benchmark config: stage settings are validated on construction, with the key in the error."""

from __future__ import annotations

import pytest

from megatron_hybrid.config import load_config
from megatron_hybrid.demo.config import DemoConfig


@pytest.mark.parametrize("value", ["-1", "true", "'high'", ".nan"])
@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_bad_clip_grad_names_the_stage(stage, value):
    with pytest.raises(ValueError, match=rf"{stage}: clip_grad must be a number >= 0"):
        load_config(DemoConfig, None, [f"{stage}.clip_grad={value}"])


@pytest.mark.parametrize("value", ["0", "1", "1.5", "true", ".nan"])
def test_bad_adam_beta2_names_the_stage(value):
    with pytest.raises(ValueError, match=r"sft: adam_beta2 must be a number in \(0, 1\)"):
        load_config(DemoConfig, None, [f"sft.adam_beta2={value}"])


def test_clip_grad_reaches_both_stages():
    cfg = load_config(DemoConfig, None, ["sft.clip_grad=1.0", "grpo.clip_grad=0.5"])
    assert (cfg.sft.clip_grad, cfg.grpo.clip_grad) == (1.0, 0.5)
    assert DemoConfig().sft.clip_grad == 0.0  # the benchmark's default: no clipping


def test_stage_optim_carries_the_stage_schedule_and_clip():
    from megatron_hybrid.demo.config import GRPOStageConfig, ModeOptim, SFTStageConfig
    from megatron_hybrid.demo.runner import stage_optim

    stage = SFTStageConfig(clip_grad=1.0, adam_beta2=0.95)
    sft = stage_optim("sft", stage, ModeOptim(lr=3e-3, lora_lr_mult=3))
    assert (
        sft.lr,
        sft.lora_lr_mult,
        sft.warmup_steps,
        sft.decay,
        sft.clip_grad,
        sft.adam_beta2,
    ) == (
        3e-3,
        3,
        20,
        "cosine",
        1.0,
        0.95,
    )
    grpo = stage_optim("grpo", GRPOStageConfig(), ModeOptim(lr=1e-4))
    assert (grpo.warmup_steps, grpo.decay, grpo.clip_grad, grpo.adam_beta2) == (
        0,
        "constant",
        0.0,
        0.999,
    )


def test_grpo_start_defaults_and_overrides():
    start = DemoConfig().grpo.start
    assert start.enabled and start.target_accuracy == 0.3 and start.max_steps == 600
    cfg = load_config(
        DemoConfig, None, ["grpo.start.target_accuracy=0", "grpo.start.check_size=50"]
    )
    assert not cfg.grpo.start.enabled and cfg.grpo.start.check_size == 50


@pytest.mark.parametrize(
    ("override", "match"),
    [
        # Caught when the config is read, not minutes later in the runs (a zero eval interval
        # used to divide by zero after the warm-up; YAML's ``true`` used to count as 1).
        ("sft.eval_interval=0", r"sft: eval_interval must be a positive integer, got 0"),
        ("grpo.steps=2.5", r"grpo: steps must be a positive integer, got 2.5"),
        ("sft.steps=true", r"sft: steps must be a positive integer, got True"),
        ("sft.test_size=0", r"sft: test_size must be a positive integer"),
        ("grpo.eval_subset=-1", r"grpo: eval_subset must be a positive integer"),
        ("sft.batch_size=0", r"sft: batch_size must be a positive integer"),
        ("sft.warmup_steps=-1", r"sft: warmup_steps must be an integer >= 0, got -1"),
        ("warmup.steps=0", r"warmup: steps must be a positive integer"),
        ("warmup.lr=-1", r"warmup: lr must be a number > 0, got -1"),
        ("sft.modes.lora.lr=abc", r"sft.modes.lora.lr must be a number > 0, got 'abc'"),
        ("sft.lr=1e-3", r"'sft.lr'; .*learning rates are per mode: sft.modes.<mode>.lr"),
        ("lr=1e-3", r"'lr'; .*learning rates are per mode: sft.modes.<mode>.lr, grpo.modes"),
        (
            "sft.modes.hybrid.learning_rate=1e-3",
            r"unknown config key 'sft.modes.hybrid.learning_rate'; valid keys here: "
            r"lora_lr_mult, loraplus_lr_ratio, lr$",
        ),
        (
            "grpo.modes.hybrid.lora_lr_mult=0",
            r"grpo.modes.hybrid.lora_lr_mult must be a number > 0",
        ),
        ("model.num_layers=true", r"model.num_layers must be a positive integer, got True"),
        ("grpo.grpo.group_size=yes", r"grpo.group_size must be an integer >= 2, got True"),
        ("seeds=[0,a]", r"seeds\[1\] must be an integer >= 0, got 'a'"),
        ("seeds=[0,1,1]", r"seeds must be distinct \(paired comparisons\); repeated: \[1\]"),
        ("seeds=[]", r"seeds must be a non-empty list of integers"),
        ("seq_length=32", r"seq_length \(32\) exceeds model.max_sequence_length \(16\)"),
        ("workers=-1", r"workers must be an integer >= 0, got -1"),
        (
            "score.objective=policy_gradient",
            r"the benchmark scores the modules with the next-token",
        ),
        ("cache_dir=3", r"cache_dir must be a non-empty path string, got 3"),
        (
            "grpo.start.target_accuracy=1.5",
            r"grpo.start: target_accuracy must be a number in \[0, 1\], got 1.5",
        ),
        ("grpo.start.target_accuracy=-0.1", r"target_accuracy must be a number in \[0, 1\]"),
        ("grpo.start.lr=0", r"grpo.start: lr must be a number > 0, got 0"),
        ("grpo.start.max_steps=0", r"grpo.start: max_steps must be a positive integer, got 0"),
        (
            "grpo.start.check_interval=2.5",
            r"grpo.start: check_interval must be a positive integer, got 2.5",
        ),
        (
            "grpo.start.warmup_steps=600",
            r"grpo.start: warmup_steps must be an integer in \[0, max_steps\)",
        ),
        ("grpo.start.steps=3", r"unknown config key 'grpo.start.steps'"),
    ],
)
def test_bad_demo_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(DemoConfig, None, [override])


def test_check_int_refuses_bools_and_allows_null_when_optional():
    from megatron_hybrid.config import check_int

    check_int("k", 3)
    check_int("k", None, optional=True)
    check_int("k", 0, minimum=0)
    for bad in (True, 0, 2.0, "3", None):
        with pytest.raises(ValueError, match=r"^k must be a positive integer, got "):
            check_int("k", bad)
    with pytest.raises(ValueError, match=r"^k must be a positive integer or null, got False"):
        check_int("k", False, optional=True)


def test_rollout_seeds_differ_across_steps_and_data_parallel_ranks():
    from megatron_hybrid.rl.generation import rollout_seed

    for s in range(3):
        seeds = [rollout_seed(s, k, r) for k in range(1, 400) for r in range(64)]
        assert len(set(seeds)) == len(seeds)
    assert rollout_seed(2, 5, 0) == 2 * 100_003 + 5 * 7  # rank 0 keeps the benchmark's seeds


def test_cached_models_are_per_layout_including_virtual_pipeline_stages(single_rank_runtime):
    """A pp=2 file holds one chunk per rank, a pp=2 x vpp=2 file two: never the same cache entry."""
    from types import SimpleNamespace

    from megatron_hybrid.demo.runner import Demo
    from megatron_hybrid.runtime.distributed import ParallelConfig

    def name(**parallel):
        cfg = SimpleNamespace(cache_dir="c", out="o", parallel=ParallelConfig(**parallel))
        return Demo._cache_path(SimpleNamespace(cfg=cfg), "base", "k").name

    assert name() == "base-k-tp1pp1-mp0.pt"
    pp2 = name(pipeline_model_parallel_size=2)
    assert pp2 != name(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)


def test_optimizer_state_counts_the_fp32_master_copies_of_a_mixed_precision_optimizer():
    """Megatron's Float16OptimizerWithFloat16Params holds the fp32 masters as its parameters."""
    from types import SimpleNamespace

    import torch

    from megatron_hybrid.demo.runner import optimizer_state_bytes

    masters = [torch.zeros(10), torch.zeros(3, 2)]
    moments = {
        masters[0]: {
            "exp_avg": torch.zeros(10),
            "exp_avg_sq": torch.zeros(10),
            "step": torch.tensor(1.0),
        }
    }
    inner = SimpleNamespace(state=moments)
    mixed = SimpleNamespace(optimizer=inner, fp32_from_float16_groups=[[masters[0]], [masters[1]]])
    assert optimizer_state_bytes(SimpleNamespace(optimizer=inner)) == 80  # the moments
    assert optimizer_state_bytes(mixed) == 80 + 16 * 4
    assert optimizer_state_bytes(SimpleNamespace(chained_optimizers=[mixed, mixed])) == 2 * 144
