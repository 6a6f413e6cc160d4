"""Batched sampling and log-probabilities from Megatron model chunks, at any TP/PP layout.

Sampling recomputes the full (right-padded) prefix at each step instead of keeping a KV cache:
the verifiable tasks this project ships have short answers (a few tokens), where recomputation
costs a few forward passes and keeps the code layout-agnostic (it runs through Megatron's own
pipeline schedule). For long generations serve the policy with an inference engine (vLLM refit).

Layout handling: the last pipeline stage gathers the vocabulary-parallel logits over TP, every TP
rank samples identically (same logits, same seeded generator), and the chosen tokens are
broadcast from the last stage to the other stages, so every rank of a model-parallel group holds
the same sequences. Data-parallel ranks generate for their own prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from megatron_hybrid.config import check_int
from megatron_hybrid.models.vocab import mask_padded_vocab, next_token_nll
from megatron_hybrid.train.step import run_schedule

__all__ = [
    "LogprobSpec",
    "Rollout",
    "SamplingConfig",
    "generate",
    "rollout_seed",
    "sequence_logprobs",
    "token_nll",
]


def rollout_seed(seed: int, step: int, dp_rank: int) -> int:
    """The sampling seed of one data-parallel rank's rollouts at one GRPO step. Within a run it is
    distinct for every (step, rank) below a million steps: two ranks' offsets differ by a multiple
    of 1,000,003, which is a multiple of 7 only as 7 x 1,000,003 (before, ``+ dp_rank`` made rank
    r + 7 at step k sample like rank r at step k + 1)."""
    return seed * 100_003 + step * 7 + dp_rank * 1_000_003


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]."""
    max_new_tokens: int = 8
    """Longest completion."""

    @property
    def logprob_temperature(self) -> float:
        """The temperature log-probabilities are taken at: the sampling one (the ratio and the KL
        must be those of the policy that was sampled), 1 for greedy decoding."""
        return self.temperature if self.temperature > 0 else 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p!r}")
        check_int("sampling.max_new_tokens", self.max_new_tokens)


@dataclass
class Rollout:
    """Prompts with their sampled completions, right-padded. Shapes ``[B, S]``."""

    tokens: torch.Tensor
    """prompt + completion (+ stop token), then pad."""
    prompt_lengths: torch.Tensor
    """``[B]`` tokens of prompt."""
    lengths: torch.Tensor
    """``[B]`` tokens of prompt + completion (including the stop token if one was produced)."""

    def completion_mask(self) -> torch.Tensor:
        """``[B, S-1]`` 1.0 where label position t (predicting token t+1) is a completion token."""
        s = self.tokens.shape[1]
        pos = torch.arange(1, s).unsqueeze(0)
        return (
            (pos >= self.prompt_lengths.unsqueeze(1)) & (pos < self.lengths.unsqueeze(1))
        ).float()

    def completions(self) -> list[list[int]]:
        return [
            self.tokens[i, int(p) : int(n)].tolist()
            for i, (p, n) in enumerate(zip(self.prompt_lengths, self.lengths))
        ]


@dataclass
class _DecodeBatch:
    """One decoding micro-batch: ``tokens [mbs, width]`` and each row's last filled position."""

    tokens: torch.Tensor
    last: torch.Tensor


def _logits_step(data_iterator, model):
    batch = next(data_iterator)
    tokens = batch.tokens
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, positions, None)

    def keep(output):
        # Only the next-token logits of each row [mbs, V/tp]: the full [mbs, width, V/tp] would
        # be kept for every micro-batch until the schedule ends (gigabytes at a real vocabulary).
        rows = torch.arange(output.shape[0], device=output.device)
        nxt = output[rows, batch.last.to(output.device)].detach()
        return torch.zeros((), device=output.device), {"logits": nxt}

    return logits, keep


def equal_micro_batches(tokens: torch.Tensor, micro_batch_size: int | None) -> list[torch.Tensor]:
    """Split rows into micro-batches of one size (pipeline schedules need equal shapes), padding
    the last one with copies of row 0; callers drop outputs beyond the real row count."""
    b = tokens.shape[0]
    mbs = min(micro_batch_size or b, b)
    rows = -(-b // mbs) * mbs
    if rows > b:
        tokens = torch.cat([tokens, tokens[:1].expand(rows - b, -1)], dim=0)
    return list(tokens.split(mbs))


def padded_width(width: int) -> int:
    """Round a sequence width up to a multiple of the TP size (sequence parallelism splits it)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return -(-width // tp) * tp


def _last_stage_src(pp_group: dist.ProcessGroup) -> int:
    ranks = dist.get_process_group_ranks(pp_group)
    return ranks[-1]


def _sample(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> torch.Tensor:
    """Token ids ``[B]`` from logits ``[B, V]`` (float32)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < cfg.top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(
    chunks: Sequence[torch.nn.Module],
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    *,
    stop_token: int | Sequence[int],
    pad_token: int = 0,
    vocab_size: int | None = None,
    seed: int = 0,
    micro_batch_size: int | None = None,
) -> Rollout:
    """Sample one completion per prompt (repeat prompts for groups).

    Args:
        chunks: this rank's model chunks (DDP-wrapped or plain); put them in eval mode yourself.
        prompts: token ids per prompt (this DP rank's prompts).
        stop_token: generation of a row ends after it emits this token (or any of these).
        vocab_size: real vocabulary; logits of padding rows beyond it are never sampled.
        seed: seeds the sampling generator; identical on every rank of a model-parallel group.
        micro_batch_size: rows per forward micro-batch (default: all rows in one).
    """
    b = len(prompts)
    stops = torch.tensor([stop_token] if isinstance(stop_token, int) else list(stop_token))
    prompt_len = torch.tensor([len(p) for p in prompts])
    if (prompt_len < 1).any():
        raise ValueError("every prompt needs at least one token")
    total = padded_width(int(prompt_len.max()) + cfg.max_new_tokens)
    tokens = torch.full((b, total), pad_token, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    lengths = prompt_len.clone()
    done = torch.zeros(b, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    device = next(chunks[0].parameters()).device
    for _ in range(cfg.max_new_tokens):
        width = padded_width(int(lengths.max()))
        inp = tokens[:, :width].to(device)
        micro = equal_micro_batches(inp, micro_batch_size)
        ends = equal_micro_batches((lengths - 1).unsqueeze(1), micro_batch_size)
        micro = [_DecodeBatch(t, e.squeeze(1)) for t, e in zip(micro, ends)]
        reports = run_schedule(chunks, micro, forward_only=True, forward_step=_logits_step)
        nxt = torch.zeros(b, dtype=torch.long)
        if last:
            last_logits = torch.cat([r["logits"] for r in reports], dim=0)[:b]  # [B, V/tp]
            last_logits = gather_from_tensor_model_parallel_region(last_logits).float().cpu()
            if vocab_size is not None:
                last_logits = mask_padded_vocab(last_logits, vocab_size)
            nxt = _sample(last_logits, cfg, gen)
        if pp_group.size() > 1:
            dist.broadcast(nxt, src=_last_stage_src(pp_group), group=pp_group)
        active = ~done
        tokens[active, lengths[active]] = nxt[active]
        lengths = lengths + active.long()
        done = done | (active & torch.isin(nxt, stops))
        if bool(done.all()):
            break
    width = int(lengths.max())
    return Rollout(tokens=tokens[:, :width].clone(), prompt_lengths=prompt_len, lengths=lengths)


@dataclass(frozen=True)
class LogprobSpec:
    """The distribution log-probabilities are taken under: the one :func:`generate` samples from.

    GRPO's ratio and KL are only right for the policy that produced the rollouts, so the old, new
    and reference log-probabilities all use ``softmax(logits / temperature)`` over the real
    vocabulary, as sampling does (TRL and verl scale by the temperature too). Top-p truncation is
    not reflected (as in TRL and verl): with ``top_p < 1`` these are the log-probabilities of the
    untruncated distribution.
    """

    temperature: float = 1.0
    vocab_size: int | None = None
    """Real vocabulary size; logits of the padding rows beyond it (Megatron pads the vocabulary to
    a multiple of 8 x TP) are masked, as in sampling. None keeps them (the model's own loss)."""

    @classmethod
    def of(cls, sampling: SamplingConfig, vocab_size: int | None) -> LogprobSpec:
        return cls(sampling.logprob_temperature, vocab_size)


def token_nll(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    labels: torch.Tensor,
    spec: LogprobSpec = LogprobSpec(),
) -> torch.Tensor:
    """Per-token ``-log p(label)`` under ``spec``'s distribution, ``[b, s]`` (on the last pipeline
    stage; the hidden states elsewhere).

    With ``LogprobSpec()`` this is the model's own (vocabulary-parallel) loss. Otherwise the logits
    are scaled and the padded vocabulary masked first; vocabulary-parallel cross entropy keeps the
    ``V/tp`` logit shards unreduced either way.
    """
    return next_token_nll(
        model,
        tokens,
        positions,
        labels,
        vocab_size=spec.vocab_size,
        temperature=spec.temperature,
    )


def _logprob_step(spec: LogprobSpec, data_iterator, model):
    tokens = next(data_iterator)
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inp.shape[1], device=inp.device).unsqueeze(0).expand_as(inp)
    nll = token_nll(model, inp, positions, labels, spec)

    def keep(output):
        return torch.zeros((), device=output.device), {"logprobs": -output.detach().float()}

    return nll, keep


@torch.no_grad()
def sequence_logprobs(
    chunks: Sequence[torch.nn.Module],
    tokens: torch.Tensor,
    *,
    micro_batch_size: int | None = None,
    spec: LogprobSpec = LogprobSpec(),
) -> torch.Tensor:
    """Per-token log-probabilities ``[B, S-1]`` of ``tokens[:, 1:]`` under ``spec``'s
    distribution (default: the model's softmax over its whole, padded vocabulary).

    Returns the tensor on the last pipeline stage and broadcasts it to the other stages, so every
    rank gets it. Vocabulary-parallel cross entropy handles TP without gathering logits.
    """
    device = next(chunks[0].parameters()).device
    s = tokens.shape[1]
    pad = padded_width(s - 1) - (s - 1)
    if pad:  # right padding never changes earlier positions (causal attention)
        tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], pad)], dim=1)
    micro = equal_micro_batches(tokens.to(device), micro_batch_size)
    reports = run_schedule(
        chunks,
        micro,
        forward_only=True,
        forward_step=partial(_logprob_step, spec),
        seq_length=tokens.shape[1] - 1,
    )
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    out = torch.zeros(tokens.shape[0], s - 1)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        out = torch.cat([r["logprobs"] for r in reports], dim=0).cpu()[: tokens.shape[0], : s - 1]
    if pp_group.size() > 1:
        dist.broadcast(out, src=_last_stage_src(pp_group), group=pp_group)
    return out
