"""Every example YAML loads into the config of the command its header names."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from megatron_hybrid.config import load_config
from megatron_hybrid.demo.config import DemoConfig
from megatron_hybrid.rl.job import PostTrainConfig
from megatron_hybrid.scoring.job import ScoreJobConfig
from megatron_hybrid.train.quickstart import QuickstartConfig
from tests.multirank import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"
CONFIG_OF = {
    "demo.yaml": DemoConfig,
    "demo_deep.yaml": DemoConfig,
    "demo_grpo_seeds10.yaml": DemoConfig,
    "demo_sft_seeds10.yaml": DemoConfig,
    "grpo_custom.yaml": PostTrainConfig,
    "score.yaml": ScoreJobConfig,
    "tiny_hybrid.yaml": QuickstartConfig,
}


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(CONFIG_OF)


@pytest.mark.parametrize("name", sorted(CONFIG_OF))
def test_example_loads_and_says_how_to_run_it(name):
    path = EXAMPLES / name
    assert path.read_text().startswith("# Run:"), f"{name} must start with how to run it"
    flags = ["data.path=my.jsonl"] if name == "grpo_custom.yaml" else []  # its --data flag
    load_config(CONFIG_OF[name], str(path), flags)


def test_demo_example_spells_out_the_defaults():
    """examples/demo.yaml claims to be the defaults spelled out: keep it true."""
    assert asdict(load_config(DemoConfig, str(EXAMPLES / "demo.yaml"), [])) == asdict(DemoConfig())


@pytest.mark.parametrize(
    "name, stage_off", [("demo_sft_seeds10.yaml", "grpo"), ("demo_grpo_seeds10.yaml", "sft")]
)
def test_ten_seed_examples_change_only_the_seeds_and_one_stage(name, stage_off):
    """The ten-seed benchmarks claim demo.yaml's settings: only the seeds (the main job's 0-4 plus
    fresh 15-19, never the validation seeds 5-14) and the stage that is switched off differ."""
    got = asdict(load_config(DemoConfig, str(EXAMPLES / name), []))
    assert got["seeds"] == [0, 1, 2, 3, 4, 15, 16, 17, 18, 19]
    assert got[stage_off]["enabled"] is False
    want = asdict(DemoConfig())
    got["seeds"], got[stage_off]["enabled"] = want["seeds"], True
    assert got == want
