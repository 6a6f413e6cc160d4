"""Worker: a plan that is invalid on one pipeline stage only fails on both stages, unapplied.

Run on 2 ranks at PP=2. The plan's LoRA rank is too large for a module that only stage 1 holds
(``decoder.layers.3.mlp.linear_fc2``); stage 0's entries are valid. Both ranks must raise a
``ValueError`` naming that module, and neither may have frozen or wrapped anything (before, stage 0
applied its part and then waited in the parameter-count all-reduce for the stage that raised).
Prints ``OK rank <r>`` per rank.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan
from megatron_hybrid.peft.lora import LoRAParallelLinear
from megatron_hybrid.peft.plan import HybridPlan
from megatron_hybrid.runtime.distributed import ParallelConfig, initialize_runtime
from tests.workers.hybrid_model import MODEL_CFG

PLAN = {
    "lora": {"rank": 4},
    "modules": {
        "decoder.layers.0.self_attention.linear_qkv": "lora",
        "decoder.layers.1.mlp.linear_fc1": "fft",
        "decoder.layers.3.mlp.linear_fc2": {"mode": "lora", "rank": 100_000},
    },
}


def main() -> int:
    parallel = ParallelConfig(pipeline_model_parallel_size=2)
    initialize_runtime(parallel, seed=0)
    chunks = build_model(MODEL_CFG, parallel)
    trainable = [p.requires_grad for c in chunks for p in c.parameters()]
    try:
        apply_hybrid_plan(chunks, HybridPlan.from_dict(PLAN))
    except ValueError as e:
        if "decoder.layers.3.mlp.linear_fc2: LoRA rank 100000 exceeds" not in str(e):
            raise AssertionError(f"the error does not name the module: {e}") from e
    else:
        raise AssertionError("an invalid plan was applied")
    if [p.requires_grad for c in chunks for p in c.parameters()] != trainable:
        raise AssertionError("parameters were frozen or unfrozen before the error")
    if any(isinstance(m, LoRAParallelLinear) for c in chunks for m in c.modules()):
        raise AssertionError("a module was wrapped before the error")
    dist.barrier()
    print(f"OK rank {dist.get_rank()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
