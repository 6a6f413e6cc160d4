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
