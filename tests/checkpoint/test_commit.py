"""Atomic checkpoint directories: manifest, ``latest`` marker, keep-last-N, damaged checkpoints."""

from __future__ import annotations

import json

import pytest

from megatron_hybrid.checkpoint.commit import (
    MANIFEST_FILE,
    CheckpointError,
    begin_staging,
    commit_staging,
    list_step_checkpoints,
    prune_step_checkpoints,
    read_latest,
    resolve_checkpoint,
    staging_path,
    step_dir_name,
    verify_checkpoint,
    write_latest,
)


def _save(root, step: int, payload: bytes = b"x" * 100, *, mark: bool = True):
    final = root / step_dir_name(step)
    staging = begin_staging(final)
    (staging / "__0_0.distcp").write_bytes(payload)
    (staging / "common.pt").write_bytes(b"common")
    commit_staging(final)
    if mark:
        write_latest(root, final.name)
    return final


def test_commit_writes_a_manifest_and_renames_into_place(tmp_path):
    final = _save(tmp_path, 3)
    assert final.name == "iter_0000003" and not staging_path(final).exists()
    manifest = json.loads((final / MANIFEST_FILE).read_text())
    assert manifest["files"] == {"__0_0.distcp": 100, "common.pt": 6}
    assert verify_checkpoint(final) == manifest["files"]
    assert read_latest(tmp_path) == final
    assert resolve_checkpoint(tmp_path) == final and resolve_checkpoint(final) == final


def test_an_interrupted_save_leaves_the_previous_checkpoint_and_marker(tmp_path):
    good = _save(tmp_path, 1)
    staging = begin_staging(tmp_path / step_dir_name(2))
    (staging / "__0_0.distcp").write_bytes(b"half")  # killed here: no manifest, no rename
    assert read_latest(tmp_path) == good
    verify_checkpoint(good)
    assert [s for s, _ in list_step_checkpoints(tmp_path)] == [1]
    with pytest.raises(CheckpointError, match="no manifest.json"):
        verify_checkpoint(staging)
    # The next save of the same step starts from a clean staging directory.
    again = _save(tmp_path, 2, b"y" * 10)
    assert verify_checkpoint(again) == {"__0_0.distcp": 10, "common.pt": 6}
    assert read_latest(tmp_path) == again


def test_latest_moves_only_when_asked_after_a_complete_commit(tmp_path):
    first = _save(tmp_path, 1)
    second = _save(tmp_path, 2, mark=False)
    assert read_latest(tmp_path) == first and second.is_dir()
    with pytest.raises(CheckpointError, match="does not exist"):
        write_latest(tmp_path, step_dir_name(9))
    assert read_latest(tmp_path) == first


def test_recommitting_a_step_replaces_it(tmp_path):
    _save(tmp_path, 4, b"a" * 5)
    final = _save(tmp_path, 4, b"b" * 7)
    assert verify_checkpoint(final)["__0_0.distcp"] == 7
    assert not (tmp_path / ".iter_0000004.old").exists()


def test_a_replace_killed_between_its_two_renames_loses_nothing(tmp_path):
    """Re-committing a step moves the old directory aside, then renames the new one in; killed in
    between, the aside copy is the only one. Readers use it, pruning moves it back."""
    import os

    _save(tmp_path, 3)
    final = _save(tmp_path, 4, b"a" * 5)
    aside = tmp_path / ".iter_0000004.old"
    os.replace(final, aside)  # the first rename of a replace, then the process dies
    assert read_latest(tmp_path) == aside
    assert resolve_checkpoint(tmp_path) == aside and resolve_checkpoint(final) == aside
    assert verify_checkpoint(aside)["__0_0.distcp"] == 5
    assert prune_step_checkpoints(tmp_path, keep_last=1) == [tmp_path / "iter_0000003"]
    assert not aside.exists() and read_latest(tmp_path) == final
    assert verify_checkpoint(final)["__0_0.distcp"] == 5
    # A complete directory of the same name wins over a stale aside copy, which pruning deletes.
    (aside / "x").mkdir(parents=True)
    assert read_latest(tmp_path) == final
    assert prune_step_checkpoints(tmp_path, keep_last=1) == [aside]


def test_keep_last_n_never_deletes_the_latest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    begin_staging(tmp_path / step_dir_name(5))  # a stale staging directory from a killed save
    removed = prune_step_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == [
        ".iter_0000005.partial",
        "iter_0000001",
        "iter_0000002",
    ]
    assert [s for s, _ in list_step_checkpoints(tmp_path)] == [3, 4]
    write_latest(tmp_path, step_dir_name(3))  # e.g. a run that went back to an older step
    _save(tmp_path, 5, mark=False)
    prune_step_checkpoints(tmp_path, keep_last=1)
    assert [s for s, _ in list_step_checkpoints(tmp_path)] == [3, 5]


def test_missing_and_truncated_files_are_named(tmp_path):
    final = _save(tmp_path, 1)
    (final / "__0_0.distcp").write_bytes(b"x" * 40)
    (final / "common.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(final)
    message = str(err.value)
    assert "file __0_0.distcp is truncated (40 of 100 bytes)" in message
    assert "file common.pt is missing" in message


def test_damaged_markers_and_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    _save(tmp_path, 1, mark=False)
    with pytest.raises(CheckpointError, match=r"holds \['iter_0000001'\] but no latest marker"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("iter_0000007\n")
    with pytest.raises(CheckpointError, match="names iter_0000007, which does not exist"):
        read_latest(tmp_path)
    with pytest.raises(ValueError, match="non-negative integer"):
        step_dir_name(-1)
    with pytest.raises(FileExistsError):
        begin_staging(tmp_path / "iter_0000001", overwrite=False)


def test_checkpoint_config_validation():
    from megatron_hybrid.checkpoint.config import CheckpointConfig

    assert CheckpointConfig(save_dir="r", save_interval=5).keep_last == 2
    with pytest.raises(ValueError, match="save_interval must be a positive integer"):
        CheckpointConfig(save_dir="r", save_interval=0)
    with pytest.raises(ValueError, match="keep_last must be a positive integer"):
        CheckpointConfig(keep_last=0)
    with pytest.raises(ValueError, match="resume needs checkpoint.save_dir or checkpoint.load_dir"):
        CheckpointConfig(resume=True)
    with pytest.raises(ValueError, match="save_interval is set but checkpoint.save_dir is not"):
        CheckpointConfig(save_interval=3)


def test_quickstart_config_has_a_checkpoint_section():
    from megatron_hybrid.config import load_config
    from megatron_hybrid.train.quickstart import QuickstartConfig

    cfg = load_config(
        QuickstartConfig, None, ["checkpoint.save_dir=runs/x", "checkpoint.save_interval=10"]
    )
    assert cfg.checkpoint.save_dir == "runs/x" and cfg.checkpoint.save_interval == 10
    with pytest.raises(ValueError, match="unknown config key 'checkpoint.bogus'"):
        load_config(QuickstartConfig, None, ["checkpoint.bogus=1"])
