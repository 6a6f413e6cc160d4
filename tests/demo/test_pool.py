"""Worker processes: the same runs and results as running them one after another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from megatron_hybrid.demo import pool
from megatron_hybrid.demo.config import DemoConfig, ModeOptim
from megatron_hybrid.demo.runner import default_sweep_grid
from tests.demo.cli import demo_cli
from tests.multirank import REPO_ROOT

TINY = [
    "warmup.steps=30",
    "warmup.batch_size=32",
    "seeds=[0,1]",
    "modes=[fft,lora,hybrid]",
    "sft.steps=6",
    "sft.eval_interval=3",
    "sft.test_size=20",
    "sft.val_size=10",
    "sft.eval_subset=10",
    "sft.batch_size=16",
    "grpo.steps=2",
    "grpo.eval_interval=1",
    "grpo.test_size=20",
    "grpo.val_size=10",
    "grpo.eval_subset=10",
    "grpo.grpo.prompts_per_step=4",
    "grpo.grpo.group_size=2",
    "grpo.grpo.micro_batch_size=8",
    "grpo.start.max_steps=4",
    "grpo.start.warmup_steps=1",
    "grpo.start.check_interval=2",
    "grpo.start.check_size=10",
    "score.probe.steps=2",
    "tensorboard=false",
]


def _demo(tmp_path, name: str, workers: int) -> list[dict]:
    out = tmp_path / name
    proc = demo_cli(
        "--out", str(out), *TINY, f"cache_dir={tmp_path / 'cache'}", f"workers={workers}"
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"runs in {workers} process" in proc.stdout
    return json.loads((out / "results.json").read_text())["runs"]


@pytest.mark.slow
def test_two_workers_give_the_runs_of_one_process_in_the_same_order(tmp_path):
    serial = _demo(tmp_path, "serial", 1)
    parallel = _demo(tmp_path, "parallel", 2)
    key = [(r["stage"], r["mode"], r["seed"]) for r in serial]
    assert key == [(r["stage"], r["mode"], r["seed"]) for r in parallel]
    assert len(key) == 12
    for a, b in zip(serial, parallel):
        assert a["trainable_params"] == b["trainable_params"]
        assert a["optimizer_state_bytes"] == b["optimizer_state_bytes"]
        assert a["fft_modules"] == b["fft_modules"]
        for (sa, la), (sb, lb) in zip(a["loss_curve"], b["loss_curve"], strict=True):
            assert sa == sb and la == pytest.approx(lb, rel=1e-5, abs=1e-6), (a["mode"], sa)
        for (sa, ra), (sb, rb) in zip(a["reward_curve"], b["reward_curve"], strict=True):
            assert sa == sb and ra == pytest.approx(rb, abs=1e-6)
        assert a["final_heldout_accuracy"] == pytest.approx(b["final_heldout_accuracy"], abs=0.051)


def test_resolve_workers_auto_explicit_and_capped(monkeypatch):
    monkeypatch.setattr(pool, "available_cpus", lambda: 4)
    monkeypatch.setattr(pool.torch.cuda, "is_available", lambda: False)
    assert pool.resolve_workers(0, 50) == 4
    assert pool.resolve_workers(0, 3) == 3  # never more processes than runs
    assert pool.resolve_workers(1, 50) == 1
    assert pool.resolve_workers(6, 50) == 6
    monkeypatch.setattr(pool.torch.cuda, "is_available", lambda: True)
    assert pool.resolve_workers(0, 50) == 1
    with pytest.raises(ValueError, match="worker processes are for CPU runs"):
        pool.resolve_workers(2, 50)
    with pytest.raises(ValueError, match="demo.workers must be >= 0"):
        pool.resolve_workers(-1, 5)


def test_workers_under_torchrun_are_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(pool.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(pool.dist, "get_world_size", lambda: 2)
    assert pool.resolve_workers(0, 10) == 1
    with pytest.raises(ValueError, match=r"demo.workers=2 needs a single-process run.*2 ranks"):
        pool.resolve_workers(2, 10)


def test_config_rejects_negative_workers():
    with pytest.raises(ValueError, match="workers must be an integer >= 0, got -1"):
        DemoConfig(workers=-1)


def test_default_sweep_grid_brackets_each_modes_rate():
    cfg = DemoConfig(modes=["fft", "lora"])
    grid = default_sweep_grid(cfg, "sft")
    assert set(grid) == {"fft", "lora"}
    lr, mult = cfg.sft.modes["lora"].lr, cfg.sft.modes["lora"].lora_lr_mult
    assert [p.lr for p in grid["lora"]] == pytest.approx([lr / 3, lr, lr * 3])
    assert {p.lora_lr_mult for p in grid["lora"]} == {mult}
    assert default_sweep_grid(cfg, "grpo", [1e-4, 1e-3])["fft"] == [
        ModeOptim(1e-4, cfg.grpo.modes["fft"].lora_lr_mult),
        ModeOptim(1e-3, cfg.grpo.modes["fft"].lora_lr_mult),
    ]
    with pytest.raises(ValueError, match="unknown stage 'rl'"):
        default_sweep_grid(cfg, "rl")
    with pytest.raises(ValueError, match="learning rates must be > 0"):
        default_sweep_grid(cfg, "sft", [0.0])
    with pytest.raises(ValueError, match="lora_lr_mults must be > 0"):
        default_sweep_grid(cfg, "sft", None, [3.0, -1.0])


def test_sweep_grid_crosses_rates_with_adapter_multipliers_except_for_fft():
    cfg = DemoConfig(modes=["fft", "lora", "hybrid"])
    grid = default_sweep_grid(cfg, "sft", [1e-3, 3e-3, 1e-3], [2.0, 4.5])
    pairs = [(1e-3, 2.0), (1e-3, 4.5), (3e-3, 2.0), (3e-3, 4.5)]  # the repeated rate counted once
    assert [(p.lr, p.lora_lr_mult) for p in grid["lora"]] == pairs
    assert [(p.lr, p.lora_lr_mult) for p in grid["hybrid"]] == pairs
    assert [(p.lr, p.lora_lr_mult) for p in grid["fft"]] == [(1e-3, 1.0), (3e-3, 1.0)]


def test_a_worker_exits_when_its_parent_dies(tmp_path):
    """Killing the benchmark must not leave orphaned workers training (watchdog in each worker)."""
    script = tmp_path / "orphan.py"
    pid_file = tmp_path / "child.pid"
    script.write_text(
        "import os, sys, time, multiprocessing\n"
        "from megatron_hybrid.demo import pool\n"
        "def child(path):\n"
        "    pool._exit_with_parent(os.getppid(), interval_s=0.05)\n"
        "    open(path + '.tmp', 'w').write(str(os.getpid()))\n"
        "    os.replace(path + '.tmp', path)  # the parent sees the file only once it is complete\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    ctx.Process(target=child, args=(sys.argv[1],)).start()\n"
        "    while not os.path.exists(sys.argv[1]): time.sleep(0.05)\n"
        "    os._exit(0)  # the parent dies without cleaning up\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    subprocess.run([sys.executable, str(script), str(pid_file)], env=env, timeout=120, check=True)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child), "the worker outlived its parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_runs_memory_baseline_comes_after_earlier_runs_garbage_is_collected():
    """A finished run's model and optimizer sit in reference cycles; left alone they would be
    freed in the middle of the next run and its peak would read low."""
    import gc
    import weakref

    import torch

    from megatron_hybrid.demo.runner import PeakRSS

    class Holder:
        pass

    gc.disable()  # no automatic collection in between
    try:
        h = Holder()
        h.self, h.tensor = h, torch.zeros(1 << 20)
        gone = weakref.ref(h.tensor)
        del h
        assert gone() is not None  # only the cycle collector frees it
        with PeakRSS() as mem:
            assert gone() is None
    finally:
        gc.enable()
    assert mem.peak >= 0


def test_a_failing_run_is_named_and_the_runs_already_going_still_report():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    jobs = [("sft", "fft", 0), ("sft", "lora", 3), ("grpo", "hybrid", 1), ("grpo", "fft", 2)]
    release = threading.Event()

    def run(job):
        if job[1] == "lora":
            raise RuntimeError("probability tensor contains nan")
        if job[1] == "fft" and job[0] == "sft":
            release.wait(2)  # still running when the failure arrives
        return job[2]

    got = {}
    with ThreadPoolExecutor(2) as ex:
        futures = {ex.submit(run, job): i for i, job in enumerate(jobs[:2])}
        futures[ex.submit(lambda: release.set() or 9)] = 2  # lets the first job finish
        with pytest.raises(pool.RunFailed, match=r"^run sft / lora / seed 3 failed: probability"):
            pool.collect(futures, jobs, lambda i, r: got.__setitem__(i, r))
    assert got[0] == 0  # the run that was going when the other failed still reported


def test_a_failing_run_in_one_process_is_named():
    class FailingDemo:
        def run(self, stage, mode, seed):
            raise ValueError("bad")

    with pytest.raises(pool.RunFailed, match=r"^run grpo / hybrid / seed 4 failed: bad"):
        pool.run_jobs(FailingDemo(), [("grpo", "hybrid", 4)], 1, lambda i, r: None)
