"""Run ``python -m megatron_hybrid.cli demo ...`` in a clean single-process environment."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.multirank import _RENDEZVOUS_VARS, REPO_ROOT


def demo_cli(*args: str, threads: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARS}
    env.update(PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(threads))
    return subprocess.run(
        [sys.executable, "-m", "megatron_hybrid.cli", "demo", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
