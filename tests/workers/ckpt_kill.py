"""Worker: a checkpoint save killed (SIGKILL) midway, in one process without torchrun.

Run by ``tests/checkpoint/test_atomic_save.py``::

    python ckpt_kill.py --root R --phase first    # saves step 1, then dies saving step 2 after
                                                  # every shard is written, before the commit
    python ckpt_kill.py --root R --phase second   # loads R (latest), then dies saving step 2
                                                  # after the commit, before `latest` moves
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from megatron_hybrid.checkpoint import io as ckpt_io
from megatron_hybrid.checkpoint import load_model, load_trainables, save_model, save_trainables
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan
from megatron_hybrid.peft.plan import HybridPlan
from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime

TINY = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=24,
    max_sequence_length=16,
)
TINY_PLAN = HybridPlan.from_dict(
    {
        "lora": {"rank": 2, "b_init": "gaussian"},
        "modules": {
            "decoder.layers.0.self_attention.linear_qkv": "lora",
            "decoder.layers.0.mlp.linear_fc2": "lora",
            "decoder.layers.1.mlp.linear_fc1": "fft",
        },
    }
)


def _die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--phase", choices=("first", "second"), required=True)
    args = parser.parse_args()
    initialize_runtime(ParallelConfig())
    chunks = build_model(TINY, ParallelConfig())
    if args.phase == "first":
        save_model(args.root / "base", chunks, TINY)
        apply_hybrid_plan(chunks, TINY_PLAN)
        save_trainables(args.root, 1, chunks, plan=TINY_PLAN, model_cfg=TINY)
        ckpt_io.commit_staging = _die
    else:
        load_model(args.root / "base", chunks, TINY)
        apply_hybrid_plan(chunks, TINY_PLAN)
        state = load_trainables(args.root, chunks, plan=TINY_PLAN, model_cfg=TINY)
        print(f"loaded step {state.step}", flush=True)
        ckpt_io.write_latest = _die
    save_trainables(args.root, 2, chunks, plan=TINY_PLAN, model_cfg=TINY)
    destroy_runtime()
    raise SystemExit("the save was supposed to be killed")


if __name__ == "__main__":
    main()
