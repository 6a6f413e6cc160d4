"""The plan artifact: save/load round trip, atomic writes, validation errors that name the file and
the entry, the architecture check, and the conversion to a HybridPlan.

Pure file and dataclass logic; no model is built.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.plan import ModuleDecision
from megatron_hybrid.scoring import plan_io
from megatron_hybrid.scoring.plan_io import (
    SCHEMA_VERSION,
    ModuleEntry,
    PlanArtifact,
    load_plan,
    model_fingerprint,
    save_plan,
)
from megatron_hybrid.scoring.run import ScoreConfig, describe
from megatron_hybrid.scoring.selection import SelectionConfig
from tests.tiny_hybrid import MODEL

LORA = LoRAConfig(rank=4, alpha=8.0)


def entry(layer: int, kind: str, decision: str, rank: int | None = None) -> ModuleEntry:
    path = {"linear_qkv": "self_attention", "linear_proj": "self_attention"}.get(kind, "mlp")
    return ModuleEntry(
        name=f"decoder.layers.{layer}.{path}.{kind}",
        kind=kind,
        shape=[64, 32],
        params=2048,
        scores={"residual": 0.25 + layer, "random": 0.1 * layer, "grad_norm": 1e-7},
        decision=decision,
        rank=rank,
    )


def artifact(**kw) -> PlanArtifact:
    fields = {
        "model": model_fingerprint(MODEL),
        "budget": asdict(SelectionConfig(budget=0.25)),
        "score": {"method": "residual", "solver": "exact", "rank": 4},
        "calibration": {
            "objective": "nll",
            "num_batches": 2,
            "layout": {"tensor_model_parallel_size": 1},
        },
        "lora": asdict(LORA),
        "modules": [
            entry(0, "linear_qkv", "lora", 4),
            entry(0, "linear_fc1", "fft"),
            entry(1, "linear_fc2", "lora", 2),
            entry(1, "linear_proj", "frozen"),
        ],
        "seed": 17,
    }
    return PlanArtifact(**(fields | kw))


def write_json(tmp_path: Path, data, name: str = "plan.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def plan_dict() -> dict:
    return artifact().to_dict()


# -- round trip and atomic writes -------------------------------------------------------------
def test_save_then_load_gives_an_equal_artifact(tmp_path):
    plan = artifact()
    path = save_plan(plan, tmp_path / "sub" / "plan.json")
    assert path == tmp_path / "sub" / "plan.json"
    assert load_plan(path) == plan


def test_the_file_is_json_with_the_schema_version_first():
    d = plan_dict()
    assert list(d)[:2] == ["schema_version", "created_by"]
    assert d["schema_version"] == SCHEMA_VERSION
    assert d["created_by"].startswith("megatron-hybrid ")


def test_an_artifact_built_like_the_score_job_round_trips_equal(tmp_path):
    plan = artifact(score=describe(ScoreConfig(method="residual")) | {"rank": 4})
    assert load_plan(save_plan(plan, tmp_path / "plan.json")) == plan


def test_save_leaves_no_temporary_file(tmp_path):
    save_plan(artifact(), tmp_path / "plan.json")
    save_plan(artifact(seed=3), tmp_path / "plan.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    assert load_plan(tmp_path / "plan.json").seed == 3


def test_an_existing_plan_is_untouched_when_writing_fails(tmp_path, monkeypatch):
    path = save_plan(artifact(), tmp_path / "plan.json")
    before = path.read_bytes()

    def half_written_dump(obj, f, **kw):
        f.write('{"schema_version": 1, "mod')
        raise OSError("disk full")

    monkeypatch.setattr(plan_io.json, "dump", half_written_dump)
    with pytest.raises(OSError, match="disk full"):
        save_plan(artifact(seed=99), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_the_plan_gets_the_permissions_of_an_ordinarily_written_file(tmp_path):
    ordinary = tmp_path / "ordinary.json"
    ordinary.write_text("{}")
    path = save_plan(artifact(), tmp_path / "plan.json")
    assert oct(path.stat().st_mode & 0o777) == oct(ordinary.stat().st_mode & 0o777)


# -- load errors ------------------------------------------------------------------------------
def test_a_missing_file_is_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"plan file .*nope\.json does not exist"):
        load_plan(tmp_path / "nope.json")


def test_a_file_that_is_not_json_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("model: {hidden_size: 32}\n")
    with pytest.raises(ValueError, match=rf"plan file {re.escape(str(path))} is not valid JSON"):
        load_plan(path)


def test_a_binary_file_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "h.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ValueError, match=rf"plan file {re.escape(str(path))}"):
        load_plan(path)


def test_a_top_level_that_is_not_an_object_is_an_error(tmp_path):
    path = write_json(tmp_path, [plan_dict()])
    with pytest.raises(
        ValueError, match=rf"plan file {re.escape(str(path))}: top level must be an object"
    ):
        load_plan(path)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_a_wrong_schema_version_is_an_error(tmp_path, version):
    d = plan_dict()
    if version is None:
        del d["schema_version"]
    else:
        d["schema_version"] = version
    path = write_json(tmp_path, d)
    with pytest.raises(ValueError, match=rf"has schema_version {version!r}; this version reads 1"):
        load_plan(path)


def test_missing_keys_are_listed(tmp_path):
    d = plan_dict()
    del d["lora"], d["modules"]
    path = write_json(tmp_path, d)
    with pytest.raises(ValueError, match=r"lacks keys \['lora', 'modules'\]"):
        load_plan(path)


def test_seed_and_created_by_are_optional(tmp_path):
    d = plan_dict()
    del d["seed"], d["created_by"]
    plan = load_plan(write_json(tmp_path, d))
    assert plan.seed == 0 and plan.created_by == "unknown"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda m: m.pop("decision"),
            r"modules\[2\]: .*missing 1 required positional argument: 'decision'",
        ),
        (lambda m: m.update(colour="red"), r"modules\[2\]: .*unexpected keyword argument 'colour'"),
        (
            lambda m: m.update(decision="partial"),
            r"modules\[2\] \(decoder\.layers\.1\.mlp\.linear_fc2\): unknown decision 'partial'",
        ),
        (
            lambda m: m.update(decision="fft", rank=4),
            r"modules\[2\] \(decoder\.layers\.1\.mlp\.linear_fc2\): rank 4 is given, but a fft",
        ),
        (lambda m: m.update(rank=0), r"modules\[2\] .*rank must be a positive integer, got 0"),
        (lambda m: m.update(shape=5), r"modules\[2\] .*shape must be \[out, in\].*got 5"),
        (lambda m: m.update(params="many"), r"modules\[2\] .*params must be a non-negative"),
        (lambda m: m.update(scores={"residual": "high"}), r"modules\[2\] .*scores must map"),
        (lambda m: m.update(name=""), r"modules\[2\] \(\): name must be a non-empty string"),
    ],
    ids=[
        "missing-field",
        "unknown-field",
        "bad-decision",
        "fft-with-rank",
        "rank-0",
        "shape",
        "params",
        "scores",
        "name",
    ],
)
def test_a_bad_module_entry_names_its_index(tmp_path, change, message):
    d = plan_dict()
    change(d["modules"][2])
    path = write_json(tmp_path, d)
    with pytest.raises(ValueError, match=rf"plan file {re.escape(str(path))}: {message}"):
        load_plan(path)


def test_a_module_entry_that_is_not_an_object_names_its_index(tmp_path):
    d = plan_dict()
    d["modules"][1] = "decoder.layers.0.mlp.linear_fc1"
    with pytest.raises(ValueError, match=r"modules\[1\]"):
        load_plan(write_json(tmp_path, d))


def test_a_module_listed_twice_names_both_entries(tmp_path):
    """A name listed as fft and again as lora loaded fine: ``plan show`` said FFT, training
    applied the last entry (LoRA)."""
    d = plan_dict()
    d["modules"].append(dict(d["modules"][0], decision="lora", rank=2))
    name = re.escape(d["modules"][0]["name"])
    with pytest.raises(
        ValueError, match=rf"modules\[{len(d['modules']) - 1}\] \({name}\) repeats modules\[0\]"
    ):
        load_plan(write_json(tmp_path, d))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("seed", "x", "seed must be an integer, got 'x'"),
        ("seed", 1.5, "seed must be an integer"),
        ("modules", {"a": 1}, "modules must be a list"),
        ("score", [], "score must be an object"),
    ],
)
def test_bad_top_level_fields_are_named(tmp_path, key, value, message):
    d = plan_dict()
    d[key] = value
    path = write_json(tmp_path, d)
    with pytest.raises(
        ValueError, match=rf"plan file {re.escape(str(path))}: {re.escape(message)}"
    ):
        load_plan(path)


def test_a_bad_lora_section_is_an_error(tmp_path):
    d = plan_dict()
    d["lora"]["rank"] = 0
    with pytest.raises(
        ValueError, match=r"plan file .*: lora: lora\.rank must be a positive integer"
    ):
        load_plan(write_json(tmp_path, d))


# -- architecture check -----------------------------------------------------------------------
def test_check_model_accepts_the_same_architecture():
    artifact().check_model(MODEL)
    # num_query_groups None means one group per head; the fingerprint stores the resolved count.
    mha = replace(MODEL, num_query_groups=None)
    artifact(model=model_fingerprint(mha)).check_model(replace(MODEL, num_query_groups=4))


def test_check_model_ignores_fields_that_do_not_change_the_modules():
    artifact().check_model(replace(MODEL, max_sequence_length=64, params_dtype="bfloat16"))


def test_check_model_names_every_mismatched_field():
    other = replace(MODEL, hidden_size=64, num_layers=4)
    with pytest.raises(ValueError) as info:
        artifact().check_model(other, source="plan file p.json")
    msg = str(info.value)
    assert msg.startswith("plan file p.json was made for another architecture: ")
    assert "num_layers: plan has 2, model has 4" in msg
    assert "hidden_size: plan has 32, model has 64" in msg
    assert "ffn_hidden_size" not in msg and "vocab_size" not in msg


def test_check_model_reports_fields_missing_from_the_plan():
    fingerprint = model_fingerprint(MODEL)
    del fingerprint["swiglu"]
    with pytest.raises(ValueError, match=r"swiglu: plan has None, model has True"):
        artifact(model=fingerprint).check_model(MODEL)


# -- conversion -------------------------------------------------------------------------------
def test_to_hybrid_plan_keeps_decisions_ranks_lora_and_seed():
    plan = artifact().to_hybrid_plan()
    assert plan.modules == {
        "decoder.layers.0.self_attention.linear_qkv": ModuleDecision("lora", 4),
        "decoder.layers.0.mlp.linear_fc1": ModuleDecision("fft"),
        "decoder.layers.1.mlp.linear_fc2": ModuleDecision("lora", 2),
    }  # frozen modules are left out: unnamed modules stay frozen
    assert plan.lora == LORA and plan.seed == 17
    assert plan.lora_config_for("decoder.layers.1.mlp.linear_fc2").rank == 2


def test_fft_names_are_sorted():
    plan = artifact(
        modules=[
            entry(1, "linear_fc1", "fft"),
            entry(0, "linear_fc2", "fft"),
            entry(0, "linear_qkv", "lora", 4),
        ]
    )
    assert plan.fft_names() == [
        "decoder.layers.0.mlp.linear_fc2",
        "decoder.layers.1.mlp.linear_fc1",
    ]


def test_saved_file_is_readable_json(tmp_path):
    path = save_plan(artifact(), tmp_path / "plan.json")
    d = json.loads(path.read_text())
    assert d["modules"][1] == asdict(entry(0, "linear_fc1", "fft"))
    assert os.path.getsize(path) > 0


@pytest.mark.parametrize("out", ["plans/", "DIR"])
def test_the_score_job_refuses_a_directory_for_its_plan_file(tmp_path, out):
    from megatron_hybrid.scoring.job import ScoreJobConfig

    out = str(tmp_path) if out == "DIR" else f"{tmp_path}/{out}"
    with pytest.raises(
        ValueError, match=r"is a directory; give the plan file, e\.g\. .*plan\.json"
    ):
        ScoreJobConfig(out=out)
