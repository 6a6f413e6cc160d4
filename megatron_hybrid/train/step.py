"""One optimizer step through Megatron-Core's machinery: DDP, pipeline schedule, optimizer.

The schedule (``get_forward_backward_func``) picks no-pipelining, 1F1B or interleaved 1F1B from the
layout. Losses are token sums normalised by the GLOBAL number of loss tokens
(``calculate_per_token_loss``), so splitting a batch into micro-batches or over data-parallel
ranks gives the same gradients as one big batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_hybrid.config import check_int, check_number
from megatron_hybrid.models.vocab import next_token_nll, unwrapped_attr

__all__ = [
    "Batch",
    "OptimConfig",
    "build_optimizer",
    "learning_rate_factor",
    "lm_forward_backward",
    "reduce_loss_reports",
    "run_schedule",
    "set_learning_rate",
    "wrap_ddp",
    "zero_grads",
]


@dataclass
class OptimConfig:
    """AdamW settings (Megatron's ``OptimizerConfig`` subset used here)."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 0.0
    """Global grad-norm clip (Megatron's ``clip_grad``, norm over all model-parallel shards);
    0 disables it. On CPU it runs through :mod:`megatron_hybrid.runtime.cpu_compat`."""
    lora_lr_mult: float = 1.0
    """Learning-rate multiplier of LoRA adapter parameters (LoRA usually wants ~10x the FFT rate)."""
    loraplus_lr_ratio: float = 1.0
    """LoRA+ (Hayou et al., 2024; PEFT's ``loraplus_lr_ratio``): the B matrices learn at this many
    times the A matrices' rate (``lr x lora_lr_mult``); 1 is plain LoRA, the paper suggests ~16
    with a lower base rate."""
    warmup_steps: int = 0
    """Linear warm-up steps (see :func:`set_learning_rate`)."""
    decay: str = "constant"
    """After warm-up: ``constant`` or ``cosine`` (to ``min_lr_ratio`` x lr at the step after the
    last; see :func:`learning_rate_factor`)."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine decay, as a fraction of the peak rate."""

    def __post_init__(self) -> None:
        check_number("optim.lr", self.lr, lambda v: v > 0, "> 0")
        check_number("optim.weight_decay", self.weight_decay, lambda v: v >= 0, ">= 0")
        check_number("optim.clip_grad", self.clip_grad, lambda v: v >= 0, ">= 0")
        check_number("optim.lora_lr_mult", self.lora_lr_mult, lambda v: v > 0, "> 0")
        check_number("optim.loraplus_lr_ratio", self.loraplus_lr_ratio, lambda v: v > 0, "> 0")
        check_int("optim.warmup_steps", self.warmup_steps, minimum=0)
        for key in ("adam_beta1", "adam_beta2"):
            check_number(f"optim.{key}", getattr(self, key), lambda v: 0 <= v < 1, "in [0, 1)")
        check_number("optim.adam_eps", self.adam_eps, lambda v: v > 0, "> 0")
        if self.decay not in ("constant", "cosine"):
            raise ValueError(f"optim.decay must be 'constant' or 'cosine', got {self.decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclass
class Batch:
    """One micro-batch of token ids. Shapes ``[b, s]``; ``loss_mask`` 1.0 where the loss counts."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        b, s = self.tokens.shape
        return torch.arange(s, device=self.tokens.device).unsqueeze(0).expand(b, s)


def wrap_ddp(chunks: Sequence[torch.nn.Module]) -> list[DistributedDataParallel]:
    """Megatron DDP around each chunk (after the hybrid plan: buffers hold only trainables)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    wrapped = []
    for i, chunk in enumerate(chunks):
        config = chunk.config
        config.calculate_per_token_loss = True
        wrapped.append(
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                disable_bucketing=i > 0,
            )
        )
    for chunk in wrapped:
        chunk.config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(chunks: Sequence[DistributedDataParallel], optim: OptimConfig):
    """Megatron's optimizer over the trainable parameters of DDP-wrapped chunks.

    LoRA adapters get their own parameter groups: A matrices (tagged ``is_lora_a``) with
    ``max_lr = lr x lora_lr_mult``, B matrices (``is_lora_b``) at ``loraplus_lr_ratio`` times
    that; :func:`set_learning_rate` applies the schedule to every group.
    """
    config = chunks[0].config
    if config.bf16 and not torch.cuda.is_available():
        raise ValueError(
            "model.params_dtype bfloat16 cannot be trained on CPU: Megatron's mixed-precision "
            "optimizer needs CUDA parameters (forward/backward in bf16 work; use float32 here)"
        )
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.lr * optim.min_lr_ratio,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=False,
    )
    overrides = None
    if optim.lora_lr_mult != 1.0 or optim.loraplus_lr_ratio != 1.0:
        from megatron.core.optimizer import ParamKey, get_standard_config_overrides

        overrides = dict(get_standard_config_overrides(opt_config) or {})
        lora_lr = optim.lr * optim.lora_lr_mult
        b_lr = lora_lr * optim.loraplus_lr_ratio
        # One key per matrix: a parameter matching several keys would get their overrides merged.
        overrides[ParamKey(attr="is_lora_a")] = {
            "max_lr": lora_lr,
            "min_lr": lora_lr * optim.min_lr_ratio,
        }
        overrides[ParamKey(attr="is_lora_b")] = {
            "max_lr": b_lr,
            "min_lr": b_lr * optim.min_lr_ratio,
        }
    optimizer = get_megatron_optimizer(opt_config, list(chunks), config_overrides=overrides)
    set_learning_rate(optimizer, optim, step=0, total_steps=1)
    return optimizer


def learning_rate_factor(optim: OptimConfig, step: int, total_steps: int) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up ``(step + 1) / warmup_steps`` (the first step already trains), then cosine
    from 1 at step ``warmup_steps`` to ``min_lr_ratio`` at step ``total_steps``, the step after
    the last, as in Hugging Face's cosine schedule: every step trains. Before, the decay reached
    the floor at the last step itself (learning rate 0 without a floor).
    """
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return 1.0
    span = max(total_steps - optim.warmup_steps, 1)
    progress = min(max(step - optim.warmup_steps, 0) / span, 1.0)
    floor = optim.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, optim: OptimConfig, step: int, total_steps: int) -> None:
    """Set every parameter group's ``lr`` to its ``max_lr`` (or ``optim.lr``) x the schedule
    factor, and its ``weight_decay`` to ``optim.weight_decay x wd_mult``.

    Megatron marks biases and other 1-D parameters with ``wd_mult = 0`` but applies it only in
    its own ``OptimizerParamScheduler``, which we do not use: without this every group kept the
    optimizer's global weight decay, so a fully fine-tuned module's bias was decayed.
    """
    factor = learning_rate_factor(optim, step, total_steps)
    for group in optimizer.param_groups:
        group["lr"] = group.get("max_lr", optim.lr) * factor
        group["weight_decay"] = optim.weight_decay * group.get("wd_mult", 1.0)


def optimizer_step(optimizer, where: str) -> float:
    """``optimizer.step()``, then a stop if the global gradient norm was not finite; returns that
    norm (before clipping).

    Megatron finds inf/NaN gradients only through an fp16 loss scaler: its fp32 and bf16
    optimizers step on them, every weight turns NaN and the run goes on at loss NaN (saving NaN
    checkpoints). The norm is Megatron's own (reduced over the model-parallel ranks;
    data-parallel peers hold the same gradients), so every rank stops alike, before the caller
    logs or saves anything of this step.

    Raises:
        FloatingPointError: non-finite gradients, naming ``where`` (e.g. ``"step 12"``).
    """
    ok, norm, _ = optimizer.step()
    if norm is None:  # a single optimizer without clipping: the gradients are still in place
        norm = optimizer.get_grad_norm()
    norm = float(norm)
    if not ok or not math.isfinite(norm):
        raise FloatingPointError(
            f"{where}: non-finite gradients (norm {norm}); the run stops here, before this step "
            "is logged or saved. Lower the learning rate or set a gradient clip (clip_grad)"
        )
    return norm


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-sum loss, the token count, and a report (Megatron's 3-tuple convention)."""
    mask = loss_mask.reshape(-1).float()
    losses = output_tensor.float().reshape(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), mask.sum()])
    return loss, num_tokens, {"lm loss": report}


def to_model_device(batch, model: torch.nn.Module):
    """``batch`` (a dataclass of tensors, e.g. :class:`Batch`) with its tensors on ``model``'s
    device; the same object when they are there already (CPU runs)."""
    device = next(model.parameters()).device
    moved = {
        f.name: v.to(device, non_blocking=True)
        for f in dataclasses.fields(batch)
        if torch.is_tensor(v := getattr(batch, f.name)) and v.device != device
    }
    return dataclasses.replace(batch, **moved) if moved else batch


def _forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
    """Next-token loss over the REAL vocabulary: the logits of Megatron's padding rows (the
    vocabulary is padded to a multiple of 8 x TP, so their number depends on TP) are masked, as in
    sampling and in Hugging Face's loss. Before, they were part of the softmax, so the same base
    trained to different losses at TP=1 and TP=2 (at TP=2 the extra rows load as zeros)."""
    batch = to_model_device(next(data_iterator), model)
    vocab_size = unwrapped_attr(model, "unpadded_vocab_size")  # set by build_model
    output = next_token_nll(
        model, batch.tokens, batch.position_ids, batch.labels, vocab_size=vocab_size
    )
    return output, partial(_loss_func, batch.loss_mask)


def zero_grads(chunks: Sequence[DistributedDataParallel]) -> None:
    """Zero DDP's gradient buffers before a new forward/backward.

    Megatron's ``optimizer.step()`` leaves ``param.grad`` aliasing ``param.main_grad``; autograd
    would accumulate the next gradient into it and DDP's hook add it to ``main_grad`` again (2x),
    so ``param.grad`` is cleared too.
    """
    for c in chunks:
        c.zero_grad_buffer()
        for p in c.parameters():
            p.grad = None


def run_schedule(
    chunks: Sequence[torch.nn.Module],
    micro_batches: Sequence,
    *,
    forward_only: bool = False,
    forward_step: Callable | None = None,
    seq_length: int | None = None,
) -> list[dict]:
    """Megatron's forward/backward schedule over ``micro_batches``; returns the loss reports.

    ``seq_length`` is the model's input length when the micro-batch tensors are wider (e.g. a
    forward step that feeds ``tokens[:, :-1]``). ``chunks`` may be DDP-wrapped or plain modules (then gradients land in ``param.grad`` as token
    sums, un-normalised, when ``config.calculate_per_token_loss`` is set).
    """
    first = micro_batches[0]
    mbs, width = (first if torch.is_tensor(first) else first.tokens).shape[:2]
    # Pipeline stages exchange [seq, mbs, hidden] activations: seq must be the MODEL's input length.
    seq_length = seq_length or width
    vpp = len(chunks)
    iterators = [iter(micro_batches) for _ in range(vpp)] if vpp > 1 else iter(micro_batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step or _forward_step,
        data_iterator=iterators,
        model=list(chunks) if vpp > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


def reduce_loss_reports(reports: list[dict]) -> float:
    """Mean token loss over the global batch, on every rank: summed on the last pipeline stage
    (DP all-reduced), then broadcast over the pipeline group. Every rank must call it. Before,
    ranks off the last stage got None, so at PP > 1 rank 0's progress lines, loss curves and
    TensorBoard had no loss."""
    total = torch.zeros(2, dtype=torch.float64)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        total = torch.stack([r["lm loss"] for r in reports]).sum(0).double().cpu()
        dp = parallel_state.get_data_parallel_group()
        if dp.size() > 1:
            torch.distributed.all_reduce(total, group=dp)
    pp = parallel_state.get_pipeline_model_parallel_group()
    if pp.size() > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        torch.distributed.broadcast(total, src=last, group=pp)
    return float(total[0] / total[1].clamp(min=1))


def lm_forward_backward(
    chunks: Sequence[DistributedDataParallel],
    micro_batches: Sequence[Batch],
    *,
    forward_only: bool = False,
) -> float:
    """Run the Megatron schedule over ``micro_batches`` (this DP rank's share of the batch).

    Every pipeline stage passes the same ``micro_batches`` (only the first stage reads tokens,
    only the last reads labels and masks). Gradients accumulate into the DDP buffers and are
    finalised (DP all-reduce, SP/embedding reductions, division by the global token count).

    Returns:
        The mean token loss over the global batch (on every rank; see :func:`reduce_loss_reports`).
    """
    if not forward_only:
        zero_grads(chunks)
    return reduce_loss_reports(run_schedule(chunks, micro_batches, forward_only=forward_only))
