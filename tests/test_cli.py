"""The ``megatron-hybrid`` command line, end to end: train, score, plan show, and exit status 2 with a
message for bad input.

Commands that build a model run as ``python -m megatron_hybrid.cli`` in a fresh interpreter: the
jobs create and destroy their own process group, which must not meet the one-rank group other tests
keep alive. Errors raised before any runtime exists are checked in process through ``main``.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hybrid.cli import main
from megatron_hybrid.scoring.plan_io import PlanArtifact, load_plan
from tests.multirank import child_env


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = child_env()
    return subprocess.run(
        [sys.executable, "-m", "megatron_hybrid.cli", *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def table_row(stdout: str, kind: str) -> list[str]:
    """The cells after ``kind`` in its row of the parameter table (``modules parameters %``)."""
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] == [kind]]
    assert len(rows) == 1, f"no single {kind!r} row in\n{stdout}"
    return rows[0][1:]


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> tuple[Path, PlanArtifact, str]:
    """``score --out tmp/plan.json`` with the residual score over 2 calibration batches."""
    cwd = tmp_path_factory.mktemp("cli")
    out = ok(
        cli(
            "score",
            "--out",
            "tmp/plan.json",
            "score.method=residual",
            "score.num_batches=2",
            cwd=cwd,
        )
    )
    return cwd, load_plan(cwd / "tmp" / "plan.json"), out


def test_train_prints_the_parameter_table_and_a_loss(tmp_path):
    out = ok(cli("train", "run.steps=2", cwd=tmp_path))
    assert table_row(out, "fft")[0] == "2" and table_row(out, "lora")[0] == "14"
    assert table_row(out, "total")[-1] == "100.00%"
    loss = re.search(r"^step\s+1\s+loss (\d+\.\d+)$", out, re.MULTILINE)
    assert loss and math.isfinite(float(loss[1])) and float(loss[1]) > 0
    assert re.search(r"trained steps 1-2 in [\d.]+ s; loss [\d.]+ -> [\d.]+", out)


def test_score_writes_a_loadable_plan_with_ceil_budget_times_n_fft_modules(scored):
    _, plan, out = scored
    assert len(plan.modules) == 16
    fft = plan.fft_names()
    assert len(fft) == math.ceil(0.1 * 16) == 2
    assert plan.score["method"] == "residual" and plan.calibration["num_batches"] == 2
    # The FFT modules are the two top residual scores; the rest get LoRA at the job's rank.
    best = sorted(plan.modules, key=lambda m: (-m.scores["residual"], m.name))[:2]
    assert fft == sorted(m.name for m in best)
    assert all((m.decision, m.rank) == ("lora", 4) for m in plan.modules if m.name not in fft)
    assert f"FFT: {', '.join(fft)}" in out and "plan written to tmp/plan.json" in out


def test_plan_show_prints_the_table_and_writes_a_png(scored):
    cwd, plan, _ = scored
    out = ok(cli("plan", "show", "tmp/plan.json", "--png", "tmp/h.png", cwd=cwd))
    header = out.splitlines()[0].split()
    assert header[:4] == ["module", "shape", "params", "residual"] and header[-1] == "decision"
    for m in plan.modules:
        assert re.search(rf"^{re.escape(m.name)}\s.*\s(FFT|lora r=4)\s*$", out, re.MULTILINE), (
            m.name
        )
    assert "2 of 16 modules FFT" in out and "heatmap written to tmp/h.png" in out
    assert (cwd / "tmp" / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_with_a_plan_file_uses_the_plan(scored):
    cwd, plan, _ = scored
    out = ok(cli("train", "plan_file=tmp/plan.json", "run.steps=2", cwd=cwd))
    fft_params = sum(m.params for m in plan.modules if m.decision == "fft")
    # Not the default peft spec's two linear_fc1 modules: the plan's own two, by parameter count.
    assert table_row(out, "fft")[:2] == ["2", f"{fft_params:,}"]
    assert table_row(out, "lora")[0] == "14"
    assert re.search(r"^step\s+1\s+loss \d+\.\d+$", out, re.MULTILINE)


def test_a_bad_override_exits_2_naming_the_key(capsys):
    # In process: the config is rejected before any process group exists.
    assert main(["train", "run.steps=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-hybrid train: error: ") and "run.steps" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            [
                "parallel.tensor_model_parallel_size=2",
                "parallel.sequence_parallel=true",
                "run.seq_length=15",
            ],
            "run.seq_length (15) must be a multiple of parallel.tensor_model_parallel_size (2)",
        ),
        (
            [
                "model.position_embedding_type=learned_absolute",
                "model.max_sequence_length=8",
                "run.seq_length=16",
            ],
            "run.seq_length (16) exceeds model.max_sequence_length (8)",
        ),
    ],
)
def test_a_layout_megatron_would_reject_mid_step_exits_2_up_front(capsys, overrides, message):
    # In process: refused before any process group exists (Megatron asserted inside step 1).
    assert main(["train", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_a_plan_for_another_architecture_exits_2_naming_the_field(scored):
    cwd, _, _ = scored
    proc = cli("train", "plan_file=tmp/plan.json", "model.hidden_size=64", "run.steps=1", cwd=cwd)
    assert proc.returncode == 2, proc.stderr
    assert "plan file tmp/plan.json was made for another architecture" in proc.stderr
    assert "hidden_size: plan has 128, model has 64" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_plan_file_that_is_not_json_exits_2_naming_the_file(tmp_path, capsys):
    # In process: ``plan show`` never creates a process group.
    path = tmp_path / "notes.json"
    path.write_text("fft: [decoder.layers.0.mlp.linear_fc1]\n")
    assert main(["plan", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"megatron-hybrid plan: error: plan file {path} is not valid JSON")


@pytest.mark.parametrize("value", ["*.jsonl", "2024", "on", "runs/a #1", "null", "a: b"])
def test_flag_values_stay_the_strings_given(value):
    """Before, flags were pasted into YAML overrides: ``--data '*.jsonl'`` was invalid YAML,
    ``--out 2024`` a number, ``--prompt-field on`` True and ``runs/a #1`` cut at the comment."""
    from megatron_hybrid.cli import _flag
    from megatron_hybrid.config import parse_overrides

    assert parse_overrides([_flag("data.path", value)]) == {"data": {"path": value}}
