"""Calibration passes that produce, per candidate module, a matrix sharded like its weight.

* :func:`accumulate_gradients`: ``G = sum_k grad_k`` of the loss (a per-token mean, or the
  source's own normaliser) over K calibration steps, run through Megatron's pipeline schedule at any TP/PP layout, averaged over
  data-parallel replicas. Only the candidate weights require grad during the pass, so no gradient
  of any other parameter is ever allocated.
* :func:`probe_weight_deltas`: a short full-fine-tuning probe (P AdamW steps from the base) of the
  candidates, in groups so that optimizer state for all candidates is never held at once; returns
  (or hands to a callback as each group finishes) each module's weight change ``dW``, and the Adam
  moments' ``sum m^2 / (sqrt(v) + eps)`` (EPD), then restores the base weights bitwise.

Both leave every ``requires_grad`` flag and ``.grad`` as they found them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.config import check_int
from megatron_hybrid.peft.naming import ModuleRef
from megatron_hybrid.train.step import Batch, run_schedule

__all__ = ["ProbeConfig", "ProbeResult", "accumulate_gradients", "probe_weight_deltas"]

#: A source of calibration data: returns this DP rank's micro-batches for step ``k``. A source
#: whose loss is not a per-token mean may also define ``normalizer(micro_batches) -> Tensor``,
#: this rank's share of the step's loss normaliser (default: the loss-mask token count).
BatchSource = Callable[[int], Sequence[Batch]]


@contextlib.contextmanager
def _only_trainable(
    chunks: Sequence[torch.nn.Module], params: Sequence[torch.nn.Parameter]
) -> Iterator[None]:
    """Inside the block exactly ``params`` require grad; flags, grads and config restored after."""
    all_params = [p for c in chunks for p in c.parameters()]
    flags = [p.requires_grad for p in all_params]
    grads = [p.grad for p in all_params]
    config = chunks[0].config
    saved = (config.finalize_model_grads_func, config.calculate_per_token_loss, config.no_sync_func)
    try:
        for p in all_params:
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        # Plain (non-DDP) chunks: gradients stay token sums in .grad; we normalise ourselves.
        config.finalize_model_grads_func = None
        config.calculate_per_token_loss = True
        config.no_sync_func = None
        yield
    finally:
        for p, f, g in zip(all_params, flags, grads):
            p.requires_grad_(f)
            p.grad = g
        config.finalize_model_grads_func, config.calculate_per_token_loss, config.no_sync_func = (
            saved
        )


def _normalizer(micro_batches: Sequence[Batch], source: BatchSource, where: str) -> torch.Tensor:
    """The step's global loss normaliser: the source's own (sequences for GSPO, a constant for
    Dr.GRPO), else the loss-mask token count; summed over the data-parallel ranks.

    Raises:
        ValueError: it is not positive (``where`` names the step): no loss tokens anywhere in the
            global batch, which would otherwise surface as a module's NaN gradient.
    """
    normalizer = getattr(source, "normalizer", None)
    if normalizer is not None:
        total = torch.as_tensor(normalizer(micro_batches)).double().reshape(())
    else:
        total = torch.stack([b.loss_mask.sum() for b in micro_batches]).sum().double()
    dp = parallel_state.get_data_parallel_group()
    if dp.size() > 1:
        dist.all_reduce(total, group=dp)
    if not float(total) > 0:
        raise ValueError(
            f"{where} has no loss tokens (loss normaliser {float(total):g} over the global "
            "batch): every answer is masked out or truncated; check the data and seq_length"
        )
    return total


def _mean_grads_over_dp(
    params: Sequence[torch.nn.Parameter], tokens: torch.Tensor
) -> list[torch.Tensor]:
    """Gradients divided by the step's global normaliser (``tokens``, from :func:`_normalizer`),
    summed over data-parallel ranks: the global-batch gradient."""
    dp = parallel_state.get_data_parallel_group()
    out = []
    for p in params:
        g = (p.grad if p.grad is not None else torch.zeros_like(p)).float() / tokens.float()
        if dp.size() > 1:
            dist.all_reduce(g, group=dp)
        out.append(g)
    return out


def _check_finite(name: str, t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise FloatingPointError(f"{name}: non-finite values in {what}")


def accumulate_gradients(
    chunks: Sequence[torch.nn.Module],
    modules: Sequence[ModuleRef],
    batches: BatchSource,
    num_batches: int,
    *,
    progress: Callable[[int], None] | None = None,
    forward_step: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """``G = sum_k grad_k`` for each module's weight on this rank (local shard, fp32).

    Args:
        chunks: this rank's plain (not DDP-wrapped) model chunks.
        modules: the candidates that live on this rank (global names).
        batches: ``batches(k)`` gives this DP rank's micro-batches of calibration step k.
        num_batches: K >= 1.
        progress: called after each calibration step with k (for progress bars).
        forward_step: Megatron forward-step function for the objective (default: next-token
            loss on :class:`~megatron_hybrid.train.step.Batch`; the GRPO objective passes its own).

    Returns:
        global name -> gradient shard, shaped like the local weight (rows sharded for
        column-parallel, columns for row-parallel).

    Raises:
        ValueError: K < 1. FloatingPointError: NaN/Inf, naming the module and the batch.
    """
    if num_batches < 1:
        raise ValueError(f"calibration needs at least one batch, got num_batches={num_batches}")
    weights = [_weight(m) for m in modules]
    total = {m.name: torch.zeros_like(w, dtype=torch.float32) for m, w in zip(modules, weights)}
    with _only_trainable(chunks, weights):
        for k in range(num_batches):
            micro = batches(k)
            for w in weights:
                w.grad = None
            run_schedule(chunks, micro, forward_step=forward_step)
            grads = _mean_grads_over_dp(
                weights, _normalizer(micro, batches, f"calibration batch {k}")
            )
            for m, g in zip(modules, grads):
                _check_finite(m.name, g, f"the gradient of calibration batch {k}")
                total[m.name] += g
            if progress is not None:
                progress(k)
        for w in weights:
            w.grad = None
    return total


def _weight(ref: ModuleRef) -> torch.nn.Parameter:
    module = getattr(ref.module, "base_layer", ref.module)
    return module.weight


@dataclass
class ProbeConfig:
    """The short full-fine-tuning probe behind the ``probe_residual`` and ``epd`` scores."""

    steps: int = 20
    """P: AdamW steps from the base."""
    lr: float = 3e-3
    """Probe learning rate (use the FFT learning rate you would train with)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    group_size: int | None = None
    """Modules probed together; None probes all candidates at once (the prototype's setting).
    Smaller groups bound the probe's memory to (2 moments + master + base copy) x group params.
    Needs PP = 1 unless it is at least the number of candidates (see probe_weight_deltas)."""

    def __post_init__(self) -> None:
        check_int("score.probe.steps", self.steps)
        if not self.lr > 0:
            raise ValueError(f"score.probe.lr must be > 0, got {self.lr!r}")
        check_int("score.probe.group_size", self.group_size, optional=True)
        betas = self.betas
        pair = isinstance(betas, (list, tuple)) and len(betas) == 2
        if not pair or not all(_in_unit(b) for b in betas):
            raise ValueError(f"score.probe.betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = tuple(betas)
        # eps > 0 (not just >= 0 as AdamW allows): EPD divides by sqrt(v) + eps, and v is 0 where
        # a gradient entry is always 0.
        if not self.eps > 0:
            raise ValueError(f"score.probe.eps must be > 0, got {self.eps!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"score.probe.weight_decay must be >= 0, got {self.weight_decay!r}")


def _check_groups_under_pipeline(modules: Sequence[ModuleRef], group_size: int | None) -> None:
    """Refuse probe groups smaller than all candidates when PP > 1: every schedule runs through
    all stages at once, so stage 0's group k and stage 1's group k would train together and see
    each other's moving weights, and the scores would depend on the pipeline layout."""
    pp = parallel_state.get_pipeline_model_parallel_group()
    if group_size is None or pp.size() == 1:
        return
    total = torch.tensor(len(modules), dtype=torch.long)
    dist.all_reduce(total, group=pp)
    if group_size < int(total):
        raise ValueError(
            f"score.probe.group_size={group_size} is smaller than the {int(total)} candidates, "
            f"which pipeline parallelism (PP={pp.size()}) cannot probe group by group: the "
            "stages' groups would train at the same time and the scores would depend on the "
            "layout. Leave score.probe.group_size unset (null) or score at PP=1"
        )


def _in_unit(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1


@dataclass
class ProbeResult:
    """Per module (local shards): the probe's weight change and its EPD partial sum."""

    delta: dict[str, torch.Tensor]
    """dW = W_after - W_base, fp32, shaped like the local weight."""
    epd_local: dict[str, float]
    """sum over this rank's shard of m^2 / (sqrt(v) + eps) at the end of the probe."""


def probe_weight_deltas(
    chunks: Sequence[torch.nn.Module],
    modules: Sequence[ModuleRef],
    batches: BatchSource,
    cfg: ProbeConfig,
    *,
    progress: Callable[[int], None] | None = None,
    forward_step: Callable | None = None,
    on_delta: Callable[[str, torch.Tensor], None] | None = None,
) -> ProbeResult:
    """Run the FFT probe group by group; restore every base weight bitwise afterwards.

    ``on_delta(name, dW)``, when given, receives each module's weight change as soon as its
    group is done, and the result's ``delta`` stays empty: with ``group_size`` set, only one
    group's fp32 changes are alive at a time (instead of 4 bytes per candidate parameter).

    Each group trains alone (other candidates frozen) on the same batches ``batches(0..P-1)``, so
    the result does not depend on how groups are ordered. Groups need PP = 1 (at PP > 1 the
    stages' groups would train at once; refused unless one group holds every candidate). AdamW runs on fp32 master copies; the
    model's weights are overwritten with the (rounded) masters during the probe and restored from
    a saved copy at the end, even on error.
    """
    group = cfg.group_size or max(len(modules), 1)
    _check_groups_under_pipeline(modules, cfg.group_size)
    # Every step's data before any weight moves: a source that samples from the model (the
    # policy-gradient objective) must sample all P steps from the base, not from the first
    # group's partly trained weights, or the groups would see different data.
    schedule = [batches(step) for step in range(cfg.steps)]
    deltas: dict[str, torch.Tensor] = {}
    epd: dict[str, float] = {}
    done = 0
    for start in range(0, len(modules), group):
        refs = list(modules[start : start + group])
        weights = [_weight(m) for m in refs]
        base = [w.detach().clone() for w in weights]
        masters = [b.float().clone().requires_grad_(True) for b in base]
        opt = torch.optim.AdamW(
            masters, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        try:
            with _only_trainable(chunks, weights):
                for step, micro in enumerate(schedule):
                    for w in weights:
                        w.grad = None
                    run_schedule(chunks, micro, forward_step=forward_step)
                    grads = _mean_grads_over_dp(
                        weights, _normalizer(micro, batches, f"probe step {step}")
                    )
                    for m, master, g in zip(refs, masters, grads):
                        _check_finite(m.name, g, f"the probe gradient at step {step}")
                        master.grad = g
                    opt.step()
                    with torch.no_grad():
                        for w, master in zip(weights, masters):
                            w.copy_(master.to(w.dtype))
                    done += 1
                    if progress is not None:
                        progress(done)
            for m, master, b in zip(refs, masters, base):
                delta = master.detach() - b.float()
                if on_delta is None:
                    deltas[m.name] = delta
                else:
                    on_delta(m.name, delta)
                state = opt.state[master]
                m1, v = state["exp_avg"], state["exp_avg_sq"]
                # Bias-corrected moments, as the update uses them.
                t = cfg.steps
                m_hat = m1 / (1 - cfg.betas[0] ** t)
                v_hat = v / (1 - cfg.betas[1] ** t)
                epd[m.name] = float((m_hat.pow(2) / (v_hat.sqrt() + cfg.eps)).sum())
        finally:
            with torch.no_grad():
                for w, b in zip(weights, base):
                    w.copy_(b)
            del opt, masters
    return ProbeResult(delta=deltas, epd_local=epd)
