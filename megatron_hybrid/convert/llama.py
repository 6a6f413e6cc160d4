"""Llama-family tensor mapping between HF names and Megatron-Core checkpoint keys.

Megatron keys are those of the sharded checkpoint (:mod:`megatron_hybrid.checkpoint.state`), full
(TP=1) shapes, h = hidden, d = head dim, n / g = query heads / groups, f = ffn::

    HF                                          Megatron-Core
    model.embed_tokens.weight [V, h]            embedding.word_embeddings.weight [V (+pad), h]
    model.layers.i.input_layernorm.weight       decoder.layers.i.self_attention.linear_qkv.layer_norm_weight
    model.layers.i.self_attn.{q,k,v}_proj       decoder.layers.i.self_attention.linear_qkv  [(n + 2g) d, h]
      .weight / .bias (Qwen2)                     interleaved per query group (layouts.fuse_qkv)
    model.layers.i.self_attn.o_proj.weight      decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm     decoder.layers.i.mlp.linear_fc1.layer_norm_weight
    model.layers.i.mlp.{gate,up}_proj.weight    decoder.layers.i.mlp.linear_fc1.weight [2f, h] = [gate; up]
    model.layers.i.mlp.down_proj.weight         decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                           decoder.final_layernorm.weight
    lm_head.weight (untied only)                output_layer.weight

The same mapping serves Qwen2 (which adds q/k/v biases): :mod:`~megatron_hybrid.convert.qwen2`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

from megatron_hybrid.convert.arch import ArchSpec, register
from megatron_hybrid.convert.layouts import fuse_gate_up, fuse_qkv, split_gate_up, split_qkv
from megatron_hybrid.models.config import ModelConfig

__all__ = ["LLAMA", "LlamaMapping"]

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
#: HF tensors that carry no weights of their own (recomputed buffers).
IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")

#: Megatron module -> HF modules (within a layer), in Megatron's row order.
MODULES = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}
_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
}


class LlamaMapping:
    """Tensor conversion for one :class:`ModelConfig` (GQA sizes, biases, tied embeddings)."""

    def __init__(self, model: ModelConfig) -> None:
        self.model = model
        self.n, self.g, self.d = model.num_attention_heads, model.kv_heads, model.head_dim

    # -- names -----------------------------------------------------------------------------------
    def mcore_keys(self) -> list[str]:
        """Every Megatron checkpoint key of the full model."""
        keys = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
        if self.model.untie_embeddings_and_output_weights:
            keys.append("output_layer.weight")
        for i in range(self.model.num_layers):
            p = f"decoder.layers.{i}."
            keys += [p + k for k in _NORMS]
            keys += [p + m + ".weight" for m in MODULES]
            if self.model.add_qkv_bias:
                keys.append(p + "self_attention.linear_qkv.bias")
        return keys

    def hf_modules(self, mcore_module: str) -> list[str]:
        """HF module names of a Megatron linear (``decoder.layers.3.mlp.linear_fc1`` ->
        ``[model.layers.3.mlp.gate_proj, model.layers.3.mlp.up_proj]``)."""
        if mcore_module == "output_layer":
            if not self.model.untie_embeddings_and_output_weights:
                raise ValueError(
                    "output_layer is tied to the embedding; HF has no separate lm_head"
                )
            return ["lm_head"]
        m = _LAYER.match(mcore_module)
        if m is None or m[2] not in MODULES:
            raise ValueError(f"{mcore_module} has no HF counterpart in this architecture")
        return [f"model.layers.{m[1]}.{hf}" for hf in MODULES[m[2]]]

    # -- rows of fused modules -------------------------------------------------------------------
    def split_rows(self, mcore_module: str, tensor: torch.Tensor) -> list[torch.Tensor]:
        """A full Megatron tensor with the module's output rows (weight, bias, LoRA B) split into
        the HF modules of :meth:`hf_modules`, in the same order (vocabulary padding dropped)."""
        if mcore_module == "output_layer":
            return [tensor[: self.model.vocab_size]]  # drop vocabulary padding rows
        kind = _LAYER.match(mcore_module)[2]
        if kind == "self_attention.linear_qkv":
            return list(split_qkv(tensor, self.n, self.g, self.d))
        if kind == "mlp.linear_fc1":
            return list(split_gate_up(tensor))
        return [tensor]

    def fuse_rows(self, mcore_module: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split_rows`."""
        kind = _LAYER.match(mcore_module)[2]
        if kind == "self_attention.linear_qkv":
            return fuse_qkv(*parts, self.n, self.g, self.d)
        if kind == "mlp.linear_fc1":
            return fuse_gate_up(*parts)
        (only,) = parts
        return only

    # -- HF -> Megatron --------------------------------------------------------------------------
    def hf_sources(self, key: str) -> list[str]:
        """HF tensor names that Megatron key ``key`` is built from (in fusion order)."""
        direct = {
            "embedding.word_embeddings.weight": "model.embed_tokens.weight",
            "output_layer.weight": "lm_head.weight",
            "decoder.final_layernorm.weight": "model.norm.weight",
        }
        if key in direct:
            return [direct[key]]
        m = _LAYER.match(key)
        if m is not None:
            layer, rest = m[1], m[2]
            if rest in _NORMS:
                return [f"model.layers.{layer}.{_NORMS[rest]}"]
            module, _, leaf = rest.rpartition(".")
            if module in MODULES and leaf in ("weight", "bias"):
                return [f"{n}.{leaf}" for n in self.hf_modules(f"decoder.layers.{layer}.{module}")]
        raise KeyError(f"no HF source for Megatron key {key!r}")

    def mcore_tensor(self, key: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The full Megatron tensor ``key`` built from HF tensors read with ``get(name)``
        (vocabulary rows unpadded)."""
        parts = [get(name) for name in self.hf_sources(key)]
        if len(parts) == 1:
            return parts[0]
        return self.fuse_rows(key.rpartition(".")[0], parts)

    def hf_names_used(self) -> set[str]:
        """Every HF tensor name that :meth:`mcore_tensor` reads for the full model."""
        return {name for key in self.mcore_keys() for name in self.hf_sources(key)}

    # -- Megatron -> HF --------------------------------------------------------------------------
    def hf_tensors(self, mcore: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF state dict from full Megatron tensors (vocabulary padding already stripped)."""
        missing = [k for k in self.mcore_keys() if k not in mcore]
        if missing:
            raise KeyError(
                f"the Megatron checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        out = {
            "model.embed_tokens.weight": mcore["embedding.word_embeddings.weight"],
            "model.norm.weight": mcore["decoder.final_layernorm.weight"],
        }
        if self.model.untie_embeddings_and_output_weights:
            out["lm_head.weight"] = mcore["output_layer.weight"]
        for i in range(self.model.num_layers):
            p = f"decoder.layers.{i}."
            for src, dst in _NORMS.items():
                out[f"model.layers.{i}.{dst}"] = mcore[p + src]
            for module in MODULES:
                name = p + module
                leaves = ["weight"] + (
                    ["bias"] if module.endswith("linear_qkv") and self.model.add_qkv_bias else []
                )
                for leaf in leaves:
                    parts = self.split_rows(name, mcore[f"{name}.{leaf}"])
                    for hf, t in zip(self.hf_modules(name), parts):
                        out[f"{hf}.{leaf}"] = t
        return out


def _validate_llama(hf: dict) -> None:
    if hf.get("attention_bias"):
        raise ValueError(
            "attention_bias: true is not supported (o_proj would need a bias; Megatron's "
            "add_qkv_bias covers q/k/v only)"
        )


LLAMA = register(
    ArchSpec(
        architecture="LlamaForCausalLM",
        model_type="llama",
        qkv_bias=False,
        validate=_validate_llama,
        mapping=LlamaMapping,
    )
)
