"""Worker: save base + trainables (with optimizer) at one layout, load them at another.

Run under torchrun by ``tests/checkpoint/test_resharding.py``::

    torchrun --nproc_per_node 2 ckpt_reshard.py --dir D --out ref.pt --tp 2 --save
    torchrun --nproc_per_node 2 ckpt_reshard.py --dir D --out got.pt --pp 2

``--save`` builds the model from the seed, saves the base (``D/base``), applies the plan, trains two
steps and saves the trainables with the optimizer (``D/run``). Both modes then record (rank 0):
full-vocabulary logits on a fixed batch, the full (TP=1-layout) trainable tensors, and the loss after
one more optimizer step (which depends on the restored Adam moments and step count).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.checkpoint import load_model, load_trainables, save_model, save_trainables
from megatron_hybrid.convert.logits import model_logits
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan
from megatron_hybrid.peft.plan import HybridPlan
from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime
from megatron_hybrid.train.step import (
    Batch,
    OptimConfig,
    build_optimizer,
    lm_forward_backward,
    wrap_ddp,
)
from tests.sharding import gather_full_state_dict
from tests.workers.hybrid_model import lora_layout, trainable_state

# The vocabulary needs no padding at TP=1 or TP=2: the loss (not the logits) depends on the number
# of padding rows, which differs between TP degrees otherwise (tested by tests/convert instead).
MODEL_CFG = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=48,
    max_sequence_length=32,
    add_qkv_bias=True,
)
PLAN = HybridPlan.from_dict(
    {
        "lora": {"rank": 4, "alpha": 8.0, "b_init": "gaussian"},
        "seed": 3,
        "modules": {
            "decoder.layers.0.self_attention.linear_qkv": "lora",
            "decoder.layers.0.self_attention.linear_proj": {"mode": "lora", "rank": 2},
            "decoder.layers.0.mlp.linear_fc1": "lora",
            "decoder.layers.0.mlp.linear_fc2": "lora",
            "decoder.layers.1.mlp.linear_fc1": "fft",
            "decoder.layers.1.self_attention.linear_qkv": {"mode": "lora", "rank": 8},
            "decoder.layers.2.self_attention.linear_qkv": "fft",
            "decoder.layers.2.mlp.linear_fc2": "lora",
            "decoder.layers.3.self_attention.linear_proj": "fft",
            "decoder.layers.3.mlp.linear_fc1": "lora",
        },
    }
)
OPTIM = OptimConfig(lr=1e-2, adam_eps=1e-3)


def batches(seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, MODEL_CFG.vocab_size, (4, 17), generator=g)
    return [
        Batch(t[:2, :-1], t[:2, 1:], torch.ones(2, 16)),
        Batch(t[2:, :-1], t[2:, 1:], torch.ones(2, 16)),
    ]


def adam_state(ddp, optimizer, which: str) -> list[dict[str, torch.Tensor]]:
    """``which`` (exp_avg / exp_avg_sq) of every trainable, keyed like :func:`trainable_state`."""
    state = {
        id(p): s for opt in optimizer.chained_optimizers for p, s in opt.optimizer.state.items()
    }
    return [
        {n: state[id(p)][which].clone() for n, p in c.module.named_parameters() if p.requires_grad}
        for c in ddp
    ]


def record(ddp, optimizer) -> dict:
    tokens = torch.randint(
        0, MODEL_CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(9)
    )
    logits = model_logits(ddp, tokens, MODEL_CFG.vocab_size)
    full = gather_full_state_dict(
        trainable_state(ddp), MODEL_CFG, layout_fn=lora_layout, replica_atol=0.0
    )
    moments = {
        which: gather_full_state_dict(
            adam_state(ddp, optimizer, which), MODEL_CFG, layout_fn=lora_layout
        )
        for which in ("exp_avg", "exp_avg_sq")
    }
    steps = {
        float(s["step"])
        for opt in optimizer.chained_optimizers
        for s in opt.optimizer.state.values()
    }
    lm_forward_backward(ddp, batches(100))
    assert optimizer.step()[0]
    losses: list = [None] * dist.get_world_size()
    dist.all_gather_object(losses, lm_forward_backward(ddp, batches(101), forward_only=True))
    return {
        "logits": logits,
        "trainables": full,
        "moments": moments,
        "adam_steps": steps,
        "loss_next": next(x for x in losses if x is not None),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp
    )
    initialize_runtime(parallel, seed=1234)
    chunks = build_model(MODEL_CFG, parallel)
    if args.save:
        save_model(args.dir / "base", chunks, MODEL_CFG)
    else:
        torch.nn.init.normal_(next(chunks[0].parameters()))  # loading must overwrite everything
        load_model(args.dir / "base", chunks, MODEL_CFG)
    apply_hybrid_plan(chunks, PLAN)
    ddp = wrap_ddp(chunks)
    optimizer = build_optimizer(ddp, OPTIM)
    if args.save:
        for step in range(2):
            lm_forward_backward(ddp, batches(step))
            assert optimizer.step()[0]
        save_trainables(
            args.dir / "run",
            2,
            ddp,
            plan=PLAN,
            model_cfg=MODEL_CFG,
            optimizer=optimizer,
            base=args.dir / "base",
            training_state={"data": torch.arange(4)},
        )
    else:
        state = load_trainables(
            args.dir / "run", ddp, plan=PLAN, model_cfg=MODEL_CFG, optimizer=optimizer
        )
        assert state.step == 2 and torch.equal(state.state["data"], torch.arange(4)), state
        assert state.optimizer_restored
        assert state.rng_restored == ((args.tp, args.pp) == (2, 1)), state  # saved at TP=2
    result = record(ddp, optimizer)
    if dist.get_rank() == 0:
        result["layout"] = (args.tp, args.pp, parallel_state.get_data_parallel_world_size())
        torch.save(result, args.out)
    destroy_runtime()


if __name__ == "__main__":
    main()
