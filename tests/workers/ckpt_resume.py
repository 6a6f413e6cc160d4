"""Worker: the quick-start trainer run uninterrupted, and stopped + resumed through checkpoints.

Run by ``tests/checkpoint/test_resume.py`` (phases in this order)::

    python ckpt_resume.py --dir D --out same.pt --phase same                  # one process, TP=1
    torchrun --nproc_per_node 2 ckpt_resume.py --dir D --out tp2.pt --tp 2 --phase stop
    python ckpt_resume.py --dir D --out cross.pt --phase cross                # one process, TP=1

``same``: A = 6 steps uninterrupted; B1 = 3 steps saving every step (keep 2) into ``D/run`` (the
seed-initialised base goes to ``D/run/base``); B2 = resume B1's step-3 checkpoint, train to step 6
(saving into ``D/resumed``). ``stop``: 3 steps at ``--tp`` from ``D/run/base``, saving into ``D/tp2``.
``cross``: resume ``D/tp2`` at TP=1 and train to step 6. (``run_quickstart`` initialises and
destroys the process group, so the ``same`` phase, which calls it three times, runs without
torchrun.)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hybrid.checkpoint.config import CheckpointConfig
from megatron_hybrid.config import from_dict
from megatron_hybrid.runtime.distributed import ParallelConfig
from megatron_hybrid.train.quickstart import QuickstartConfig, run_quickstart

STEPS = 6


def config(tp: int, checkpoint: CheckpointConfig) -> QuickstartConfig:
    base = from_dict(
        QuickstartConfig,
        {
            "run": {
                "steps": STEPS,
                "global_batch_size": 8,
                "micro_batch_size": 4,
                "log_interval": 100,
            },
            # A vocabulary padded to the same size at TP=1 and TP=2 (8 x TP multiples: 32 both),
            # so the uninterrupted TP=1 run and the TP=2 run start from the same initial weights.
            # (Checkpoints themselves reshard across paddings: tests/convert, tests/checkpoint.)
            "model": {"vocab_size": 32},
        },
    )
    base.parallel = ParallelConfig(tensor_model_parallel_size=tp, timeout_minutes=5)
    base.checkpoint = checkpoint
    return base


def run(cfg: QuickstartConfig, steps: int) -> list[float]:
    cfg.run.steps = steps
    out = run_quickstart(cfg, printer=lambda *_: None)
    return out["losses"]


def _listing(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.is_dir() else []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--phase", choices=("same", "stop", "cross"), required=True)
    args = parser.parse_args()
    d = args.dir
    result: dict = {}
    if args.phase == "same":
        result["A"] = run(config(args.tp, CheckpointConfig()), STEPS)
        b1 = CheckpointConfig(save_dir=str(d / "run"), save_interval=1, keep_last=2)
        result["B1"] = run(config(args.tp, b1), 3)
        result["run_listing"] = _listing(d / "run")
        result["latest"] = (d / "run" / "latest").read_text().strip()
        b2 = CheckpointConfig(save_dir=str(d / "resumed"), load_dir=str(d / "run" / "iter_0000003"))
        result["B2"] = run(config(args.tp, b2), STEPS)
        result["resumed_listing"] = _listing(d / "resumed")
    elif args.phase == "stop":
        stop = CheckpointConfig(save_dir=str(d / "tp2"), base_dir=str(d / "run" / "base"))
        result["C1"] = run(config(args.tp, stop), 3)
    else:
        result["C2"] = run(
            config(args.tp, CheckpointConfig(save_dir=str(d / "tp2"), resume=True)), STEPS
        )
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        torch.save(result, args.out)
        print(json.dumps({k: v for k, v in result.items()}, default=str), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
