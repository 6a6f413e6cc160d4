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
