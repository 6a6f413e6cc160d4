"""Run a worker script on several gloo ranks with ``torchrun`` from a test.

Multi-rank tests keep their distributed code in ``tests/workers/<name>.py`` and launch it with::

    proc = launch(worker_path("model_equivalence"), 2, "--tp", "2", "--out", str(out))

Every rank is a fresh interpreter (``torch.distributed.run`` uses the ``spawn`` start method), so
workers can build their own process groups without disturbing the pytest process. Workers find
``megatron_hybrid`` and the ``tests`` package through ``PYTHONPATH`` (the repository root is put
first). A nonzero exit or a timeout raises ``AssertionError`` carrying the tail of the output of all
ranks, so a failing rank's traceback shows up in the pytest report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import psutil

from megatron_hybrid.runtime.distributed import without_launcher_env

__all__ = ["REPO_ROOT", "WORKERS_DIR", "free_port", "launch", "worker_path"]

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKERS_DIR = Path(__file__).resolve().parent / "workers"

_TAIL_CHARS = 20_000


def child_env(threads: int = 1) -> dict[str, str]:
    """Environment for a child process that starts its own runtime: this process's, without the
    rendezvous variables a one-rank runtime set here (the child or torchrun picks its own), with
    the repository on ``PYTHONPATH`` and ``threads`` OpenMP threads."""
    env = without_launcher_env(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``--master_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_path(name: str) -> Path:
    """Path of the worker script ``tests/workers/<name>.py`` (which must exist)."""
    path = WORKERS_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no worker script {path}")
    return path


def _terminate_tree(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End torchrun and its ranks (which may sit in process groups of their own)."""
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its ranks
    _, alive = psutil.wait_procs(ranks, timeout=grace)
    for rank in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tail(text: str) -> str:
    if len(text) <= _TAIL_CHARS:
        return text
    return f"[... {len(text) - _TAIL_CHARS} characters cut ...]\n" + text[-_TAIL_CHARS:]


def _report(what: str, cmd: list[str], stdout: str, stderr: str) -> str:
    return (
        f"{what}\ncommand: {' '.join(cmd)}\n"
        f"----- stdout (tail) -----\n{_tail(stdout)}\n"
        f"----- stderr (tail) -----\n{_tail(stderr)}"
    )


def launch(
    script: str | Path,
    nproc: int,
    *args: str,
    timeout: int = 600,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` local ranks with ``torchrun`` and wait for it.

    Args:
        script: the worker script (see :func:`worker_path`).
        nproc: number of ranks (``--nproc_per_node``).
        *args: command-line arguments passed to every rank.
        timeout: seconds before the whole launch (torchrun and its ranks) is killed.
        env: extra environment variables for the ranks (added to a copy of ``os.environ``).

    Returns:
        The finished process (``returncode`` 0) with ``stdout`` / ``stderr`` as text.

    Raises:
        AssertionError: on a nonzero exit or a timeout, with the command and the output tails.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]
    run_env = child_env()
    if env:
        run_env.update(env)
    # A session of its own so that a timeout can end whatever torchrun started.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _terminate_tree(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(
            _report(f"{script} on {nproc} ranks timed out after {timeout} s", cmd, stdout, stderr)
        ) from None
    if proc.returncode != 0:
        raise AssertionError(
            _report(f"{script} on {nproc} ranks exited with {proc.returncode}", cmd, stdout, stderr)
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def make_reference(worker: str, reference: Path) -> None:
    """Run worker ``worker`` once on one rank with ``--reference REF --make-reference`` (it
    writes the reference weights / results to ``reference``)."""
    launch(worker_path(worker), 1, "--reference", str(reference), "--make-reference", timeout=300)


def run_against_reference(
    worker: str,
    nproc: int,
    reference: Path,
    out: Path,
    *args: str,
    weights_only: bool = True,
) -> dict:
    """Run ``worker`` on ``nproc`` ranks with ``--reference REF --out OUT ARGS`` and return what
    it saved to ``out`` (``torch.load``)."""
    import torch

    launch(
        worker_path(worker), nproc, "--reference", str(reference), "--out", str(out), *args,
        timeout=300,
    )  # fmt: skip
    return torch.load(out, weights_only=weights_only)
