"""The reference policy without a second model.

The reference is the policy at construction. LoRA modes: with B (or A) initialised to zero the
adapters add nothing at the start, so the reference is the model with adapters bypassed; when an
adapter starts with a nonzero product (``lora.b_init`` other than ``zero``) its initial A and B are
kept and swapped in instead. FFT / hybrid modes: only the trained full weights differ from the
reference, so we keep a copy of just those (the FFT modules' initial weights) and swap them in for
the reference forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from megatron.core import parallel_state

from megatron_hybrid.peft.lora import adapters_disabled, iter_lora_modules
from megatron_hybrid.runtime.distributed import on_all_ranks

__all__ = ["ReferencePolicy"]


class ReferencePolicy:
    """Snapshot of the trainable full weights at construction; :meth:`active` swaps them in.

    Memory: one copy of the FFT parameters (zero for pure LoRA), never a second model; plus the
    adapters themselves when one of them starts with a nonzero ``B A``.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module]) -> None:
        self.chunks = list(chunks)
        self._full: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        adapters = list(iter_lora_modules(self.chunks))
        lora_params = {id(p) for m in adapters for p in (m.lora_A, m.lora_B)}
        for chunk in self.chunks:
            for p in chunk.parameters():
                if p.requires_grad and id(p) not in lora_params:
                    self._full.append((p, p.detach().clone()))
        # Bypassing is exact only for adapters whose product starts at zero; otherwise keep them.
        # Every model-parallel rank must choose alike: adapters take part in the TP collectives.
        bypass = all(
            not torch.any(m.lora_B).item() or not torch.any(m.lora_A).item() for m in adapters
        )
        mp_group = (
            parallel_state.get_model_parallel_group()
            if parallel_state.model_parallel_is_initialized()
            else None
        )
        self._bypass = bypass if mp_group is None else on_all_ranks(bypass, mp_group)
        if not self._bypass:
            self._full += [(p, p.detach().clone()) for m in adapters for p in (m.lora_A, m.lora_B)]

    @property
    def snapshot_numel(self) -> int:
        """Elements kept for the reference (the FFT parameters, and nonzero-start adapters)."""
        return sum(t.numel() for _, t in self._full)

    @contextlib.contextmanager
    def active(self):
        """Inside the block the chunks compute the reference policy."""
        current = [p.detach().clone() for p, _ in self._full]
        with torch.no_grad():
            for p, ref in self._full:
                p.copy_(ref)
        try:
            with adapters_disabled(self.chunks) if self._bypass else contextlib.nullcontext():
                yield
        finally:
            with torch.no_grad():
                for (p, _), cur in zip(self._full, current):
                    p.copy_(cur)
