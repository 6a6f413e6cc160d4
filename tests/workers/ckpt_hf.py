"""Worker: HF -> Megatron at TP=2, a few hybrid training steps, merge at TP=2.

Run by ``tests/convert/test_hf_pipeline.py`` (the HF models exist already under ``--dir``)::

    torchrun --nproc_per_node 2 ckpt_hf.py --dir D --arch llama qwen2 --tp 2

Writes ``D/<arch>/base`` (converted), ``D/<arch>/run`` (trainables after 2 steps),
``D/<arch>/merged`` (merged at TP=2) and, from rank 0, ``D/<arch>/tp2.pt``: the HF logits, the
converted model's logits and the hybrid model's logits (all at TP=2) on fixed tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hybrid.checkpoint import load_model, save_trainables
from megatron_hybrid.convert.hf_to_mcore import convert_hf_to_mcore, hf_model_config
from megatron_hybrid.convert.logits import model_logits
from megatron_hybrid.convert.merge import merge_checkpoint
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
from tests.convert.hf_models import hf_logits, load_hf_model

# LoRA on most modules (one at another rank), FFT on an attention and an MLP input projection.
PLAN = HybridPlan.from_dict(
    {
        "lora": {"rank": 4, "alpha": 8.0},
        "seed": 5,
        "modules": {
            "decoder.layers.0.self_attention.linear_qkv": "lora",
            "decoder.layers.0.self_attention.linear_proj": "lora",
            "decoder.layers.0.mlp.linear_fc1": {"mode": "lora", "rank": 2},
            "decoder.layers.0.mlp.linear_fc2": "lora",
            "decoder.layers.1.self_attention.linear_qkv": "fft",
            "decoder.layers.1.self_attention.linear_proj": "lora",
            "decoder.layers.1.mlp.linear_fc1": "fft",
            "decoder.layers.1.mlp.linear_fc2": "lora",
        },
    }
)


def tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


def run(d: Path, arch: str, parallel: ParallelConfig) -> None:
    convert_hf_to_mcore(d / "hf", d / "base", parallel)
    _, model_cfg = hf_model_config(d / "hf")
    toks = tokens(model_cfg.vocab_size)
    chunks = build_model(model_cfg, parallel)
    load_model(d / "base", chunks, model_cfg)
    result = {"converted": model_logits(chunks, toks, model_cfg.vocab_size)}
    apply_hybrid_plan(chunks, PLAN)
    ddp = wrap_ddp(chunks)
    optimizer = build_optimizer(ddp, OptimConfig(lr=2e-2))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        t = torch.randint(0, model_cfg.vocab_size, (2, 17), generator=gen)
        lm_forward_backward(ddp, [Batch(t[:, :-1], t[:, 1:], torch.ones(2, 16))])
        assert optimizer.step()[0]
    save_trainables(
        d / "run", 2, ddp, plan=PLAN, model_cfg=model_cfg, optimizer=optimizer, base=d / "base"
    )
    result["hybrid"] = model_logits(ddp, toks, model_cfg.vocab_size)
    merge_checkpoint(d / "run", d / "merged", parallel)
    if dist.get_rank() == 0:
        result["hf"] = hf_logits(load_hf_model(arch, d / "hf"), toks)
        result["tokens"] = toks
        torch.save(result, d / "tp2.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--arch", nargs="+", required=True)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp)
    initialize_runtime(parallel, seed=1234)
    for arch in args.arch:
        run(args.dir / arch, arch, parallel)
    destroy_runtime()


if __name__ == "__main__":
    main()
