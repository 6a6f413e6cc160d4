"""Run ``python -m megatron_hybrid.cli demo ...`` in a clean single-process environment."""

from __future__ import annotations

import subprocess
import sys

from tests.multirank import REPO_ROOT, child_env


def demo_cli(*args: str, threads: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    env = child_env(threads)
    return subprocess.run(
        [sys.executable, "-m", "megatron_hybrid.cli", "demo", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
