"""Qwen2: the Llama mapping plus q/k/v biases (``add_qkv_bias``), usually with tied embeddings
(small models) and ``rope_theta`` 1e6 in released configs (transformers' default, used when the
config gives none, is 10000). Sliding-window attention is not supported."""

from __future__ import annotations

from megatron_hybrid.convert.arch import ArchSpec, register
from megatron_hybrid.convert.llama import LlamaMapping

__all__ = ["QWEN2"]


def _validate_qwen2(hf: dict) -> None:
    if hf.get("use_sliding_window"):
        raise ValueError(
            "use_sliding_window: true is not supported (Megatron attends causally in full)"
        )
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"layer_types {sorted(kinds)} are not supported (full_attention only)")


QWEN2 = register(
    ArchSpec(
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        qkv_bias=True,
        default_max_position_embeddings=32768,
        validate=_validate_qwen2,
        mapping=LlamaMapping,
    )
)
