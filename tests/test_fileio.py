"""Atomic text and binary writes: the new file, or the old one untouched and no temporary file left."""

from __future__ import annotations

import pytest

from megatron_hybrid.fileio import atomic_write, atomic_write_text


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
