"""A save killed by SIGKILL never damages the previous checkpoint; ``latest`` moves only after a
complete write; the next save cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from megatron_hybrid.checkpoint.commit import read_latest, verify_checkpoint
from tests.multirank import REPO_ROOT, child_env, worker_path


def _killed(root, phase: str) -> str:
    env = child_env()
    cmd = [sys.executable, str(worker_path("ckpt_kill")), "--root", str(root), "--phase", phase]
    log = root.parent / f"{root.name}.{phase}.log"
    with open(log, "w") as out:
        # Its own session: the checkpoint writer's helper processes outlive the killed worker and
        # are ended with the session afterwards.
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    assert proc.returncode == -signal.SIGKILL, text[-8000:]
    return text


def test_killed_saves_keep_the_previous_checkpoint(tmp_path):
    _killed(tmp_path, "first")  # dies after writing the shards of step 2, before the commit
    step1 = tmp_path / "iter_0000001"
    assert read_latest(tmp_path) == step1
    verify_checkpoint(step1)
    partial = tmp_path / ".iter_0000002.partial"
    assert partial.is_dir() and any(p.suffix == ".distcp" for p in partial.iterdir())
    assert not (tmp_path / "iter_0000002").exists()

    out = _killed(tmp_path, "second")  # loads step 1, dies after committing step 2, before `latest`
    assert "loaded step 1" in out
    assert read_latest(tmp_path) == step1
    verify_checkpoint(step1)
    verify_checkpoint(tmp_path / "iter_0000002")  # complete, but not marked
    assert not partial.exists()
