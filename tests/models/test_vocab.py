"""The next-token loss counts only the real vocabulary: Megatron's padding rows are masked.

Reference: plain ``torch.nn.functional.cross_entropy`` over the first ``vocab_size`` logit columns
of the same model. Before, the SFT loss (Megatron's own, ``labels=``) took its softmax over the
whole padded vocabulary, whose size depends on TP, so one base trained differently at TP=1 and 2.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_hybrid.models.provider import build_model
from megatron_hybrid.models.vocab import next_token_nll, unwrapped_attr
from megatron_hybrid.runtime.distributed import ParallelConfig
from megatron_hybrid.train.step import Batch, run_schedule
from tests.tiny_hybrid import MODEL

VOCAB = 17  # padded to 24 at TP=1


def _batch(gen: torch.Generator) -> Batch:
    tokens = torch.randint(0, VOCAB, (2, 12), generator=gen)
    labels = torch.randint(0, VOCAB, (2, 12), generator=gen)
    mask = (torch.rand(2, 12, generator=gen) < 0.7).float()
    return Batch(tokens=tokens, labels=labels, loss_mask=mask)


def test_sft_loss_takes_its_softmax_over_the_real_vocabulary_only(single_rank_runtime):
    chunks = build_model(replace(MODEL, vocab_size=VOCAB), ParallelConfig())
    model = chunks[0]
    assert unwrapped_attr(model, "unpadded_vocab_size") == VOCAB
    with torch.no_grad():  # padding rows with large logits: counting them would change the loss
        model.output_layer.weight[VOCAB:] = 5.0 * torch.randn_like(
            model.output_layer.weight[VOCAB:]
        )
    gen = torch.Generator().manual_seed(0)
    micro = [_batch(gen), _batch(gen)]
    reports = run_schedule(chunks, micro, forward_only=True)
    total = torch.stack([r["lm loss"] for r in reports]).sum(0)
    got = float(total[0] / total[1])

    want_sum, padded_sum, count = 0.0, 0.0, 0.0
    with torch.no_grad():
        for b in micro:
            logits = model(b.tokens, b.position_ids, None).float()  # [b, s, 24]
            assert logits.shape[-1] == 24
            real = torch.nn.functional.cross_entropy(
                logits[..., :VOCAB].reshape(-1, VOCAB), b.labels.reshape(-1), reduction="none"
            )
            padded = torch.nn.functional.cross_entropy(
                logits.reshape(-1, 24), b.labels.reshape(-1), reduction="none"
            )
            m = b.loss_mask.reshape(-1)
            want_sum += float((real * m).sum())
            padded_sum += float((padded * m).sum())
            count += float(m.sum())
    assert got == pytest.approx(want_sum / count, rel=1e-5)
    assert abs(padded_sum / count - want_sum / count) > 0.1, "the test must see the padding"


class _Hidden(torch.nn.Module):
    """A pipeline chunk without the output layer: returns its hidden states."""

    post_process = False

    def forward(self, tokens, positions, mask):
        return torch.ones(tokens.shape[1], tokens.shape[0], 8)


class _Wrapper(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)


def test_a_chunk_without_the_output_layer_passes_its_hidden_states_on():
    """Under virtual pipelining every chunk of the last rank but the final one returns hidden
    states; before, the GRPO log-probabilities treated them as logits (the last-rank check
    ignored virtual stages)."""
    tokens = torch.zeros(2, 3, dtype=torch.long)
    chunk = _Wrapper(_Hidden())
    out = next_token_nll(chunk, tokens, tokens, tokens, vocab_size=4, temperature=0.7)
    assert torch.equal(out, torch.ones(3, 2, 8))
    assert unwrapped_attr(chunk, "post_process") is False
    assert unwrapped_attr(chunk, "no_such_attribute") is None
