"""Worker: greedy generation and log-probabilities at a TP/PP layout (compared to TP=1 by the test).

Loads the full weights written by ``hybrid_model.py --make-reference`` into this layout, applies a
mixed plan (adapters with nonzero B), generates greedily from fixed prompts, recomputes the
per-token log-probabilities of the result (the model's own softmax, and the sampler's at
temperature 0.7 over the real vocabulary; at TP=1 also from a plain ``log_softmax`` of the
logits), and samples at temperature 1 twice with one seed.
Rank 0 saves everything to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hybrid.data.arith import ArithTask, CharTokenizer
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan
from megatron_hybrid.peft.plan import HybridPlan
from megatron_hybrid.rl.generation import LogprobSpec, SamplingConfig, generate, sequence_logprobs
from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime
from tests.sharding import load_full_state_dict
from tests.workers.hybrid_model import MODEL_CFG, PLAN


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        sequence_parallel=args.sequence_parallel,
    )
    initialize_runtime(parallel, seed=1234)
    chunks = build_model(MODEL_CFG, parallel)
    load_full_state_dict(
        chunks, torch.load(args.reference, weights_only=True)["weights"], MODEL_CFG
    )
    apply_hybrid_plan(chunks, HybridPlan.from_dict(PLAN))
    for c in chunks:
        c.eval()
    tok = CharTokenizer()
    prompts = [tok.encode(p) for p, _ in ArithTask().sample(6, torch.Generator().manual_seed(0))]
    kw = dict(stop_token=tok.eos_id, vocab_size=tok.vocab_size, micro_batch_size=4)
    greedy = generate(chunks, prompts, SamplingConfig(temperature=0.0, max_new_tokens=6), **kw)
    logprobs = sequence_logprobs(chunks, greedy.tokens, micro_batch_size=4)
    sampler = LogprobSpec(temperature=0.7, vocab_size=tok.vocab_size)
    logprobs_t07 = sequence_logprobs(chunks, greedy.tokens, micro_batch_size=4, spec=sampler)
    plain = {}
    if args.tp == 1 and args.pp == 1:  # the reference: log_softmax of the full logits
        inp, labels = greedy.tokens[:, :-1], greedy.tokens[:, 1:]
        with torch.no_grad():
            logits = chunks[0](inp, torch.arange(inp.shape[1]).expand_as(inp), None).float()
        assert logits.shape[-1] > tok.vocab_size, "the check needs a padded vocabulary"
        for name, t, v in (("plain", 1.0, logits.shape[-1]), ("plain_t07", 0.7, tok.vocab_size)):
            lp = torch.log_softmax(logits[..., :v] / t, dim=-1)
            plain[name] = lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    s1 = generate(
        chunks, prompts, SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=6), seed=5, **kw
    )
    s2 = generate(
        chunks, prompts, SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=6), seed=5, **kw
    )
    # Every rank of the model-parallel group must hold the same sequences.
    mine = torch.cat([greedy.tokens.flatten(), greedy.lengths])
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    assert all(torch.equal(g, mine) for g in gathered), "ranks disagree on the generated tokens"
    if dist.get_rank() == 0:
        torch.save(
            {
                "tokens": greedy.tokens,
                "lengths": greedy.lengths,
                "prompt_lengths": greedy.prompt_lengths,
                "logprobs": logprobs,
                "logprobs_t07": logprobs_t07,
                **plain,
                "mask": greedy.completion_mask(),
                "sampled_equal": torch.equal(s1.tokens, s2.tokens),
            },
            args.out,
        )
    destroy_runtime()


if __name__ == "__main__":
    main()
