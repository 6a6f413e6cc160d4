"""Benchmark of one GRPO step: the on-policy shortcut for the old log-probabilities.

With one update per rollout (the default) the update's own detached log-probabilities are the old
ones, so the separate old-log-prob forward pass can be skipped (``grpo.recompute_old_logprobs``).
This prints the wall time of a GRPO step with the pass divided by the time without it, measured
side by side in one run (alternating, median over repeats; absolute times on shared machines are
noise), on the demo's model (4 layers x 128) with its GRPO stage settings (16 prompts x 8
samples, 6 new tokens, hybrid plan: two FFT modules, rank-1 LoRA elsewhere).

Run (CPU, one process)::

    python scripts/bench_grpo_step.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from megatron_hybrid.data.arith import ArithTask, CharTokenizer
from megatron_hybrid.demo.config import DemoConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan, candidate_names
from megatron_hybrid.peft.plan import PeftSpec
from megatron_hybrid.rl.grpo import grpo_step
from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime
from megatron_hybrid.train.step import OptimConfig, build_optimizer, wrap_ddp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per setting")
    args = parser.parse_args()
    demo = DemoConfig()
    parallel = ParallelConfig()
    initialize_runtime(parallel, seed=0)
    chunks = build_model(demo.model, parallel)
    spec = PeftSpec(
        fft_modules=[
            "decoder.layers.0.self_attention.linear_qkv",
            "decoder.layers.0.mlp.linear_fc2",
        ],
        lora=demo.lora,
    )
    apply_hybrid_plan(chunks, spec.resolve(candidate_names(chunks)))
    ddp = wrap_ddp(chunks)
    optim = OptimConfig(lr=1e-6)
    opt = build_optimizer(ddp, optim)
    tok = CharTokenizer()
    base = demo.grpo.grpo
    configs = {
        "shortcut": replace(base, recompute_old_logprobs=False),
        "recompute": replace(base, recompute_old_logprobs=True),
    }
    problems = ArithTask().sample(base.prompts_per_step, torch.Generator().manual_seed(0))
    prompts = [(tok.encode(p), a) for p, a in problems]
    times: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, cfg in configs.items():
            t = time.perf_counter()
            grpo_step(
                ddp,
                opt,
                prompts,
                cfg,
                decode=tok.decode,
                stop_token=tok.eos_id,
                vocab_size=tok.vocab_size,
                seed=r,
                optim=optim,
                step=0,
                total_steps=1,
            )
            if r:
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(
        f"GRPO step, {base.prompts_per_step} prompts x {base.group_size} samples, "
        f"{args.repeats} repeats, torch threads {torch.get_num_threads()}"
    )
    for name, v in med.items():
        print(f"  {name:9s} median {v * 1e3:7.1f} ms")
    print(f"  recompute / shortcut = {med['recompute'] / med['shortcut']:.3f}")
    destroy_runtime()


if __name__ == "__main__":
    main()
