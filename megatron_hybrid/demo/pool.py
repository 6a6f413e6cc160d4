"""Run the benchmark's independent runs side by side in worker processes.

A tiny model on a CPU keeps one core busy per process far better than it uses two threads in one
process, so a single-process benchmark fans its (stage, mode, seed) runs out to ``workers``
processes (``spawn``ed; each has its own single-process Megatron runtime and loads the cached base
and start weights). Every run seeds itself, so a run's result does not depend on which worker ran it or in
which order; only the number of intra-op threads per process changes (``cores // workers``), which
can change floating-point rounding. Under ``torchrun`` (world size > 1) runs stay sequential: every
rank takes part in every run.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron_hybrid.demo.runner import Demo, RunResult

__all__ = ["available_cpus", "resolve_workers", "run_jobs"]

_MAX_AUTO_WORKERS = 8
_STATE: dict[str, Any] = {}


def available_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(requested: int, n_jobs: int) -> int:
    """How many processes run jobs: ``requested`` (0 = one per core, at most 8; 1 on CUDA or
    under torchrun), never more than there are jobs."""
    if requested < 0:
        raise ValueError(f"demo.workers must be >= 0 (0 = automatic), got {requested}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        if requested > 1:
            raise ValueError(
                f"demo.workers={requested} needs a single-process run; under torchrun "
                f"({dist.get_world_size()} ranks) every rank takes part in every run: set workers=1"
            )
        return 1
    if torch.cuda.is_available():
        if requested > 1:
            raise ValueError(
                f"demo.workers={requested}: worker processes are for CPU runs (they would all "
                "share one GPU); set workers=1 or 0"
            )
        return 1
    if requested == 0:
        requested = min(available_cpus(), _MAX_AUTO_WORKERS)
    return max(1, min(requested, n_jobs))


def run_jobs(
    demo: Demo,
    jobs: Sequence[tuple],
    workers: int,
    on_result: Callable[[int, RunResult], None],
) -> None:
    """Run ``demo.run(*job)`` for every job; ``on_result(index, result)`` as each one finishes.

    With ``workers > 1`` the jobs run in that many spawned processes (results arrive in completion
    order); the first failing job cancels the jobs not yet started and re-raises here once the
    running ones have finished. Each worker gets ``cores // workers`` intra-op threads, never more
    than this process has (``OMP_NUM_THREADS`` / ``torch.set_num_threads``).
    """
    if workers <= 1:
        for i, job in enumerate(jobs):
            try:
                result = demo.run(*job)
            except Exception as e:
                raise RunFailed(f"run {job_name(job)} failed: {e}") from e
            on_result(i, result)
        return
    if demo.base_path is None or not demo.base_path.is_file():
        raise RuntimeError("worker processes need the cached base weights: call warm_up() first")
    threads = max(1, min(available_cpus() // workers, torch.get_num_threads()))
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(
            demo.cfg,
            str(demo.base_path),
            {stage: str(path) for stage, path in demo.start_paths.items()},
            threads,
        ),
    )
    try:
        futures = {pool.submit(_run_job, job): i for i, job in enumerate(jobs)}
        collect(futures, jobs, on_result)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class RunFailed(RuntimeError):
    """A benchmark run raised; the message names it (stage / mode / seed)."""


def job_name(job: tuple) -> str:
    """``stage / mode / seed N`` of a ``Demo.run`` job."""
    return f"{job[0]} / {job[1]} / seed {job[2]}"


def collect(
    futures: dict[Future, int], jobs: Sequence[tuple], on_result: Callable[[int, RunResult], None]
) -> None:
    """``on_result`` for every job as it finishes. After the first failure the jobs not yet
    started are cancelled, the running ones still report their results, and then the failure is
    raised naming its run."""
    failure: tuple[int, BaseException] | None = None
    for fut in as_completed(futures):
        i = futures[fut]
        if fut.cancelled():
            continue
        error = fut.exception()
        if error is None:
            on_result(i, fut.result())
            continue
        if failure is None:
            failure = (i, error)
            for other in futures:
                other.cancel()  # only the ones not started
    if failure is not None:
        i, error = failure
        raise RunFailed(f"run {job_name(jobs[i])} failed: {error}") from error


def _exit_with_parent(parent: int, interval_s: float = 1.0) -> None:
    """A killed benchmark must not leave its workers training: exit once the parent is gone."""

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _init_worker(cfg, base_path: str, start_paths: dict[str, str], threads: int) -> None:
    from megatron_hybrid.demo.runner import Demo
    from megatron_hybrid.runtime.distributed import LAUNCHER_ENV_VARS, initialize_runtime

    _exit_with_parent(os.getppid())
    for key in LAUNCHER_ENV_VARS:  # it runs its own one-process runtime
        os.environ.pop(key, None)
    torch.set_num_threads(threads)
    initialize_runtime(cfg.parallel, seed=1234)
    demo = Demo(cfg, lambda *_a, **_k: None, log_suffix=f".worker{os.getpid()}")
    demo.base_state = torch.load(base_path, weights_only=True)
    for stage, path in start_paths.items():
        demo.start_states[stage] = torch.load(path, weights_only=True)
    _STATE["demo"] = demo


def _run_job(job: tuple) -> RunResult:
    demo = _STATE["demo"]
    result = demo.run(*job)
    if demo.writer is not None:
        demo.writer.flush()
    return result
