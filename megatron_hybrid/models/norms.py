"""Norm layers for the local (non-Transformer-Engine) spec that support sequence parallelism.

Megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel``. Under sequence parallelism each
tensor-parallel rank normalises a different slice of the sequence, so the norm weight's gradient is
a partial sum over tokens: Megatron all-reduces gradients of parameters tagged
``sequence_parallel=True`` over the TP group (``finalize_model_grads``). These norms tag their
parameters that way and otherwise compute exactly ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["SequenceParallelNorm"]


class SequenceParallelNorm(torch.nn.Module):
    """RMSNorm or LayerNorm over the last dimension; signature of Megatron's norm builders.

    Input ``[s, b, h]`` (``s`` is the local sequence shard under sequence parallelism).
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ) -> None:
        super().__init__()
        kind = normalization or config.normalization
        if kind not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"normalization must be 'RMSNorm' or 'LayerNorm', got {kind!r}")
        self.kind = kind
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = (
            torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
            if kind == "LayerNorm"
            else None
        )
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "RMSNorm":
            return torch.nn.functional.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return torch.nn.functional.layer_norm(
            x, (self.hidden_size,), self.weight, self.bias, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.kind}({self.hidden_size}, eps={self.eps})"
