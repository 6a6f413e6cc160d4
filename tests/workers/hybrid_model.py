"""Worker: a GPTModel with a mixed hybrid plan (FFT + LoRA) trained one step at a given layout.

Run under torchrun by ``tests/peft/test_hybrid_model_layouts.py``::

    torchrun --nproc_per_node 4 hybrid_model.py --reference ref.pt --out out.pt --tp 2 --pp 2

``--make-reference`` (1 rank) writes the full base weights, batches and plan to ``--reference``.
Otherwise every rank loads its shard of the base weights, applies the plan (adapters come from the
plan's seed and are identical at every layout), wraps Megatron DDP, runs one forward/backward
through the schedule and one optimizer step, and rank 0 saves the loss, the full trainable
gradients, the full trainable parameters after the step, and the loss after the step.
With data parallelism the ranks' trainable parameters after the step must be bitwise identical.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.data.arith import ArithTask, CharTokenizer, make_sft_batch
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan
from megatron_hybrid.peft.plan import HybridPlan
from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime
from megatron_hybrid.train.quickstart import global_batch_shard
from megatron_hybrid.train.step import OptimConfig, build_optimizer, lm_forward_backward, wrap_ddp
from tests.sharding import (
    REPLICATED,
    TPLayout,
    gather_full_state_dict,
    load_full_state_dict,
    tp_layout,
)

MODEL_CFG = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=32,
    max_sequence_length=32,
)
GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 2, 16
PLAN = {
    "lora": {"rank": 4, "alpha": 8.0, "b_init": "gaussian"},
    "seed": 11,
    "modules": {
        "decoder.layers.1.mlp.linear_fc1": "fft",
        "decoder.layers.2.self_attention.linear_qkv": "fft",
        "decoder.layers.3.self_attention.linear_proj": "fft",
        "decoder.layers.0.self_attention.linear_qkv": "lora",
        "decoder.layers.0.self_attention.linear_proj": {"mode": "lora", "rank": 2},
        "decoder.layers.0.mlp.linear_fc1": "lora",
        "decoder.layers.0.mlp.linear_fc2": "lora",
        "decoder.layers.1.self_attention.linear_qkv": "lora",
        "decoder.layers.2.mlp.linear_fc1": "lora",
        "decoder.layers.2.mlp.linear_fc2": {"mode": "lora", "rank": 8},
        "decoder.layers.3.mlp.linear_fc1": "lora",
        "decoder.layers.3.mlp.linear_fc2": "lora",
    },
}


def lora_layout(key: str, model_cfg: ModelConfig) -> TPLayout:
    """TP layout of wrapped-model keys: base under ``base_layer``, adapters per the LoRA layout."""
    if ".base_layer." in key:
        return tp_layout(key.replace(".base_layer.", "."), model_cfg)
    if key.endswith((".lora_A", ".lora_B")):
        module, leaf = key.rsplit(".", 2)[-2:]
        column = module in ("linear_qkv", "linear_fc1")
        if column:
            return (
                TPLayout(dim=0, gated=module == "linear_fc1" and model_cfg.swiglu)
                if leaf == "lora_B"
                else REPLICATED
            )
        return TPLayout(dim=1) if leaf == "lora_A" else REPLICATED
    return tp_layout(key, model_cfg)


def batch():
    tok = CharTokenizer()
    pairs = ArithTask(max_digits=3).sample(GLOBAL_BATCH, torch.Generator().manual_seed(5))
    return make_sft_batch(pairs, tok, SEQ)


def make_reference(path: Path) -> None:
    initialize_runtime(ParallelConfig(), seed=1234)
    chunks = build_model(MODEL_CFG, ParallelConfig())
    weights = {k: v for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}
    torch.save({"weights": weights}, path)
    destroy_runtime()


def trainable_state(chunks) -> list[dict[str, torch.Tensor]]:
    return [
        {n: p.detach().clone() for n, p in c.module.named_parameters() if p.requires_grad}
        for c in chunks
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--make-reference", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=None)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    if args.make_reference:
        make_reference(args.reference)
        return

    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=args.vpp,
        sequence_parallel=args.sequence_parallel,
    )
    initialize_runtime(parallel, seed=1234)
    ref = torch.load(args.reference, weights_only=True)
    chunks = build_model(MODEL_CFG, parallel)
    load_full_state_dict(chunks, ref["weights"], MODEL_CFG)
    summary = apply_hybrid_plan(chunks, HybridPlan.from_dict(PLAN))
    ddp = wrap_ddp(chunks)
    # A large Adam eps keeps the first step's update ~ g / eps instead of ~ sign(g): with the
    # default eps, gradients near 1e-8 turn float-rounding noise between layouts into lr-sized
    # differences, which would hide real mismatches behind a loose tolerance.
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-2, adam_eps=1e-3))

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    micro = global_batch_shard(batch(), MICRO_BATCH, dp_rank, dp_size)
    loss = lm_forward_backward(ddp, micro)
    grads = [
        {n: p.main_grad.detach().clone() for n, p in c.module.named_parameters() if p.requires_grad}
        for c in ddp
    ]
    ok, _, _ = optimizer.step()
    assert ok, "optimizer step skipped"
    loss_after = lm_forward_backward(ddp, micro, forward_only=True)
    after = trainable_state(ddp)

    if dp_size > 1:  # every data-parallel replica must hold bitwise the same trainables
        flat = torch.cat([t.flatten() for sd in after for t in sd.values()])
        gathered = [torch.empty_like(flat) for _ in range(dp_size)]
        dist.all_gather(gathered, flat, group=parallel_state.get_data_parallel_group())
        for r, other in enumerate(gathered):
            if not torch.equal(other, flat):
                raise AssertionError(
                    f"data-parallel rank {r} holds different trainables after the step"
                )

    full_grads = gather_full_state_dict(grads, MODEL_CFG, layout_fn=lora_layout, replica_atol=1e-6)
    full_after = gather_full_state_dict(after, MODEL_CFG, layout_fn=lora_layout, replica_atol=0.0)
    losses: list = [None] * dist.get_world_size()
    dist.all_gather_object(losses, (loss, loss_after))
    # every rank reports the global loss (before, ranks off the last pipeline stage got None)
    if any(x != losses[-1] for x in losses):
        raise AssertionError(f"ranks report different losses: {losses}")
    last = losses[-1:]
    if dist.get_rank() == 0:
        torch.save(
            {
                "loss": last[0][0],
                "loss_after": last[0][1],
                "grads": full_grads,
                "after": full_after,
                "summary": (summary.total_params, summary.fft_params, summary.lora_params),
            },
            args.out,
        )
        print(f"loss {last[0][0]:.6f} -> {last[0][1]:.6f}", flush=True)
    destroy_runtime()


if __name__ == "__main__":
    main()
