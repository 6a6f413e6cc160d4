"""Supported HF architectures and the translation of their ``config.json`` to :class:`ModelConfig`.

An :class:`ArchSpec` knows one HF architecture: how its config maps to our ``ModelConfig`` (and
back, for export) and which tensor mapping it uses (:mod:`~megatron_hybrid.convert.llama`).
:func:`arch_for` picks the spec from a config's ``architectures``, or names the supported ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_hybrid.models.config import ModelConfig

__all__ = ["ArchSpec", "arch_by_name", "arch_for", "register", "supported_architectures"]

_REGISTRY: dict[str, ArchSpec] = {}


def _rope_theta(hf: dict, default: float) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if scaling or rope_type not in ("default", None):
        raise ValueError(
            f"RoPE scaling {scaling or params!r} is not supported (Megatron's local RoPE is the plain "
            "rotate-half form); only rope_type 'default' converts"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", default))
    return int(theta) if float(theta).is_integer() else float(theta)


@dataclass(frozen=True)
class ArchSpec:
    """One HF architecture (``LlamaForCausalLM``, ``Qwen2ForCausalLM``)."""

    architecture: str
    """HF class name, as in ``config.json``'s ``architectures``."""
    model_type: str
    """HF ``model_type``."""
    qkv_bias: bool
    """q/k/v projections carry a bias (Qwen2)."""
    default_rope_theta: float = 10000.0
    """``rope_theta`` when ``config.json`` gives none: transformers' default (10000 for both)."""
    default_max_position_embeddings: int = 2048
    """``max_position_embeddings`` when ``config.json`` gives none (transformers' default)."""
    validate: Callable[[dict], None] | None = None
    """Extra checks of the HF config (raise ``ValueError`` naming the unsupported field)."""
    mapping: Callable[[ModelConfig], Any] | None = None
    """Builds the tensor mapping for a model (e.g. :class:`~megatron_hybrid.convert.llama.LlamaMapping`)."""

    def tensor_mapping(self, model: ModelConfig):
        """The tensor mapping of this architecture for ``model``."""
        return self.mapping(model)

    def model_config(self, hf: dict, params_dtype: str | None = None) -> ModelConfig:
        """Our :class:`ModelConfig` for an HF config of this architecture."""
        if self.validate is not None:
            self.validate(hf)
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
        if hf.get("mlp_bias"):
            raise ValueError(
                "mlp_bias: true is not supported (Megatron would add biases to every linear)"
            )
        heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
        head_dim = hf.get("head_dim") or hidden // heads
        if head_dim * heads != hidden:
            raise ValueError(
                f"head_dim {head_dim} x num_attention_heads {heads} != hidden_size {hidden} "
                "is not supported"
            )
        dtype = params_dtype or ("bfloat16" if _hf_dtype(hf) == "bfloat16" else "float32")
        return ModelConfig(
            num_layers=hf["num_hidden_layers"],
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            max_sequence_length=hf.get(
                "max_position_embeddings", self.default_max_position_embeddings
            ),
            normalization="RMSNorm",
            norm_epsilon=hf.get("rms_norm_eps", 1e-6),
            swiglu=True,
            add_bias_linear=False,
            add_qkv_bias=self.qkv_bias,
            position_embedding_type="rope",
            rotary_base=_rope_theta(hf, self.default_rope_theta),
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
            init_method_std=hf.get("initializer_range", 0.02),
            params_dtype=dtype,
        )

    def hf_config(
        self, model: ModelConfig, original: dict | None = None, dtype: str = "float32"
    ) -> dict:
        """An HF ``config.json`` for ``model``; ``original`` (the converted model's config) is kept
        for everything the architecture does not determine (token ids, names, ...)."""
        self.check_model(model)
        out = dict(original or {})
        theta = model.rotary_base
        out.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            hidden_size=model.hidden_size,
            intermediate_size=model.ffn_hidden_size,
            num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.kv_heads,
            num_hidden_layers=model.num_layers,
            head_dim=model.head_dim,
            vocab_size=model.vocab_size,
            max_position_embeddings=out.get("max_position_embeddings", model.max_sequence_length),
            rms_norm_eps=model.norm_epsilon,
            hidden_act="silu",
            tie_word_embeddings=not model.untie_embeddings_and_output_weights,
            rope_theta=theta,
            rope_parameters={"rope_type": "default", "rope_theta": theta},
            torch_dtype=dtype,
            dtype=dtype,
        )
        out.pop("rope_scaling", None)
        if self.model_type == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        return out

    def check_model(self, model: ModelConfig) -> None:
        """Raise ``ValueError`` when ``model`` cannot be expressed as this architecture."""
        problems = []
        if model.normalization != "RMSNorm":
            problems.append(f"normalization {model.normalization}")
        if not model.swiglu:
            problems.append("swiglu false")
        if model.add_bias_linear:
            problems.append("add_bias_linear true")
        if model.add_qkv_bias != self.qkv_bias:
            problems.append(
                f"add_qkv_bias {model.add_qkv_bias} ({self.architecture}: {self.qkv_bias})"
            )
        if model.position_embedding_type != "rope":
            problems.append(f"position_embedding_type {model.position_embedding_type}")
        if problems:
            raise ValueError(
                f"the model cannot be exported as {self.architecture}: {', '.join(problems)}"
            )

    def with_(self, **changes) -> ArchSpec:
        return dataclasses.replace(self, **changes)


def _hf_dtype(hf: dict) -> str | None:
    return hf.get("dtype") or hf.get("torch_dtype")


def register(spec: ArchSpec) -> ArchSpec:
    _REGISTRY[spec.architecture] = spec
    return spec


def supported_architectures() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def _load_builtin() -> None:
    from megatron_hybrid.convert import llama, qwen2  # noqa: F401 - registration side effect


def arch_by_name(name: str) -> ArchSpec:
    """The spec of an architecture (``LlamaForCausalLM``) or model type (``llama``)."""
    _load_builtin()
    for spec in _REGISTRY.values():
        if name.lower() in (spec.architecture.lower(), spec.model_type.lower()):
            return spec
    raise ValueError(
        f"unsupported HF architecture {name!r}; supported: {', '.join(supported_architectures())}"
    )


def arch_for(hf_config: dict) -> ArchSpec:
    """The spec for an HF config (by ``architectures[0]``, else ``model_type``)."""
    names = hf_config.get("architectures") or []
    name = names[0] if names else hf_config.get("model_type")
    if not name:
        raise ValueError(
            "the HF config names no architecture (no 'architectures' or 'model_type'); supported: "
            + ", ".join(supported_architectures())
        )
    return arch_by_name(name)
