"""A row stops at the first of several stop tokens (an instruct model's eos and end of turn)."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.models.provider import build_model
from megatron_hybrid.rl.generation import SamplingConfig, generate
from megatron_hybrid.runtime.distributed import ParallelConfig
from tests.tiny_hybrid import MODEL

pytestmark = pytest.mark.usefixtures("single_rank_runtime")

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]] * 4
CFG = SamplingConfig(temperature=0.0, max_new_tokens=6)  # greedy: rows do not share a stream


def test_each_row_ends_at_its_first_stop_token_of_a_set():
    chunks = build_model(MODEL, ParallelConfig())
    for c in chunks:
        c.eval()

    def rollout(stop):
        return generate(chunks, PROMPTS, CFG, stop_token=stop, vocab_size=MODEL.vocab_size)

    free = rollout(MODEL.vocab_size + 1)  # never sampled: every row runs to max_new_tokens
    assert free.lengths.tolist() == [len(p) + CFG.max_new_tokens for p in PROMPTS]
    # Greedy rows repeat their tokens until they stop. Stop at the first tokens of two rows that
    # begin differently: each of those rows must end at its own stop token.
    firsts = [c[0] for c in free.completions()]
    i = 0
    j = next(k for k, t in enumerate(firsts) if t != firsts[i])
    stops = (firsts[i], firsts[j])
    got = rollout(stops)
    assert got.completions()[i] == [stops[0]] and got.completions()[j] == [stops[1]]
    for full, cut in zip(free.completions(), got.completions()):
        end = next((k + 1 for k, t in enumerate(full) if t in stops), len(full))
        assert cut == full[:end]
    assert any(len(c) < CFG.max_new_tokens for c in got.completions())


def test_decoding_keeps_only_each_rows_next_token_logits():
    """The schedule's reports hold [mbs, V] per micro-batch, not the whole [mbs, width, V]."""
    from megatron_hybrid.rl.generation import _DecodeBatch, _logits_step
    from megatron_hybrid.train.step import run_schedule

    chunks = build_model(MODEL, ParallelConfig())
    tokens = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    last = torch.tensor([2, 1])
    reports = run_schedule(
        chunks, [_DecodeBatch(tokens, last)], forward_only=True, forward_step=_logits_step
    )
    full = chunks[0](tokens, torch.arange(4).expand(2, 4), None)
    assert reports[0]["logits"].shape == (2, full.shape[-1])
    torch.testing.assert_close(reports[0]["logits"], full[torch.arange(2), last])
