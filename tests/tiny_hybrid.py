"""A two-layer GPTModel (``MODEL``, also used alone by scoring tests) and a small hybrid plan on it,
for single-rank training tests.

Layer 1's ``linear_fc1`` is fully fine-tuned; every other linear module gets rank-2 LoRA with a
Gaussian (nonzero) B, so adapters affect the forward pass from the start. Call it inside the
``single_rank_runtime`` fixture.
"""

from __future__ import annotations

from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan, candidate_names
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.plan import PeftSpec
from megatron_hybrid.runtime.distributed import ParallelConfig
from megatron_hybrid.train.step import wrap_ddp

MODEL = ModelConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=32,
    max_sequence_length=16,
)
FFT_MODULE = "decoder.layers.1.mlp.linear_fc1"


def tiny_hybrid_ddp(parallel: ParallelConfig | None = None, lora_dropout: float = 0.0) -> list:
    """The model's DDP-wrapped chunks with the plan applied (trainables only in DDP)."""
    chunks = build_model(MODEL, parallel or ParallelConfig())
    lora = LoRAConfig(rank=2, b_init="gaussian", dropout=lora_dropout)
    spec = PeftSpec(fft_modules=[FFT_MODULE], lora=lora)
    apply_hybrid_plan(chunks, spec.resolve(candidate_names(chunks)))
    return wrap_ddp(chunks)
