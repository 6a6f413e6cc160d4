"""Next-token loss over the real vocabulary of a Megatron ``GPTModel``.

Megatron pads the vocabulary so that its embedding and output layer shard evenly over TP (here to
a multiple of 8 x TP, :meth:`~megatron_hybrid.models.config.ModelConfig.padded_vocab_size`), so the
number of padding rows depends on the layout. Their logits are not tokens: sampling never draws
them, and a loss over them would differ between TP=1 and TP=2 from the same weights (the extra
rows of a larger TP load as zeros). Everything here masks them.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.utils import get_attr_wrapped_model

__all__ = ["mask_padded_vocab", "next_token_nll", "unwrapped_attr"]


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, first: int = 0) -> torch.Tensor:
    """``logits [..., V_part]`` with the columns of Megatron's padding rows (vocabulary ids
    ``>= vocab_size``) set to ``-inf``; ``first`` is the vocabulary id of column 0 (a TP shard
    starts at ``tp_rank * V_part``). Returns ``logits`` itself when the part holds no padding."""
    part = logits.shape[-1]
    if first + part <= vocab_size:
        return logits
    ids = torch.arange(first, first + part, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def unwrapped_attr(model: torch.nn.Module, name: str):
    """Attribute ``name`` of ``model`` or of the module it wraps (DDP, Float16Module, ...), found
    by Megatron's own ``get_attr_wrapped_model``; None when no level has it."""
    try:
        return get_attr_wrapped_model(model, name)
    except RuntimeError:  # no wrapper level has it (a model built outside build_model)
        return None


def next_token_nll(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token ``-log p(label)``, ``[b, s]``, under ``softmax(logits / temperature)`` over the
    first ``vocab_size`` vocabulary ids, from a model chunk that computes the logits
    (``post_process``); other chunks return their hidden states for the next pipeline stage.

    Args:
        model: one model chunk (a ``GPTModel``, possibly wrapped).
        tokens, positions, labels: ``[b, s]``.
        vocab_size: the real vocabulary size; None keeps every row of the padded vocabulary (the
            model's own loss).
        temperature: the logits are divided by it first (GRPO's sampling distribution).

    The logits stay vocabulary-parallel (``[b, s, V/tp]`` per TP rank); Megatron's
    vocabulary-parallel cross entropy reduces over the shards.
    """
    if temperature == 1.0 and vocab_size is None:
        return model(tokens, positions, None, labels=labels)
    out = model(tokens, positions, None)
    if not unwrapped_attr(model, "post_process"):  # hidden states of a non-last chunk
        return out
    logits = out.float() / temperature  # [b, s, V/tp], a new tensor
    if vocab_size is not None:
        first = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
        logits = mask_padded_vocab(logits, vocab_size, first)
    return vocab_parallel_cross_entropy(logits, labels)
