"""Prompt datasets from local jsonl / json / parquet files: loading, validation, sampling, splits."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from megatron_hybrid.data.datasets import DataConfig, PromptDataset, load_prompt_datasets

ROWS = [{"q": f"{i}+{i}=", "a": 2 * i, "other": "x"} for i in range(10)]


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, path, **kw) -> DataConfig:
    kw.setdefault("prompt_field", "q")
    kw.setdefault("answer_field", "a")
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def test_jsonl_rows_template_and_indexing(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", ROWS)
    ds = PromptDataset.from_config(config(tmp_path, f, prompt_template="Q: {prompt}\nA:"))
    assert len(ds) == 10
    assert ds[3] == ("Q: 3+3=\nA:", "6")
    assert [ds[i] for i in range(10)] == [(f"Q: {i}+{i}=\nA:", str(2 * i)) for i in range(10)]


@pytest.mark.parametrize("fmt", ["parquet", "json"])
def test_parquet_and_json_array_files(tmp_path, fmt):
    if fmt == "parquet":
        f = tmp_path / "train.parquet"
        datasets.Dataset.from_list(ROWS).to_parquet(str(f))
    else:
        f = tmp_path / "train.json"
        f.write_text(json.dumps(ROWS))
    ds = PromptDataset.from_config(config(tmp_path, f))
    assert [ds[i] for i in range(10)] == [(f"{i}+{i}=", str(2 * i)) for i in range(10)]


def test_a_directory_is_read_in_name_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[5:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:5])
    (tmp_path / "notes.txt").write_text("ignored")
    ds = PromptDataset.from_config(config(tmp_path, tmp_path))
    assert [ds[i][1] for i in range(10)] == [str(2 * i) for i in range(10)]
    glob_ds = PromptDataset.from_config(config(tmp_path, tmp_path / "*.jsonl"))
    assert glob_ds.prompts == ds.prompts


def test_numbers_become_strings_and_whole_floats_lose_the_point(tmp_path):
    f = write_jsonl(tmp_path / "floats.jsonl", [{"q": 7, "a": 7}, {"q": "x", "a": 7.5}])
    ds = PromptDataset.from_config(config(tmp_path, f))  # Arrow stores the answers as float64
    assert [ds[i] for i in range(2)] == [("7", "7"), ("x", "7.5")]


@pytest.mark.parametrize(
    "rows",
    [
        [{"q": "a", "a": 12345678901234567891}, {"q": "b", "a": 2}],  # beyond int64
        [{"q": "a", "a": 9007199254740993}, {"q": "b", "a": 1.5}],  # mixed with a decimal
    ],
)
def test_large_integer_answers_stay_exact(tmp_path, rows):
    """Arrow reads both columns as float64, which rounds integers above 2**53."""
    ds = PromptDataset.from_config(config(tmp_path, write_jsonl(tmp_path / "big.jsonl", rows)))
    assert ds.answers == [str(r["a"]) for r in rows]


def test_a_float_too_large_to_be_an_exact_integer_is_refused(tmp_path):
    f = tmp_path / "big.parquet"
    datasets.Dataset.from_list([{"q": "a", "a": 1.5}, {"q": "b", "a": 2.0**60}]).to_parquet(str(f))
    with pytest.raises(ValueError, match=r"row 1: field 'a' is the float .* too large"):
        PromptDataset.from_config(config(tmp_path, f))


def test_mixed_type_json_columns_keep_their_strings(tmp_path):
    # datasets' Json feature would turn these strings into 7, [1, 2] and 1000.0.
    rows = [{"q": "a", "a": 7}, {"q": "b", "a": "007"}, {"q": "c", "a": "[1, 2]"}]
    rows.append({"q": "d", "a": "1e3"})
    f = write_jsonl(tmp_path / "mixed.jsonl", rows)
    ds = PromptDataset.from_config(config(tmp_path, f))
    assert ds.answers == ["7", "007", "[1, 2]", "1e3"]


@pytest.mark.parametrize(
    ("bad_row", "match"),
    [
        ({"q": "p"}, r"row 2: field 'a' is missing"),
        ({"q": "p", "a": None}, r"row 2: field 'a' is missing"),
        ({"q": "p", "a": [1, 2]}, r"row 2: field 'a' must be a string or a number, got list"),
        ({"q": "p", "a": True}, r"row 2: field 'a' must be a string or a number, got bool"),
        ({"q": {"x": 1}, "a": 1}, r"row 2: field 'q' must be a string or a number, got dict"),
        ({"q": "p", "a": " "}, r"row 2: field 'a' is empty"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path, bad_row, match):
    f = write_jsonl(tmp_path / "bad.jsonl", [*ROWS[:2], bad_row, *ROWS[2:4]])
    with pytest.raises(ValueError, match=match) as info:
        PromptDataset.from_config(config(tmp_path, f))
    assert str(f) in str(info.value)


def test_a_missing_column_names_the_columns(tmp_path):
    f = write_jsonl(tmp_path / "x.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"row 0: field 'question' is missing \(columns: "):
        PromptDataset.from_config(config(tmp_path, f, prompt_field="question"))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        PromptDataset.from_config(config(tmp_path, tmp_path / "absent.jsonl"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        PromptDataset.from_config(config(tmp_path, tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="directory without"):
        PromptDataset.from_config(config(tmp_path, tmp_path / "empty"))


def test_offline_hub_name_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match=r"not a local file.*Offline \(HF_HUB_OFFLINE=1"):
        PromptDataset.from_config(config(tmp_path, "nobody/no-such-dataset"))


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("no field", r"exactly one '\{prompt\}' field"),
        ("{prompt} {answer}", r"got fields \['prompt', 'answer'\]"),
        ("{prompt", "not a format string"),
    ],
)
def test_template_validation(template, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(path="x.jsonl", prompt_template=template)
    DataConfig(path="x.jsonl", prompt_template="{{json}} {prompt}")  # doubled braces are fine


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"holdout_fraction": 1.0}, "holdout_fraction must be a number in"),
        ({"holdout_fraction": -0.1}, "holdout_fraction must be a number in"),
        ({"holdout_fraction": True}, "holdout_fraction must be a number in"),
        ({"answer_field": ""}, "answer_field must be a non-empty string"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(path="x.jsonl", **kwargs)


def test_sampling_is_deterministic_and_distinct(tmp_path):
    ds = PromptDataset.from_config(config(tmp_path, write_jsonl(tmp_path / "t.jsonl", ROWS)))
    first = ds.sample(6, torch.Generator().manual_seed(0))
    assert first == ds.sample(6, torch.Generator().manual_seed(0))
    assert first != ds.sample(6, torch.Generator().manual_seed(1))
    assert len(set(first)) == 6 and set(first) <= {ds[i] for i in range(10)}
    many = ds.sample(25, torch.Generator().manual_seed(0), replace=True)
    assert len(many) == 25 and set(many) <= {ds[i] for i in range(10)}
    with pytest.raises(ValueError, match="cannot draw 11 distinct rows from 10"):
        ds.sample(11, torch.Generator())


def test_holdout_split(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS)
    train, test = load_prompt_datasets(config(tmp_path, f, holdout_fraction=0.25, seed=3))
    assert (len(train), len(test)) == (8, 2)  # round(2.5) == 2
    assert sorted(train.prompts + test.prompts) == sorted(r["q"] for r in ROWS)
    again, again_test = load_prompt_datasets(config(tmp_path, f, holdout_fraction=0.25, seed=3))
    assert again.prompts == train.prompts and again_test.prompts == test.prompts
    other = load_prompt_datasets(config(tmp_path, f, holdout_fraction=0.25, seed=4))[1]
    assert other.prompts != test.prompts
    assert train.prompts == [p for p in again.prompts]  # file order is kept
    assert [int(p.split("+")[0]) for p in train.prompts] == sorted(
        int(p.split("+")[0]) for p in train.prompts
    )
    full, none = load_prompt_datasets(config(tmp_path, f))
    assert none is None and len(full) == 10
    tiny = load_prompt_datasets(config(tmp_path, f, holdout_fraction=0.01))[1]
    assert len(tiny) == 1  # at least one row held out


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("bad.jsonl", '{"q": "1", "a": 1}\n{"q": "2", "a": \n', r"line 2: Expecting value"),
        ("empty.jsonl", "", r"the file is empty"),
        ("blank.jsonl", "\n\n", r"the file is empty"),
        (
            "bad.json",
            '[{"q": "1", "a": 1},\n{"q": "2" "a": 2}]',
            r"line 2: Expecting ',' delimiter",
        ),
    ],
)
def test_unreadable_json_names_its_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=rf"{name}: could not be read as json: {match}"):
        PromptDataset.from_config(config(tmp_path, tmp_path / name))


def test_rows_keep_their_file_and_row_through_the_split(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", ROWS)
    train, test = load_prompt_datasets(config(tmp_path, f, holdout_fraction=0.25, seed=3))
    for part in (train, test):
        for (prompt, _), origin in zip(part, part.origins):
            row = int(origin.rsplit("row ", 1)[1])
            assert origin.startswith(f"{f}: row ") and ROWS[row]["q"] == prompt
