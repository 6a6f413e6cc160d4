"""Atomic text and binary writes: the new file, or the old one untouched and no temporary file left."""

from __future__ import annotations

import os

import pytest

from megatron_hybrid.fileio import atomic_write, atomic_write_text, staged_directory


def test_atomic_write_text_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # fails while writing
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp left


def test_atomic_write_binary_round_trips_a_torch_file_and_cleans_up_on_failure(tmp_path):
    import torch

    path = tmp_path / "base-mp0.pt"
    state = [{"w": torch.arange(6.0).reshape(2, 3)}]
    atomic_write(path, lambda f: torch.save(state, f), binary=True)
    assert torch.equal(torch.load(path, weights_only=True)[0]["w"], state[0]["w"])

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail, binary=True)
    assert torch.equal(torch.load(path, weights_only=True)[0]["w"], state[0]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-mp0.pt"]


def test_staged_directory_is_written_whole_or_not_at_all(tmp_path):
    out = tmp_path / "adapter"
    with staged_directory(out) as staging:
        assert staging != out and not out.exists()
        (staging / "a.txt").write_text("1")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging left

    # An existing, non-empty output is refused (named), unless overwrite: then replaced whole,
    # so a file of the old version (stale.txt) never mixes with the new one.
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="adapter.*--overwrite"):
        with staged_directory(out):
            raise AssertionError("not reached")
    with staged_directory(out, overwrite=True) as staging:
        (staging / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]

    # A failure inside the block leaves the old directory as it was and removes the staging.
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_directory(out, overwrite=True) as staging:
            (staging / "c.txt").write_text("3")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

    # An empty existing directory (e.g. made by the user beforehand) is fine without overwrite.
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_directory(empty) as staging:
        (staging / "d.txt").write_text("4")
    assert (empty / "d.txt").read_text() == "4"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        with staged_directory(tmp_path / "file", overwrite=True):
            pass


def test_outputs_that_cannot_be_replaced_whole_are_refused_up_front(tmp_path, monkeypatch):
    from megatron_hybrid.fileio import check_writable_directory

    monkeypatch.chdir(tmp_path)
    for out in (".", tmp_path, tmp_path.parent, "/"):
        with pytest.raises(ValueError, match="not the current directory"):
            check_writable_directory(out, overwrite=True)
    check_writable_directory("sub", overwrite=False)  # a new directory below is fine
    if os.path.ismount("/proc"):
        with pytest.raises(ValueError, match="is a mount point"):
            check_writable_directory("/proc", overwrite=True)


def test_the_current_directory_is_refused_through_dotdot_and_symlinks(tmp_path, monkeypatch):
    """Before, ``--out ../here`` (and a symlink to here) passed the check, and the swap moved
    the current directory aside, failed, and left the output missing."""
    from megatron_hybrid.fileio import check_writable_directory

    here = tmp_path / "here"
    here.mkdir()
    (tmp_path / "link").symlink_to(here)
    monkeypatch.chdir(here)
    for out in ("../here", str(tmp_path / "link"), "sub/.."):
        with pytest.raises(ValueError, match="not the current directory"):
            check_writable_directory(out, overwrite=True)


def test_a_failed_swap_puts_the_previous_directory_back(tmp_path, monkeypatch):
    from megatron_hybrid import fileio

    final, staging = tmp_path / "out", tmp_path / ".out.partial"
    final.mkdir()
    (final / "old.txt").write_text("previous")
    staging.mkdir()
    real = os.replace
    calls = []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="disk gone"):
        fileio.replace_directory(staging, final)
    monkeypatch.setattr(fileio.os, "replace", real)
    assert (final / "old.txt").read_text() == "previous"
    assert not fileio.replaced_sibling(final).exists()
