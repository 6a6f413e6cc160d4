"""Atomic text writes: the new file, or the old one untouched and no temporary file left."""

from __future__ import annotations

import pytest

from megatron_hybrid.fileio import atomic_write_text


def test_atomic_write_text_replaces_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    with pytest.raises(TypeError):
        atomic_write_text(path, None)  # fails while writing
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]  # no temp left
