"""Small file helpers shared by the plan writer, the benchmark and the post-training jobs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`). Returns the path."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_write(path: str | Path, write: Callable[[IO], object], *, binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file in ``path``'s folder (text, or bytes with
    ``binary=True``), fsync it, rename it.

    A reader sees the old file or the new one, never half of it; if ``write`` (or the rename)
    fails, the temporary file is removed and the old file, if any, is untouched. The file gets the
    mode an ordinary ``open()`` would give it (``mkstemp`` alone makes it 0600). Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
