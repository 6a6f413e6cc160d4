"""One GRPO / GSPO / Dr.GRPO step on Megatron model chunks: rollout, reward, advantage, update.

Per step and data-parallel rank: sample ``group_size`` completions for each of this rank's
prompts, score them with a verifiable reward, compute group-normalised advantages, recompute the
behaviour log-probabilities (and the reference's when a KL term is on), then run
``updates_per_rollout`` optimizer steps through Megatron's schedule with the clipped policy loss.
The loss is a sum over each micro-batch normalised by a GLOBAL count (tokens, sequences or
sequences x max length) via Megatron's ``calculate_per_token_loss`` path, so any micro-batch /
data-parallel split gives the same update. The update runs without LoRA dropout: its
log-probabilities must be those of the policy that sampled (in eval mode, without dropout), or the
first update's ratio would differ from 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.config import check_int
from megatron_hybrid.peft.lora import adapter_dropout_disabled
from megatron_hybrid.rl.advantages import dynamic_sampling_mask, group_advantages
from megatron_hybrid.rl.generation import (
    LogprobSpec,
    Rollout,
    SamplingConfig,
    generate,
    padded_width,
    sequence_logprobs,
    token_nll,
)
from megatron_hybrid.rl.losses import (
    PolicyLossConfig,
    default_normalization,
    get_policy_loss,
    normalizer_count,
)
from megatron_hybrid.rl.reference import ReferencePolicy
from megatron_hybrid.rl.reward_consensus import score_per_replica
from megatron_hybrid.rl.rewards import get_reward_function
from megatron_hybrid.train.step import (
    OptimConfig,
    optimizer_step,
    run_schedule,
    set_learning_rate,
    to_model_device,
    zero_grads,
)

__all__ = ["GRPOConfig", "RLBatch", "StepStats", "grpo_step"]


@dataclass
class GRPOConfig:
    """Rollout and update settings (``grpo:`` section)."""

    prompts_per_step: int = 16
    """Prompts per optimizer step over all data-parallel ranks."""
    group_size: int = 8
    """Completions sampled per prompt."""
    micro_batch_size: int = 32
    """Sequences per micro-batch in the update and log-prob passes."""
    updates_per_rollout: int = 1
    """Optimizer steps on each rollout batch (1 = strictly on-policy)."""
    recompute_old_logprobs: bool = False
    """Take the old (behaviour) log-probabilities in a separate forward pass after sampling.
    False: with one update per rollout the policy has not changed since sampling, so the update's
    own log-probabilities, detached, are the old ones (ratio 1, the same gradient; one forward pass
    fewer, as in TRL); with ``updates_per_rollout > 1`` they are always recomputed."""
    reward: str = "exact_int"
    """Reward function name (see ``megatron_hybrid.rl.rewards``)."""
    scale_advantages: bool | None = None
    """Divide by the group's reward std (GRPO, GSPO); False subtracts the mean only (Dr.GRPO).
    None (the default) derives it from ``loss.loss``: False for ``dr_grpo``, True otherwise."""
    filter_groups: bool = False
    """Dynamic sampling: drop groups whose rewards are all equal (they carry no signal)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        if isinstance(self.loss, dict):
            loss = dict(self.loss)
            norm = loss.get("normalization") or default_normalization(loss.get("loss", "grpo"))
            if norm == "constant" and loss.get("max_response_length") is None:
                # Dr.GRPO's constant normaliser: the longest completion the sampler can produce.
                loss["max_response_length"] = self.sampling.max_new_tokens
            self.loss = PolicyLossConfig(**loss)
        for key in ("prompts_per_step", "group_size", "micro_batch_size", "updates_per_rollout"):
            check_int(f"grpo.{key}", getattr(self, key), minimum=2 if key == "group_size" else 1)
        dr_grpo = self.loss.loss == "dr_grpo"
        if self.scale_advantages is None:
            self.scale_advantages = not dr_grpo
        elif not isinstance(self.scale_advantages, bool):
            raise ValueError(
                f"grpo.scale_advantages must be true, false or null, got {self.scale_advantages!r}"
            )
        elif dr_grpo and self.scale_advantages:
            raise ValueError(
                "grpo.scale_advantages=true contradicts loss.loss=dr_grpo (Dr.GRPO does not divide "
                "advantages by the group std); leave it unset or use loss.loss=grpo"
            )
        if not isinstance(self.recompute_old_logprobs, bool):
            raise ValueError(
                "grpo.recompute_old_logprobs must be true or false, "
                f"got {self.recompute_old_logprobs!r}"
            )
        if self.sampling.temperature == 0:
            raise ValueError(
                "grpo.sampling.temperature=0 samples every completion of a group greedily, so "
                "their rewards are equal and every advantage is 0 (nothing trains); sample at a "
                "temperature > 0 (the held-out evaluation is greedy either way)"
            )
        get_reward_function(self.reward)

    @property
    def reuses_policy_logprobs(self) -> bool:
        """Whether the update takes its own detached log-probabilities as the old ones."""
        return self.updates_per_rollout == 1 and not self.recompute_old_logprobs

    @classmethod
    def from_dict(cls, d: dict, base: GRPOConfig | None = None) -> GRPOConfig:
        """Build from a ``grpo:`` mapping; keys it does not name come from ``base`` (default: the
        class defaults). In its ``loss:`` section, naming another ``loss`` re-derives the
        normalisation unless the section names one too (``loss=dr_grpo`` alone is Dr.GRPO), and so
        does ``scale_advantages`` unless ``d`` names it; a constant normalisation without
        ``max_response_length`` takes ``sampling.max_new_tokens`` (and follows a new one).
        """
        from megatron_hybrid.config import check_known_keys
        from megatron_hybrid.config import from_dict as build

        base = base if base is not None else cls()
        loss = d.get("loss")
        if loss is not None and not isinstance(loss, dict | PolicyLossConfig):
            raise ValueError(f"loss: expected a mapping, got {type(loss).__name__} {loss!r}")
        rest = {k: v for k, v in d.items() if k not in ("loss", "scale_advantages")}
        # Built first with the base's loss and scale (consistent with each other); the final loss
        # and scale are set together below, where __post_init__ checks them against each other.
        cfg = build(cls, rest, base=base)
        if isinstance(loss, PolicyLossConfig):
            final: PolicyLossConfig | dict = loss
        else:
            named = loss or {}
            check_known_keys(PolicyLossConfig, named, "loss")
            final = asdict(base.loss)
            if named.get("loss", base.loss.loss) != base.loss.loss:
                final["normalization"] = None  # derived from the old loss: derive it again
                if default_normalization(base.loss.loss) == "constant":
                    final["max_response_length"] = None
            elif (
                base.loss.normalization == "constant"
                and "max_response_length" not in named
                and base.loss.max_response_length == base.sampling.max_new_tokens
            ):
                final["max_response_length"] = None  # taken from the sampler: follow it
            final.update(named)
        new_loss = final.loss if isinstance(final, PolicyLossConfig) else final["loss"]
        scale = d.get(
            "scale_advantages", base.scale_advantages if new_loss == base.loss.loss else None
        )
        return replace(cfg, loss=final, scale_advantages=scale)


@dataclass
class RLBatch:
    """One micro-batch of the policy update. ``[b, s]`` tensors are aligned with labels."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    old_logprobs: torch.Tensor | None
    """None: on-policy, the update's own log-probabilities (detached) are the old ones."""
    advantages: torch.Tensor
    """``[b]`` one advantage per sequence."""
    ref_logprobs: torch.Tensor | None = None

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.tokens.shape
        return torch.arange(s, device=self.tokens.device).unsqueeze(0).expand(b, s)


@dataclass
class StepStats:
    """What one step did (global over data-parallel ranks)."""

    reward_mean: float
    accuracy: float
    """Fraction of completions with reward 1."""
    loss: float | None
    """The first update's loss, on every rank; None when no group was kept (no update)."""
    reward_errors: int = 0
    reward_timeouts: int = 0
    reward_first_error: str | None = None
    """This data-parallel rank's first failed reward call (``completion <i>: <type>: <message>``)."""
    kept_groups: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def _policy_forward_step(loss_cfg: PolicyLossConfig, spec: LogprobSpec, data_iterator, model):
    batch: RLBatch = to_model_device(next(data_iterator), model)
    nll = token_nll(model, batch.tokens, batch.position_ids, batch.labels, spec)
    loss_fn = get_policy_loss(loss_cfg.loss)

    def loss_func(output):
        logprobs = -output.float()
        old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs
        loss, metrics = loss_fn(
            logprobs,
            old,
            batch.advantages,
            batch.loss_mask,
            loss_cfg,
            ref_logprobs=batch.ref_logprobs,
            normalizer=1.0,
        )
        count = normalizer_count(batch.loss_mask, loss_cfg)
        report = {"loss": torch.stack([loss.detach(), count.float()])}
        report.update({k: v.detach().float().reshape(()) for k, v in metrics.items()})
        # A registered loss that does not say what its mean metrics average over: its tokens.
        report.setdefault("stat_count", batch.loss_mask.sum().float())
        return loss, count.to(torch.int), report

    return nll, loss_func


def make_micro_batches(
    rollout: Rollout,
    old: torch.Tensor | None,
    adv: torch.Tensor,
    ref: torch.Tensor | None,
    mbs: int,
) -> list[RLBatch]:
    """The update's micro-batches of ``mbs`` sequences; ``old`` / ``ref`` are ``[b, s - 1]``
    log-probabilities aligned with the labels (``old`` None: on-policy, see :class:`RLBatch`)."""

    def widen(t: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
        if t is None or not (rows or cols):
            return t
        t = torch.cat([t, t.new_zeros(t.shape[0], cols)], dim=1)
        return torch.cat([t, t.new_zeros(rows, t.shape[1])], dim=0)

    tokens = rollout.tokens
    mask = rollout.completion_mask()
    pad = padded_width(tokens.shape[1] - 1) - (tokens.shape[1] - 1)
    # Sequence parallelism needs a width divisible by TP, and pipeline schedules need equal
    # micro-batches: pad columns and rows, masked out of the loss (rows also get advantage 0).
    b = tokens.shape[0]
    mbs = min(mbs, b)
    extra = -(-b // mbs) * mbs - b
    tokens = torch.cat([tokens, tokens.new_zeros(b, pad)], dim=1)
    tokens = torch.cat([tokens, tokens[:1].expand(extra, -1)], dim=0)
    mask, old, ref = (widen(t, extra, pad) for t in (mask, old, ref))
    adv = torch.cat([adv, adv.new_zeros(extra)])
    out = []
    for s in range(0, tokens.shape[0], mbs):
        sl = slice(s, s + mbs)
        out.append(
            RLBatch(
                tokens=tokens[sl, :-1],
                labels=tokens[sl, 1:],
                loss_mask=mask[sl],
                old_logprobs=None if old is None else old[sl],
                advantages=adv[sl],
                ref_logprobs=None if ref is None else ref[sl],
            )
        )
    return out


def policy_update(
    ddp_chunks: Sequence[torch.nn.Module],
    optimizer,
    micro: Sequence[RLBatch],
    loss_cfg: PolicyLossConfig,
    optim: OptimConfig,
    step: int,
    total_steps: int,
    *,
    spec: LogprobSpec | None = None,
) -> tuple[float | None, dict[str, float]]:
    """One optimizer step of the clipped policy loss over this DP rank's micro-batches.

    ``spec``: the distribution log-probabilities are taken under; the sampler's
    (``LogprobSpec.of(sampling, vocab_size)``), like the micro-batches' ``old_logprobs``. None:
    the model's own softmax (``LogprobSpec()``).

    Returns the loss and metrics on every rank (computed on the last pipeline stage and broadcast
    over the pipeline group, so that rank 0's logs have them at PP > 1 too; every rank must call
    this), all global over the data-parallel group: ``grad_norm`` is the gradient norm over all
    shards before ``optim.clip_grad``; the loss, ``pg_loss`` and
    ``kl`` are sums over every rank's micro-batches divided by the global normaliser count (what
    the gradient is divided by); clip fractions and the mean ratio are averages weighted by the
    tokens (GSPO: sequences) they are taken over; ``num_tokens`` / ``num_sequences`` are totals.
    """
    zero_grads(ddp_chunks)
    reports = run_schedule(
        ddp_chunks,
        micro,
        forward_step=partial(_policy_forward_step, loss_cfg, spec or LogprobSpec()),
    )
    set_learning_rate(optimizer, optim, step, total_steps)
    grad_norm = optimizer_step(optimizer, f"policy step {step}")
    loss, metrics = None, {}
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        loss, metrics = _global_metrics(reports)
    metrics["grad_norm"] = float(grad_norm)
    return _from_last_stage(loss, metrics)


def _global_metrics(reports: Sequence[dict[str, torch.Tensor]]) -> tuple[float, dict[str, float]]:
    """The last stage's loss and metrics over the global batch (see :func:`policy_update`)."""
    summed = _summed_metrics(reports)
    # Every DP peer of a last-stage rank is a last-stage rank: the reduction stays among them.
    keys = sorted(summed)
    total = dict(zip(keys, _dp_sum([summed[k] for k in keys]), strict=True))
    count = max(total.pop("count"), 1.0)
    weight = max(total.pop("stat_count"), 1.0)
    metrics: dict[str, float] = {}
    for k, v in total.items():
        if k in ("loss", "pg_loss", "kl"):  # sums (the loss runs with normalizer=1)
            metrics[k] = v / count
        elif k in ("num_tokens", "num_sequences"):
            metrics[k] = v
        else:  # means over stat_count tokens / sequences
            metrics[k] = v / weight
    return metrics.pop("loss"), metrics


def _from_last_stage(
    loss: float | None, metrics: dict[str, float]
) -> tuple[float | None, dict[str, float]]:
    """The last pipeline stage's ``(loss, metrics)`` on every stage (a CPU object broadcast: the
    pipeline group carries gloo for CPU tensors next to NCCL)."""
    pp = parallel_state.get_pipeline_model_parallel_group()
    if pp.size() == 1:
        return loss, metrics
    payload = [(loss, metrics)]
    dist.broadcast_object_list(
        payload,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=pp,
        device=torch.device("cpu"),
    )
    return payload[0]


def _summed_metrics(reports: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """This rank's micro-batch reports as sums that add up over DP ranks: the loss and its count,
    ``pg_loss`` / ``kl`` (already sums), counts, and ``stat_count``-weighted means."""
    out: dict[str, float] = {}
    loss = torch.stack([r["loss"] for r in reports]).sum(0)
    out["loss"], out["count"] = float(loss[0]), float(loss[1])
    weights = torch.stack([r["stat_count"] for r in reports])
    for k in reports[0]:
        if k == "loss":
            continue
        values = torch.stack([r[k] for r in reports])
        plain = k in ("pg_loss", "kl", "num_tokens", "num_sequences", "stat_count")
        out[k] = float(values.sum() if plain else (values * weights).sum())
    return out


def _dp_sum(values: Sequence[float]) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    dp = parallel_state.get_data_parallel_group()
    if dp.size() > 1:
        dist.all_reduce(t, group=dp)
    return t.tolist()


def grpo_step(
    ddp_chunks: Sequence[torch.nn.Module],
    optimizer,
    prompts: Sequence[tuple[list[int], str]],
    cfg: GRPOConfig,
    *,
    decode: Callable[[list[int]], str],
    stop_token: int | Sequence[int],
    vocab_size: int,
    seed: int,
    optim: OptimConfig,
    step: int,
    total_steps: int,
    reference: ReferencePolicy | None = None,
) -> StepStats:
    """One GRPO step on this DP rank's ``prompts`` (token ids, reference answer)."""
    group = cfg.group_size
    expanded = [p for p, _ in prompts for _ in range(group)]
    answers = [a for _, a in prompts for _ in range(group)]
    for c in ddp_chunks:
        c.eval()
    rollout = generate(
        ddp_chunks,
        expanded,
        cfg.sampling,
        stop_token=stop_token,
        vocab_size=vocab_size,
        seed=seed,
        micro_batch_size=cfg.micro_batch_size,
    )
    texts = [decode(c) for c in rollout.completions()]
    rewards, rstats = score_per_replica(get_reward_function(cfg.reward), texts, answers)
    adv = group_advantages(rewards, group, scale=cfg.scale_advantages)
    keep_groups = (
        dynamic_sampling_mask(rewards, group)
        if cfg.filter_groups
        else torch.ones(len(prompts), dtype=torch.bool)
    )
    keep = keep_groups.repeat_interleave(group)
    spec = LogprobSpec.of(cfg.sampling, vocab_size)
    old = None
    if not cfg.reuses_policy_logprobs:
        old = sequence_logprobs(
            ddp_chunks, rollout.tokens, micro_batch_size=cfg.micro_batch_size, spec=spec
        )
    ref = None
    if cfg.loss.kl_coef > 0:
        if reference is None:
            raise ValueError("grpo.loss.kl_coef > 0 needs a reference policy")
        with reference.active():
            ref = sequence_logprobs(
                ddp_chunks,
                rollout.tokens,
                micro_batch_size=cfg.micro_batch_size,
                spec=spec,
            )
    for c in ddp_chunks:
        c.train()

    if bool(keep.any()):
        idx = keep.nonzero().squeeze(1)
        kept = Rollout(rollout.tokens[idx], rollout.prompt_lengths[idx], rollout.lengths[idx])
    else:
        # Dynamic sampling left this rank nothing, but other DP ranks may have kept groups: take
        # part in their update with one row whose completion is masked out (it adds 0 to the loss
        # and to the global token count), instead of skipping the step everywhere.
        idx = torch.zeros(1, dtype=torch.long)
        kept = Rollout(rollout.tokens[:1], rollout.prompt_lengths[:1], rollout.prompt_lengths[:1])
    micro = make_micro_batches(
        kept,
        None if old is None else old[idx],
        torch.where(keep[idx], adv[idx], 0.0),
        None if ref is None else ref[idx],
        cfg.micro_batch_size,
    )
    loss_value, metrics = None, {}
    # Every DP rank runs the same number of schedule calls (DDP all-reduces inside); none when no
    # rank kept a group (an update would have no tokens to normalise by).
    if _dp_sum([float(keep_groups.sum())])[0] > 0:
        with adapter_dropout_disabled(ddp_chunks):
            for update in range(cfg.updates_per_rollout):
                lv, mv = policy_update(
                    ddp_chunks,
                    optimizer,
                    micro,
                    cfg.loss,
                    optim,
                    step,
                    total_steps,
                    spec=spec,
                )
                if update == 0:
                    loss_value, metrics = lv, mv
    n = len(texts)
    total_reward, exact, n_all, errs, tos, kept_g = _dp_sum(
        [
            float(rewards.sum()),
            float((rewards == 1).sum()),
            float(n),
            rstats.errors,
            rstats.timeouts,
            float(keep_groups.sum()),
        ]
    )
    return StepStats(
        reward_mean=total_reward / max(n_all, 1),
        accuracy=exact / max(n_all, 1),
        loss=loss_value,
        reward_errors=int(errs),
        reward_timeouts=int(tos),
        reward_first_error=rstats.first_error,
        kept_groups=int(kept_g),
        metrics=metrics,
    )
