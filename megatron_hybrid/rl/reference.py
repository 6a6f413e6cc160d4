"""The reference policy without a second model.

LoRA modes: the reference is the model with adapters bypassed. FFT / hybrid modes: only the
trained full weights differ from the reference, so we keep a copy of just those (the FFT modules'
initial weights) and swap them in for the reference forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from megatron_hybrid.peft.lora import LoRAParallelLinear, adapters_disabled

__all__ = ["ReferencePolicy"]


class ReferencePolicy:
    """Snapshot of the trainable full weights at construction; :meth:`active` swaps them in.

    Memory: one copy of the FFT parameters (zero for pure LoRA), never a second model.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module]) -> None:
        self.chunks = list(chunks)
        self._full: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for chunk in self.chunks:
            lora_params = {
                id(p)
                for m in chunk.modules()
                if isinstance(m, LoRAParallelLinear)
                for p in (m.lora_A, m.lora_B)
            }
            for p in chunk.parameters():
                if p.requires_grad and id(p) not in lora_params:
                    self._full.append((p, p.detach().clone()))

    @property
    def snapshot_numel(self) -> int:
        """Elements kept for the reference (the FFT parameters)."""
        return sum(t.numel() for _, t in self._full)

    @contextlib.contextmanager
    def active(self):
        """Inside the block the chunks compute the reference policy."""
        current = [p.detach().clone() for p, _ in self._full]
        with torch.no_grad():
            for p, ref in self._full:
                p.copy_(ref)
        try:
            with adapters_disabled(self.chunks):
                yield
        finally:
            with torch.no_grad():
                for (p, _), cur in zip(self._full, current):
                    p.copy_(cur)
