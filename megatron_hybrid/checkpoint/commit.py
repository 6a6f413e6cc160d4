"""Atomic checkpoint directories: staging, manifest, rename, ``latest`` marker, keep-last-N.

A checkpoint is written into a hidden staging directory next to its final place
(``.iter_0000010.partial``), then a manifest of every file and its size is written, everything is
fsynced, and the staging directory is renamed to its final name (``iter_0000010``). Only then does
the ``latest`` marker move (written to a temporary file and renamed over the old one). A save killed
at any point therefore leaves the previous checkpoint and the marker untouched; the next save
removes the stale staging directory. Replacing an existing checkpoint of the same name moves the
old one aside (``.iter_0000010.old``) before the rename; a save killed between the two renames
leaves only that copy, which :func:`read_latest` and :func:`resolve_checkpoint` fall back to and
:func:`prune_step_checkpoints` moves back into place.

Only the coordinating process (global rank 0) calls the functions that change the file system;
the sharded writes of all ranks go into the staging directory in between. Nothing here imports
``torch.distributed``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from megatron_hybrid.fileio import (
    check_writable_directory,
    fsync_dir,
    fsync_tree,
    replace_directory,
    replaced_sibling,
)
from megatron_hybrid.fileio import staging_sibling as staging_path

__all__ = [
    "LATEST_FILE",
    "MANIFEST_FILE",
    "CheckpointError",
    "begin_staging",
    "commit_staging",
    "list_step_checkpoints",
    "prune_step_checkpoints",
    "read_latest",
    "resolve_checkpoint",
    "staging_path",
    "step_dir_name",
    "verify_checkpoint",
    "write_latest",
]

LATEST_FILE = "latest"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, damaged, or does not fit the model or plan it is loaded into."""


def step_dir_name(step: int) -> str:
    """``iter_0000010`` for step 10."""
    if type(step) is not int or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return f"iter_{step:07d}"


def _replaced(final: Path) -> Path | None:
    """The complete previous version of ``final`` left aside by a replace killed between its two
    renames (only when ``final`` itself is missing), else None."""
    old = replaced_sibling(final)
    if not final.exists() and (old / MANIFEST_FILE).is_file():
        return old
    return None


def begin_staging(final: Path, *, overwrite: bool = True) -> Path:
    """Create an empty staging directory for ``final``; remove a stale one left by a killed save.

    Raises ``FileExistsError`` when ``final`` exists, is not empty and ``overwrite`` is False,
    and refuses what :func:`~megatron_hybrid.fileio.check_writable_directory` refuses (the
    current directory or one above it, a mount point, a file).
    """
    final = Path(final)
    check_writable_directory(final, overwrite=overwrite)
    staging = staging_path(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _files(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


def commit_staging(final: Path) -> Path:
    """Write the manifest, fsync, and rename the staging directory of ``final`` into place.

    An existing ``final`` is replaced: it is moved aside first and deleted after the rename.
    """
    final = Path(final)
    staging = staging_path(final)
    if not staging.is_dir():
        raise CheckpointError(f"no staging directory {staging} to commit")
    files = _files(staging)
    manifest = staging / MANIFEST_FILE
    manifest.write_text(json.dumps({"format": 1, "files": files}, indent=1) + "\n")
    fsync_tree(staging)
    return replace_directory(staging, final)


def verify_checkpoint(directory: Path) -> dict[str, int]:
    """Check that every file of the manifest exists with its recorded size.

    Returns the manifest's ``{file: size}``. Raises :class:`CheckpointError` naming every missing
    or truncated file, or ``FileNotFoundError`` when the directory does not exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    manifest = directory / MANIFEST_FILE
    if not manifest.is_file():
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: it has no {MANIFEST_FILE} (the save did not "
            "finish, or this is not a checkpoint written by megatron-hybrid)"
        )
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {directory}: {MANIFEST_FILE} is damaged ({e})") from None
    problems = []
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"file {name} is missing")
        elif path.stat().st_size != size:
            got = path.stat().st_size
            what = "truncated" if got < size else "larger than written"
            problems.append(f"file {name} is {what} ({got} of {size} bytes)")
    if problems:
        raise CheckpointError(f"checkpoint {directory} is damaged: " + "; ".join(problems))
    return files


def write_latest(root: Path, name: str) -> None:
    """Point ``root/latest`` at the checkpoint directory ``root/name`` (atomic replace)."""
    root = Path(root)
    if not (root / name).is_dir():
        raise CheckpointError(f"cannot mark {root / name} as latest: it does not exist")
    tmp = root / f".{LATEST_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST_FILE)
    fsync_dir(root)


def read_latest(root: Path) -> Path | None:
    """The directory ``root/latest`` names, or None when there is no marker."""
    marker = Path(root) / LATEST_FILE
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"{marker} is damaged: it holds {name!r}")
    target = Path(root) / name
    if not target.is_dir():
        fallback = _replaced(target)
        if fallback is not None:
            return fallback
        raise CheckpointError(f"{marker} names {name}, which does not exist in {root}")
    return target


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from either a run root (follows ``latest``) or the directory itself."""
    path = Path(path)
    if not path.exists():
        fallback = _replaced(path)
        if fallback is not None:
            return fallback
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    latest = read_latest(path) if path.is_dir() else None
    if latest is not None:
        return latest
    if (path / MANIFEST_FILE).is_file():
        return path
    steps = list_step_checkpoints(path)
    hint = f"; it holds {[p.name for _, p in steps]} but no {LATEST_FILE} marker" if steps else ""
    raise CheckpointError(f"{path} is neither a checkpoint directory nor a run root{hint}")


def list_step_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Committed ``iter_*`` directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m[1]), p))
    return sorted(out)


def prune_step_checkpoints(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step checkpoints (never the one ``latest`` names)
    and stale staging directories; first move back any step checkpoint a killed replace left
    only as ``.iter_*.old``. Returns the deleted paths."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    for old in root.glob(".iter_*.old"):
        final = root / old.name[1 : -len(".old")]
        if _replaced(final) is not None:
            os.replace(old, final)
    latest = read_latest(root)
    steps = list_step_checkpoints(root)
    doomed = [p for _, p in steps[:-keep_last] if latest is None or p != latest]
    doomed += [p for p in root.iterdir() if p.name.startswith(".iter_") and p.is_dir()]
    for p in doomed:
        shutil.rmtree(p)
    return doomed
