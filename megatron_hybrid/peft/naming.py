"""Global module names for Megatron model chunks.

Megatron numbers decoder layers locally per pipeline stage (``decoder.layers.0`` is the first layer
*of this stage*). Plans and scores must not depend on the layout, so every name here uses the
GLOBAL layer index: ``decoder.layers.<layer.layer_number - 1>.mlp.linear_fc1``. A plan written at
PP=1 therefore applies unchanged at PP=2, PP=4 or with virtual pipeline stages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["CANDIDATE_KINDS", "ModuleRef", "global_name", "module_kind", "walk_modules"]

#: The linear modules of a decoder layer that Hybrid-LoRA scores, adapts or fully fine-tunes.
CANDIDATE_KINDS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")

_LAYER = re.compile(r"^(?P<head>(?:.*\.)?layers)\.(?P<idx>\d+)(?P<tail>(?:\..*)?)$")


@dataclass(frozen=True)
class ModuleRef:
    """Where a module lives on this rank."""

    name: str
    """Global name (global layer index)."""
    local_name: str
    """Name inside its chunk (local layer index), as ``chunk.get_submodule`` takes it."""
    chunk: int
    """Index of the model chunk (virtual pipeline stage) on this rank."""
    module: torch.nn.Module


def module_kind(name: str) -> str:
    """The last component of a module name (``linear_fc1`` for ``decoder.layers.3.mlp.linear_fc1``)."""
    return name.rsplit(".", 1)[-1]


def global_name(chunk: torch.nn.Module, local_name: str) -> str:
    """Map a chunk-local module name to its global name (layer index made global)."""
    m = _LAYER.match(local_name)
    if m is None:
        return local_name
    layers = chunk.get_submodule(m["head"])
    layer = layers[int(m["idx"])]
    number = getattr(layer, "layer_number", None)
    if number is None:
        raise ValueError(f"{m['head']}.{m['idx']} has no layer_number; cannot make its name global")
    return f"{m['head']}.{number - 1}{m['tail']}"


def walk_modules(chunks: Iterable[torch.nn.Module]) -> list[ModuleRef]:
    """Every named submodule of every chunk, with global names (wrapper internals skipped).

    A module wrapped by this project appears once, under the name of the layer it replaced.
    """
    from megatron_hybrid.peft.lora import LoRAParallelLinear

    refs: list[ModuleRef] = []
    for ci, chunk in enumerate(chunks):
        skip: list[str] = []
        for local, module in chunk.named_modules():
            if not local or any(local.startswith(s) for s in skip):
                continue
            if isinstance(module, LoRAParallelLinear):
                skip.append(local + ".")
            refs.append(ModuleRef(global_name(chunk, local), local, ci, module))
    return refs
