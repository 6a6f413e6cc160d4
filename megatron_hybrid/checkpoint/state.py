"""Sharded state dicts of model chunks: the whole model, the base only, or the trainables only.

Built on each module's own ``sharded_state_dict`` (Megatron's for base layers, the LoRA wrappers'
for adapters), with Megatron's ``non_homogeneous_layers`` option so that every decoder layer gets
keys of its own, with the GLOBAL layer index and no stacked layer axis::

    decoder.layers.3.self_attention.linear_qkv.weight     [(heads + 2 groups) x head_dim, h]
    decoder.layers.3.self_attention.linear_qkv.lora_A     [r, h]        replicated over TP
    decoder.layers.3.self_attention.linear_qkv.lora_B     [out, r]      sharded on dim 0 over TP
    decoder.layers.3.mlp.linear_fc2.lora_A                [r, ffn]      sharded on dim 1 over TP

Per-layer keys matter for trainables: a plan fully fine-tunes ``linear_fc1`` in some layers only
and gives LoRA ranks per module, which a stacked ``[num_layers, ...]`` tensor cannot express.
Keys are independent of TP, PP and virtual pipeline layout, so a checkpoint loads at any layout.

Loading never goes through ``load_state_dict`` (whose keys differ inside LoRA wrappers: the base
weight is ``<module>.base_layer.weight`` in the module tree but ``<module>.weight`` in the
checkpoint). Instead the tensors that the sharded state dict points at (the parameters
themselves) receive the loaded values: :func:`copy_loaded`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import (
    ShardedBase,
    ShardedObject,
    ShardedTensorFactory,
)

from megatron_hybrid.peft.lora import iter_lora_modules

__all__ = [
    "SELECTIONS",
    "copy_loaded",
    "model_sharded_state_dict",
    "sharded_leaves",
    "unwrap_chunks",
]

#: ``all``: every tensor; ``base``: everything but LoRA adapters; ``trainables``: parameters with
#: ``requires_grad`` (LoRA A/B and FFT module weights after a plan is applied).
SELECTIONS = ("all", "base", "trainables")

_METADATA = {"non_homogeneous_layers": True}


def unwrap_chunks(chunks: Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    """The ``GPTModel`` s inside DDP (or other ``.module``-holding) wrappers."""
    from megatron.core.distributed import DistributedDataParallel

    out = []
    for chunk in chunks:
        while isinstance(chunk, DistributedDataParallel) or type(chunk).__name__ == "Float16Module":
            chunk = chunk.module
        out.append(chunk)
    return out


def sharded_leaves(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """``(path, leaf)`` for every ShardedBase / factory leaf of a nested dict/list."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from sharded_leaves(v, (*path, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from sharded_leaves(v, (*path, i))
    elif isinstance(tree, (ShardedBase, ShardedTensorFactory)):
        yield path, tree


def _get(tree: Any, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _filter(tree: dict, keep) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _filter(v, keep)
            if sub:
                out[k] = sub
        elif keep(v):
            out[k] = v
    return out


def model_sharded_state_dict(
    chunks: Sequence[torch.nn.Module], select: str = "all", *, include_objects: bool = True
) -> dict[str, dict]:
    """``{"model0": <chunk 0's sharded state dict>, ...}`` restricted to ``select``.

    Args:
        chunks: this rank's model chunks (DDP-wrapped or not), with the plan applied when
            ``select`` is ``trainables``.
        select: one of :data:`SELECTIONS`.
        include_objects: keep ``ShardedObject`` entries (``_extra_state`` of linear layers, e.g.
            Transformer Engine FP8 metadata); never kept for ``trainables``.
    """
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    models = unwrap_chunks(chunks)
    adapters = {id(p) for m in iter_lora_modules(models) for p in (m.lora_A, m.lora_B)}
    trainable = {id(p) for m in models for p in m.parameters() if p.requires_grad}

    def keep(leaf: Any) -> bool:
        if isinstance(leaf, ShardedObject):
            return include_objects and select != "trainables"
        data = getattr(leaf, "data", None)
        if select == "base":
            return id(data) not in adapters
        if select == "trainables":
            return id(data) in trainable
        return True

    out = {}
    for i, model in enumerate(models):
        sd = model.sharded_state_dict(metadata=dict(_METADATA))
        out[f"model{i}"] = _filter(sd, keep)
    return out


@torch.no_grad()
def copy_loaded(request: dict, loaded: dict) -> int:
    """Copy every loaded tensor into the tensor its request entry points at; returns the count.

    ``request`` is the sharded state dict passed to ``dist_checkpointing.load`` (its tensor leaves'
    ``data`` are the model's parameters); ``loaded`` is what ``load`` returned (same structure).
    """
    count = 0
    for path, leaf in sharded_leaves(request):
        if isinstance(leaf, ShardedObject):
            continue
        target = leaf.data
        value = _get(loaded, path)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"loaded {'.'.join(map(str, path))} is a {type(value).__name__}, not a tensor"
            )
        if value is not target:
            if value.shape != target.shape:
                raise ValueError(
                    f"loaded {'.'.join(map(str, path))} has shape {tuple(value.shape)}, "
                    f"the model holds {tuple(target.shape)}"
                )
            target.copy_(value)
        count += 1
    return count
