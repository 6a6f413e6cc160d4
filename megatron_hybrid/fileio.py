"""Small file helpers shared by the plan writer, the benchmark, the post-training jobs and the
converters: atomic file writes and directories written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "check_writable_directory",
    "fsync_dir",
    "fsync_tree",
    "replace_directory",
    "replaced_sibling",
    "staged_directory",
    "staging_sibling",
]


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
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # make the rename itself durable
    return path


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that renames and new entries in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | Path) -> None:
    """fsync every file under ``directory``, then the directory itself (before renaming it)."""
    directory = Path(directory)
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def staging_sibling(final: str | Path) -> Path:
    """The hidden directory next to ``final`` where it is written before the rename
    (``.NAME.partial``)."""
    final = Path(final)
    return final.parent / f".{final.name}.partial"


def replaced_sibling(final: str | Path) -> Path:
    """Where :func:`replace_directory` keeps the previous ``final`` while it swaps in the new one
    (``.NAME.old`` next to it). If a process is killed between the two renames, this directory
    is the only copy of the previous one; readers fall back to it."""
    final = Path(final)
    return final.parent / f".{final.name}.old"


def replace_directory(staging: str | Path, final: str | Path) -> Path:
    """Rename the complete directory ``staging`` to ``final``, replacing an existing ``final``.

    The old ``final`` is moved aside to :func:`replaced_sibling` first and deleted only after the
    new one is in place (and the parent directory fsynced), so at every instant one complete
    version exists under ``final`` or its sibling; if the second rename fails, the old one is
    moved back. Returns ``final``.
    """
    staging, final = Path(staging), Path(final)
    old = replaced_sibling(final)
    moved = False
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        moved = True
    try:
        os.replace(staging, final)
    except BaseException:
        if moved and not final.exists():  # put the previous version back under its name
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
    return final


@contextlib.contextmanager
def staged_directory(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory whole or not at all: yields an empty hidden staging directory next to
    ``final`` (``.NAME.partial``); when the block finishes, it replaces ``final``
    (:func:`replace_directory`); when the block raises, it is deleted and ``final`` is untouched.

    A ``final`` that exists and is not empty is refused (``FileExistsError`` naming it) unless
    ``overwrite``: files left in it by an earlier write never mix with the new ones, and with
    ``overwrite`` everything in it is replaced. An existing empty directory is replaced too
    (so a mount point, which cannot be renamed, is refused up front).
    """
    final = Path(final).resolve()
    check_writable_directory(final, overwrite=overwrite)
    staging = staging_sibling(final)
    if staging.exists():
        shutil.rmtree(staging)  # left by a killed write
    staging.mkdir(parents=True)
    try:
        yield staging
        fsync_tree(staging)
        replace_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_writable_directory(final: str | Path, *, overwrite: bool) -> None:
    """Refuse an output directory that holds something, unless ``overwrite`` (see
    :func:`staged_directory`); a path that exists but is not a directory is always refused."""
    final = Path(final).resolve()  # ``../here`` and symlinks too: compare real paths
    cwd = Path.cwd().resolve()
    if final.name in ("", ".", "..") or final == cwd or final in cwd.parents:
        raise ValueError(
            f"output directory {final} must be a directory of its own, not the current "
            "directory or one containing it"
        )
    if os.path.ismount(final):
        raise ValueError(
            f"output directory {final} is a mount point, which cannot be replaced whole; "
            "write into a directory inside it"
        )
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"output {final} exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output directory {final} already exists and is not empty; "
            "choose another one or pass --overwrite to replace it"
        )


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()
