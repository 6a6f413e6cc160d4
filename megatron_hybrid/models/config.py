"""Architecture config of the Llama-style GPT models this project builds with Megatron-Core."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.config import check_int, check_number

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention.

    Defaults describe the tiny model of the embedded demo (runs in seconds on a CPU).
    """

    num_layers: int = 4
    """Decoder layers (split evenly over pipeline stages)."""
    hidden_size: int = 128
    """Model width h."""
    num_attention_heads: int = 4
    """Query heads; must divide hidden_size."""
    num_query_groups: int | None = None
    """Key/value heads for GQA; None means multi-head attention (= num_attention_heads)."""
    ffn_hidden_size: int = 352
    """Width of the MLP; with SwiGLU ``linear_fc1`` has 2 x ffn_hidden_size outputs."""
    vocab_size: int = 32
    """Vocabulary size (padded up to a multiple of 8 x TP by :func:`padded_vocab_size`)."""
    max_sequence_length: int = 64
    """Longest sequence the model sees (RoPE table length)."""
    normalization: str = "RMSNorm"
    """``RMSNorm`` or ``LayerNorm``."""
    norm_epsilon: float = 1e-5
    """Epsilon of the norms."""
    swiglu: bool = True
    """Gated SiLU MLP (``linear_fc1`` fuses gate and up projections)."""
    add_bias_linear: bool = False
    """Biases on the linear layers (Llama: no)."""
    add_qkv_bias: bool = False
    """Bias on ``linear_qkv`` only (Qwen2: yes)."""
    position_embedding_type: str = "rope"
    """``rope`` or ``learned_absolute``."""
    rotary_base: float = 10000
    """RoPE base frequency (HF ``rope_theta``; ``5e5`` or ``500000``)."""
    untie_embeddings_and_output_weights: bool = True
    """Separate output head (Llama); False ties it to the input embedding."""
    init_method_std: float = 0.02
    """Std of the normal weight initialisation."""
    params_dtype: str = "float32"
    """``float32`` or ``bfloat16``."""
    transformer_impl: str = "local"
    """``local`` (Megatron-Core modules; runs on CPU) or ``transformer_engine`` (GPU, TE installed)."""
    fp8: str | None = None
    """Transformer Engine FP8 recipe format (``e4m3`` / ``hybrid``); needs transformer_engine."""
    recompute_granularity: str | None = None
    """``full`` or ``selective`` activation recompute; None disables it."""

    def __post_init__(self) -> None:
        for key in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "ffn_hidden_size",
            "vocab_size",
            "max_sequence_length",
        ):
            check_int(f"model.{key}", getattr(self, key))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        groups = self.num_query_groups
        if groups is not None:
            check_int("model.num_query_groups", groups)
            if self.num_attention_heads % groups:
                raise ValueError(
                    f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                    f"model.num_query_groups ({groups})"
                )
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(
                f"model.normalization must be RMSNorm or LayerNorm, got {self.normalization!r}"
            )
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ValueError(
                "model.position_embedding_type must be 'rope' or 'learned_absolute', "
                f"got {self.position_embedding_type!r}"
            )
        if self.params_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"model.params_dtype must be float32 or bfloat16, got {self.params_dtype!r}"
            )
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise ValueError(
                f"model.transformer_impl must be 'local' or 'transformer_engine', got {self.transformer_impl!r}"
            )
        check_number("model.rotary_base", self.rotary_base, lambda v: v > 0, "> 0")
        if self.fp8 not in (None, "e4m3", "hybrid"):
            raise ValueError(f"model.fp8 must be e4m3, hybrid or null, got {self.fp8!r}")
        if self.fp8 is not None and self.transformer_impl != "transformer_engine":
            raise ValueError("model.fp8 needs model.transformer_impl: transformer_engine")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(
                f"model.recompute_granularity must be full, selective or null, got {self.recompute_granularity!r}"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary rounded up so the embedding shards evenly (to a multiple of 8 x TP; Megatron-LM pads to 128 x TP)."""
        multiple = 8 * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple
