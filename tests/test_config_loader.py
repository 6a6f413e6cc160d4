"""load_config: dataclass defaults, then a YAML file of overrides, then ``key.sub=value`` overrides,
into the quick-start job's QuickstartConfig; errors name the dotted key or the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_hybrid.config import (
    from_dict,
    load_config,
    parse_number_list,
    parse_overrides,
    to_dict,
)
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.train.quickstart import QuickstartConfig


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


YAML = """\
# megatron-hybrid train --config job.yaml
model:
  num_layers: 2
  hidden_size: 64
peft:
  fft_modules: [decoder.layers.1.mlp.linear_fc1]
  rank_overrides: {linear_qkv: 2}
  lora: {r: 4, lora_alpha: 8, dropout_position: post}
run:
  steps: 3
  seq_length: 12
"""


def test_no_file_and_no_overrides_gives_the_defaults():
    assert load_config(QuickstartConfig) == QuickstartConfig()


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(QuickstartConfig, write(tmp_path, "# nothing\n")) == QuickstartConfig()


def test_an_empty_section_keeps_its_defaults(tmp_path):
    """``model:`` with every key commented out is YAML null; before, "expected a mapping"."""
    text = "model:\n  # num_layers: 8\noptim:\n  lr: 2.0e-3\n"
    cfg = load_config(QuickstartConfig, write(tmp_path, text))
    assert cfg.model == QuickstartConfig().model and cfg.optim.lr == 2e-3


def test_yaml_file_overrides_only_the_keys_it_names(tmp_path):
    cfg = load_config(QuickstartConfig, write(tmp_path, YAML))
    default = QuickstartConfig()
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (2, 64)
    assert cfg.model.ffn_hidden_size == default.model.ffn_hidden_size
    assert cfg.peft.fft_modules == ["decoder.layers.1.mlp.linear_fc1"]
    assert cfg.peft.rank_overrides == {"linear_qkv": 2}
    assert cfg.peft.lora == LoRAConfig(rank=4, alpha=8, dropout_position="post")
    assert cfg.peft.target_modules == default.peft.target_modules
    assert (cfg.run.steps, cfg.run.seq_length, cfg.run.seed) == (3, 12, default.run.seed)
    assert cfg.optim == default.optim and cfg.parallel == default.parallel


def test_overrides_apply_after_the_file_and_merge_into_its_sections(tmp_path):
    cfg = load_config(
        QuickstartConfig,
        write(tmp_path, YAML),
        ["model.num_layers=4", "model.num_attention_heads=2", "peft.lora.r=2", "run.steps=5"],
    )
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_attention_heads) == (
        4,
        64,
        2,
    )
    assert cfg.peft.lora.rank == 2 and cfg.peft.lora.alpha == 8  # lora section merged, not replaced
    assert cfg.run.steps == 5 and cfg.run.seq_length == 12


def test_override_values_are_parsed_as_yaml():
    cfg = load_config(
        QuickstartConfig,
        overrides=[
            "peft.target_modules=[linear_qkv, linear_proj]",
            "parallel.virtual_pipeline_model_parallel_size=null",
            "model.swiglu=false",
            "optim.lr=0.01",
            "task.op='*'",
        ],
    )
    assert cfg.peft.target_modules == ["linear_qkv", "linear_proj"]
    assert cfg.parallel.virtual_pipeline_model_parallel_size is None
    assert cfg.model.swiglu is False and cfg.optim.lr == 0.01 and cfg.task.op == "*"


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b=3", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 3, "c": "x"}, "d": [1, 2]}
    assert parse_overrides(["a.b=x=y"]) == {"a": {"b": "x=y"}}  # split on the first '='


def test_parse_overrides_keeps_symbols_yaml_reads_as_null():
    got = parse_overrides(["op=#", "sym=-", "a=null", "b=~", "c=", "d=- 1", "e='#'"])
    assert got == {"op": "#", "sym": "-", "a": None, "b": None, "c": None, "d": [1], "e": "#"}


@pytest.mark.parametrize(
    ("items", "match"),
    [
        (["run.steps"], r"override 'run\.steps' must look like key\.sub=value"),
        (["model=3", "model.num_layers=2"], r"conflicts with an earlier override of 'model'"),
    ],
)
def test_parse_overrides_errors(items, match):
    with pytest.raises(ValueError, match=match):
        parse_overrides(items)


@pytest.mark.parametrize(
    ("override", "get", "expected"),
    [
        ("model.num_layers=2", lambda c: c.model.vocab_size, 17),  # tokenizer-sized vocabulary
        ("peft.lora.rank=8", lambda c: c.peft.lora.alpha, 8.0),
        ("peft.lora.rank=8", lambda c: len(c.peft.fft_modules), 2),
        ("optim.weight_decay=0.1", lambda c: c.optim.lr, 3e-3),
    ],
)
def test_a_partial_section_keeps_the_jobs_defaults_for_the_other_keys(override, get, expected):
    assert get(QuickstartConfig()) == expected
    assert get(load_config(QuickstartConfig, overrides=[override])) == expected


def test_an_override_value_that_is_not_valid_yaml_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"task\.op=\*"):
        parse_overrides(["task.op=*"])


def test_to_dict_round_trips_through_from_dict(tmp_path):
    cfg = load_config(QuickstartConfig, write(tmp_path, YAML))
    assert from_dict(QuickstartConfig, to_dict(cfg)) == cfg


# -- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "key", "valid"),
    [
        (["modle.hidden_size=3"], "'modle'", "model, optim, parallel, peft, plan_file, run, task"),
        (["model.hiden_size=3"], "'model.hiden_size'", "hidden_size"),
        (["run.step=3"], "'run.step'", "steps"),
        (["parallel.tp=2"], "'parallel.tp'", "tensor_model_parallel_size"),
    ],
)
def test_unknown_override_key_names_the_full_dotted_key_and_the_valid_ones(overrides, key, valid):
    with pytest.raises(ValueError, match="unknown config key") as info:
        load_config(QuickstartConfig, overrides=overrides)
    assert key in str(info.value) and valid in str(info.value)


def test_unknown_key_in_a_file_names_the_full_dotted_key(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: 2\n  hidden: 64\n")
    with pytest.raises(ValueError, match=r"unknown config key 'model\.hidden'; valid keys here: "):
        load_config(QuickstartConfig, path)


def test_unknown_lora_key_names_its_section_and_the_valid_keys():
    with pytest.raises(ValueError) as info:
        load_config(QuickstartConfig, overrides=["peft.lora.rnk=3"])
    msg = str(info.value)
    assert "peft.lora" in msg and "'rnk'" in msg and "rank" in msg and "lora_alpha" in msg


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["run.steps=0"], r"run\.steps must be a positive integer"),
        (["model.hidden_size=30"], r"model\.hidden_size \(30\) must be divisible"),
        (["peft.lora.rank=0"], r"lora\.rank must be a positive integer"),
        (["parallel.sequence_parallel=true"], r"sequence_parallel needs tensor_model_parallel"),
        (["task.op=/"], r"task\.op must be one of"),
        (["optim.lr=-1.0"], r"optim\.lr must be a number > 0"),
    ],
)
def test_invalid_values_are_reported_by_the_section_validators(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(QuickstartConfig, overrides=overrides)


@pytest.mark.parametrize("override", ["task.op=/", "optim.lr=-1.0", "run.steps=0"])
def test_a_nested_error_names_its_section_once(override):
    section = override.split(".")[0]
    with pytest.raises(ValueError) as info:
        load_config(QuickstartConfig, overrides=[override])
    assert f"{section}: {section}:" not in str(info.value)


@pytest.mark.parametrize("overrides", [["model=3"], ["peft=[linear_qkv]"], ["run=true"]])
def test_a_section_given_a_non_mapping_is_an_error_naming_it(overrides):
    section = overrides[0].split("=")[0]
    with pytest.raises(ValueError, match=rf"{section}: expected a mapping"):
        load_config(QuickstartConfig, overrides=overrides)


@pytest.mark.parametrize(
    ("text", "get"),
    [
        ("optim:\n  lr: 1e-3\n", lambda c: c.optim.lr),
        ("peft:\n  lora:\n    init_std: 2E-2\n", lambda c: c.peft.lora.init_std),
    ],
)
def test_exponent_floats_without_a_dot_load_as_floats(tmp_path, text, get):
    value = get(load_config(QuickstartConfig, write(tmp_path, text)))
    assert isinstance(value, float) and value == float(text.split(": ")[-1])


def test_bad_yaml_error_names_the_file(tmp_path):
    path = write(tmp_path, "model:\n  num_layers: [2, 3\n", name="broken.yaml")
    with pytest.raises(ValueError, match="is not valid YAML") as info:
        load_config(QuickstartConfig, path)
    assert str(path) in str(info.value)


def test_a_file_whose_top_level_is_not_a_mapping_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, "- model\n- run\n", name="list.yaml")
    with pytest.raises(ValueError, match="must contain a mapping at the top level") as info:
        load_config(QuickstartConfig, path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_file_not_found_error_naming_it(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_config(QuickstartConfig, path)
    assert str(path) in str(info.value)


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(QuickstartConfig, tmp_path)


def test_parse_number_list_names_the_flag():
    assert parse_number_list("--lrs", "1e-3,3e-3") == [1e-3, 3e-3]
    assert parse_number_list("--seeds", "5,6", int) == [5, 6]
    assert parse_number_list("--seeds", None, int) is None
    with pytest.raises(ValueError, match=r"--seeds must be comma-separated integers, got '0,1.5'"):
        parse_number_list("--seeds", "0,1.5", int)
    with pytest.raises(ValueError, match=r"--lrs must be comma-separated numbers, got ''"):
        parse_number_list("--lrs", "")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.swiglu=maybe", "model.swiglu must be true or false, got 'maybe'"),
        ("run.seed=abc", "run.seed must be an integer, got 'abc'"),
        ("peft.rank_overrides=[1]", "peft.rank_overrides must be a mapping, got [1]"),
        ("peft.target_modules=5", "peft.target_modules must be a list, got 5"),
        ("optim.min_lr_ratio=true", "optim.min_lr_ratio must be a number, got True"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_even_where_no_validator_checks_it(override, message):
    """Fields whose own validation did not check the type accepted it (``swiglu: maybe``) or
    crashed later with an AttributeError; from_dict now checks plain field types."""
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(QuickstartConfig, None, [override])


def test_a_key_given_twice_in_a_file_is_an_error_naming_it(tmp_path):
    path = write(tmp_path, "run:\n  steps: 3\n  steps: 5\n")
    with pytest.raises(
        ValueError, match=r"(?s)job.yaml is not valid YAML.*found the key 'steps' twice.*line 3"
    ):
        load_config(QuickstartConfig, path)


def test_a_key_that_overrides_a_yaml_merge_is_not_a_duplicate():
    from megatron_hybrid.config import _load_yaml

    text = "defaults: &d {steps: 3, seq_length: 12}\nrun:\n  <<: *d\n  steps: 5\n"
    assert _load_yaml(text)["run"] == {"steps": 5, "seq_length": 12}


def test_a_required_field_left_out_is_named_with_its_dotted_key():
    from megatron_hybrid.rl.job import PostTrainConfig

    with pytest.raises(ValueError, match=r"^data\.path is required$"):
        load_config(PostTrainConfig, None, ["data.prompt_field=q"])
