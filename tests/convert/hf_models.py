"""Tiny random HF Llama / Qwen2 models built offline from configs (test helper).

``make_hf_model("llama", path)`` writes ``config.json`` + ``model.safetensors`` and returns the
``transformers`` model (fp32, eager attention). Every parameter is perturbed from the library's
init, so norms and Qwen2's q/k/v biases are not trivially 1 / 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

CONFIGS = {
    # vocab 100 (97) pads to 104 rows at TP=1 and 112 at TP=2: conversion must pad and strip.
    "llama": dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=5000.0,
        tie_word_embeddings=False,
    ),
    # Qwen2: q/k/v biases, tied embeddings, rope_theta 1e6, 8 query heads over 2 groups.
    "qwen2": dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ),
}


def hf_config(arch: str):
    import transformers

    cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    return cls(**CONFIGS[arch])


def hf_model_class(arch: str):
    import transformers

    return transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM


def make_hf_model(arch: str, path: Path, seed: int = 0):
    """Build, perturb, save (safetensors) and return a tiny random model."""
    torch.manual_seed(seed)
    config = hf_config(arch)
    config._attn_implementation = "eager"
    model = hf_model_class(arch)(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return model


def load_hf_model(arch: str, path: Path):
    model = hf_model_class(arch).from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()
