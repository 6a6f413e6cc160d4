"""Fill this rank's model chunks from full (TP=1, unpadded) tensors, at any TP/PP/VPP layout.

The slice each rank needs is read off the model's own sharded state dict: every ShardedTensor
says which block (``global_offset``, ``local_shape``) of which global tensor (``key``) its
parameter holds, and SwiGLU factories say how gate and up rows are split. So this works for every
layout and module the checkpoint code supports, with no per-layout slicing code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_hybrid.checkpoint.state import model_sharded_state_dict, sharded_leaves
from megatron_hybrid.convert.layouts import pad_rows

__all__ = ["fill_from_full"]


def _block(full: torch.Tensor, sh: ShardedTensor) -> torch.Tensor:
    """The block of ``full`` that ``sh`` holds; vocabulary tensors are zero-padded first."""
    if sh.prepend_axis_num or sh.flattened_range is not None:
        raise ValueError(f"{sh.key}: stacked or flattened shards are not supported here")
    want = tuple(sh.global_shape)
    if tuple(full.shape) != want:
        fits = full.shape[1:] == want[1:] and full.shape[0] <= want[0]
        if not (sh.allow_shape_mismatch and fits):
            raise ValueError(
                f"{sh.key}: the source has shape {tuple(full.shape)}, the model {want}"
            )
        full = pad_rows(full, want[0])
    index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset, sh.local_shape))
    return full[index]


@torch.no_grad()
def fill_from_full(
    chunks: Sequence[torch.nn.Module], source: Callable[[str], torch.Tensor]
) -> list[str]:
    """Copy ``source(key)`` (the full tensor of checkpoint key ``key``) into every base weight.

    Returns the keys read. LoRA adapters (if any) are left alone.
    """
    request = model_sharded_state_dict(chunks, "base", include_objects=False)
    keys = []
    for _, leaf in sharded_leaves(request):
        full = source(leaf.key)
        keys.append(leaf.key)
        if isinstance(leaf, ShardedTensorFactory):
            built = leaf.build()
            pieces = [_block(full, sh) for _, sh in sharded_leaves(built)]
            value = leaf.merge_fn(pieces)
        else:
            value = _block(full, leaf)
        if value.shape != leaf.data.shape:
            raise ValueError(
                f"{leaf.key}: got a {tuple(value.shape)} block for a {tuple(leaf.data.shape)} parameter"
            )
        leaf.data.copy_(value.to(leaf.data.dtype))
    return keys
