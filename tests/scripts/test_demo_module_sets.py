"""scripts/demo_module_sets.py: module-set parsing, and a smoke run on the validation split."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.multirank import REPO_ROOT, child_env

SCRIPT = REPO_ROOT / "scripts" / "demo_module_sets.py"
CANDIDATES = [
    f"decoder.layers.{i}.{k}"
    for i in range(2)
    for k in (
        "self_attention.linear_qkv",
        "self_attention.linear_proj",
        "mlp.linear_fc1",
        "mlp.linear_fc2",
    )
]


def _script():
    spec = importlib.util.spec_from_file_location("demo_module_sets", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sets_parse_short_and_full_names_and_modes():
    mod = _script()
    sets = mod.parse_sets(
        [
            "a=L1.fc2, L0.qkv",
            "b=fft",
            "c=decoder.layers.1.self_attention.linear_proj",
            "d=hybrid-random",
        ],
        CANDIDATES,
    )
    assert sets == {
        "a": ["decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.mlp.linear_fc2"],
        "b": "fft",
        "c": ["decoder.layers.1.self_attention.linear_proj"],
        "d": "hybrid-random",
    }


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("a=L7.qkv", "unknown module 'L7.qkv'"),
        ("a=L0.attn", "unknown module 'L0.attn'"),
        ("noequals", "expected NAME=MODULES"),
        ("a=", "expected NAME=MODULES"),
    ],
)
def test_bad_sets_name_the_offending_entry(spec, match):
    with pytest.raises(ValueError, match=match):
        _script().parse_sets([spec], CANDIDATES)


def test_a_name_given_twice_is_refused():
    with pytest.raises(ValueError, match="name 'a' given twice"):
        _script().parse_sets(["a=fft", "a=lora"], CANDIDATES)


@pytest.mark.slow
def test_smoke_run_on_validation_writes_per_seed_accuracies(tmp_path):
    out = tmp_path / "sets"
    cmd = [
        sys.executable, str(SCRIPT), "--quick", "--seeds", "3,4",
        "--set", "pair=L0.qkv,L1.fc2", "--set", "lora=lora", "--out", str(out),
        f"cache_dir={tmp_path / 'cache'}", "tensorboard=false", "workers=1",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=child_env(2), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "module_sets.json").read_text())
    assert data["split"] == "validation" and data["seeds"] == [3, 4] and data["stage"] == "sft"
    pair = data["sets"]["pair"]
    assert pair["fft_modules"] == {
        s: ["decoder.layers.0.self_attention.linear_qkv", "decoder.layers.1.mlp.linear_fc2"]
        for s in ("3", "4")
    }
    assert data["sets"]["lora"]["fft_modules"] == {"3": [], "4": []}
    for entry in data["sets"].values():
        accs = list(entry["accuracy"].values())
        assert all(0.0 <= a <= 1.0 for a in accs)
        assert entry["mean"] == pytest.approx(sum(accs) / len(accs))
    assert "| pair |" in proc.stdout


# One-digit addition for both stages (100 problems, 20 + 20 held out): the quick base learns it
# within a few dozen steps, so grpo.start has something to reach.
_ONE_DIGIT = [
    "sft.task.op=+", "sft.task.symbol=+", "sft.task.max_digits=1",
    "sft.test_size=20", "sft.val_size=20", "sft.eval_subset=20",
    "grpo.task.op=+", "grpo.task.symbol=+", "grpo.task.min_digits=1", "grpo.task.max_digits=1",
    "grpo.test_size=20", "grpo.val_size=20", "grpo.eval_subset=20",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("target", "max_steps"), [(0.2, 400), (1.0, 30)])
def test_grpo_from_a_half_trained_start(tmp_path, target, max_steps):
    """grpo.start: fine-tune from the base until the target (checked every 20 steps and at the end
    of the schedule), then every run starts there; an unreachable target trains the whole
    schedule; a second run loads the same start from the cache."""
    out = tmp_path / "sets"
    cmd = [
        sys.executable, str(SCRIPT), "--quick", "--stage", "grpo", "--seeds", "0",
        "--set", "lora=lora", "--out", str(out),
        f"cache_dir={tmp_path / 'cache'}", "tensorboard=false", "workers=1",
        f"grpo.start.target_accuracy={target}", f"grpo.start.max_steps={max_steps}",
        "grpo.start.check_interval=20", *_ONE_DIGIT,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=child_env(2), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "module_sets.json").read_text())
    start = data["start"]
    assert start["target_accuracy"] == target and start["check_size"] == 20
    assert len(list((tmp_path / "cache").glob("start-*-tp1pp1-mp0.pt"))) == 1
    lora = data["sets"]["lora"]["accuracy"]["0"]
    if target < 1.0:
        # stopped at the first check that reached the target, well before the schedule's end
        assert start["accuracy"] >= target and start["steps"] % 20 == 0
        assert start["steps"] < max_steps
        assert lora > 0.05  # the runs start from the fine-tuned weights
    else:
        assert start["steps"] == max_steps or start["accuracy"] == 1.0
    assert f"start: the base after {start['steps']} steps" in proc.stdout
    again = subprocess.run(
        cmd, cwd=REPO_ROOT, env=child_env(2), capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "[grpo] start: loaded from cache" in again.stdout
    data2 = json.loads((out / "module_sets.json").read_text())
    assert data2["start"] == start
    assert data2["sets"]["lora"]["accuracy"] == data["sets"]["lora"]["accuracy"]
