"""The reference policy is the policy at construction, with or without adapters that start nonzero,
and the trained weights come back after each reference forward pass."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan, candidate_names
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.plan import PeftSpec
from megatron_hybrid.rl.reference import ReferencePolicy
from megatron_hybrid.runtime.distributed import ParallelConfig
from tests.tiny_hybrid import FFT_MODULE, MODEL

pytestmark = pytest.mark.usefixtures("single_rank_runtime")

TOKENS = torch.arange(24).reshape(2, 12) % MODEL.vocab_size
POSITIONS = torch.arange(12).expand(2, 12)


def hybrid(b_init: str) -> list[torch.nn.Module]:
    chunks = build_model(MODEL, ParallelConfig())
    spec = PeftSpec(fft_modules=[FFT_MODULE], lora=LoRAConfig(rank=2, b_init=b_init))
    apply_hybrid_plan(chunks, spec.resolve(candidate_names(chunks)))
    return chunks


@torch.no_grad()
def logits(chunks) -> torch.Tensor:
    return chunks[0](TOKENS, POSITIONS, None).clone()


@torch.no_grad()
def train(chunks) -> None:
    """A stand-in for training: move every trainable parameter."""
    gen = torch.Generator().manual_seed(0)
    for p in chunks[0].parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("b_init", ["zero", "gaussian"])
def test_the_reference_is_the_initial_policy_and_training_is_kept(b_init):
    chunks = hybrid(b_init)
    initial = logits(chunks)
    reference = ReferencePolicy(chunks)
    train(chunks)
    trained = logits(chunks)
    assert not torch.allclose(trained, initial)
    with reference.active():
        torch.testing.assert_close(logits(chunks), initial, rtol=0, atol=0)
    torch.testing.assert_close(logits(chunks), trained, rtol=0, atol=0)


@pytest.mark.parametrize(("b_init", "keeps_adapters"), [("zero", False), ("gaussian", True)])
def test_adapters_are_kept_only_when_they_start_nonzero(b_init, keeps_adapters):
    chunks = hybrid(b_init)
    fft = sum(p.numel() for p in chunks[0].get_submodule(FFT_MODULE).parameters())
    adapters = sum(p.numel() for n, p in chunks[0].named_parameters() if ".lora_" in n)
    assert ReferencePolicy(chunks).snapshot_numel == fft + (adapters if keeps_adapters else 0)
