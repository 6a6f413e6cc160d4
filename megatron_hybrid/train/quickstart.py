"""A short supervised run of the tiny model with a hybrid plan: the project's smoke-test job.

Builds the model at the configured TP/PP/DP layout, applies the hybrid plan (FFT modules + LoRA on
the rest), wraps Megatron DDP, trains a few steps of next-token loss on the built-in arithmetic task,
and prints the loss per step and the table of trainable parameters.

Run: ``megatron-hybrid train`` (defaults) or, on 2 ranks at TP=2,
``torchrun --nproc_per_node 2 -m megatron_hybrid.cli train parallel.tensor_model_parallel_size=2``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state

from megatron_hybrid.checkpoint.config import CheckpointConfig
from megatron_hybrid.checkpoint.run import RunCheckpointer
from megatron_hybrid.config import check_int
from megatron_hybrid.data.arith import ArithTask, CharTokenizer, make_sft_batch
from megatron_hybrid.data.tokenizers import tokenizer_details
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import PlanSummary, all_linear_names, apply_hybrid_plan
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.plan import PeftSpec
from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime
from megatron_hybrid.scoring.plan_io import load_plan
from megatron_hybrid.train.step import (
    Batch,
    OptimConfig,
    build_optimizer,
    lm_forward_backward,
    optimizer_step,
    set_learning_rate,
    wrap_ddp,
)

__all__ = ["QuickstartConfig", "RunConfig", "global_batch_shard", "run_quickstart"]


@dataclass
class RunConfig:
    """Length and batching of the run."""

    steps: int = 30
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Rows per micro-batch."""
    global_batch_size: int = 32
    """Rows per optimizer step over all data-parallel ranks."""
    seq_length: int = 16
    """Tokens per row (prompt + answer + end token, right-padded)."""
    seed: int = 1234
    """Seeds the model init and the data (the adapters' init: ``peft.seed``). A model initialised
    from the seed depends on the layout too (Megatron's CPU init draws each rank's full matrices
    in order); to compare layouts, start them from one saved base (``checkpoint.base_dir``)."""
    log_interval: int = 5
    """Print the loss every this many steps."""

    def __post_init__(self) -> None:
        for key in ("steps", "micro_batch_size", "global_batch_size", "seq_length", "log_interval"):
            check_int(f"run.{key}", getattr(self, key))
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"run.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"run.micro_batch_size ({self.micro_batch_size})"
            )


def _default_peft() -> PeftSpec:
    # Until the scoring step picks them, FFT goes to the two top-layer MLP inputs (2 of 16
    # candidates = the paper's 10% budget rounded up), which a probe in QUALITY_NOTES.md preferred.
    return PeftSpec(
        fft_modules=["decoder.layers.2.mlp.linear_fc1", "decoder.layers.3.mlp.linear_fc1"],
        lora=LoRAConfig(rank=4, alpha=8.0),
    )


@dataclass
class QuickstartConfig:
    """Everything the quick-start job needs (YAML sections of the same names)."""

    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(vocab_size=CharTokenizer().vocab_size)
    )
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    peft: PeftSpec = field(default_factory=_default_peft)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3))
    task: ArithTask = field(default_factory=ArithTask)
    run: RunConfig = field(default_factory=RunConfig)
    plan_file: str | None = None
    """A plan JSON from ``megatron-hybrid score``; when set it replaces the ``peft`` globs."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving trainables, resuming, and the base-model checkpoint to start from."""


def global_batch_shard(
    batch: Batch, micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[Batch]:
    """This data-parallel rank's micro-batches of a global batch (contiguous rows per rank)."""
    rows = batch.tokens.shape[0]
    if rows % (micro_batch_size * dp_size):
        raise ValueError(
            f"global batch of {rows} rows does not split into micro-batches of {micro_batch_size} "
            f"over {dp_size} data-parallel ranks"
        )
    per_rank = rows // dp_size
    start = dp_rank * per_rank
    out = []
    for s in range(start, start + per_rank, micro_batch_size):
        sl = slice(s, s + micro_batch_size)
        out.append(Batch(batch.tokens[sl], batch.labels[sl], batch.loss_mask[sl]))
    return out


def _is_logging_rank() -> bool:
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == 0
    )


def check_layout(cfg: QuickstartConfig) -> None:
    """Layout limits that Megatron would only hit inside the first step (an AssertionError
    there); checked from the config before anything starts."""
    tp = cfg.parallel.tensor_model_parallel_size
    if cfg.parallel.sequence_parallel and cfg.run.seq_length % tp:
        raise ValueError(
            f"run.seq_length ({cfg.run.seq_length}) must be a multiple of "
            f"parallel.tensor_model_parallel_size ({tp}) with sequence parallelism"
        )
    learned = cfg.model.position_embedding_type == "learned_absolute"
    if learned and cfg.run.seq_length > cfg.model.max_sequence_length:
        raise ValueError(
            f"run.seq_length ({cfg.run.seq_length}) exceeds model.max_sequence_length "
            f"({cfg.model.max_sequence_length}), the number of learned absolute positions"
        )


def check_micro_batches(cfg: QuickstartConfig, dp_size: int) -> None:
    """The global batch splits into micro-batches over ``dp_size`` data-parallel ranks, and an
    interleaved pipeline gets at least PP of them (Megatron asserts that inside the first step,
    naming no key)."""
    run = cfg.run
    if run.global_batch_size % (run.micro_batch_size * dp_size):
        raise ValueError(
            f"run.global_batch_size ({run.global_batch_size}) must be a multiple of "
            f"micro_batch_size x data-parallel size ({run.micro_batch_size} x {dp_size})"
        )
    num_micro = run.global_batch_size // (run.micro_batch_size * dp_size)
    pp = cfg.parallel.pipeline_model_parallel_size
    if (cfg.parallel.virtual_pipeline_model_parallel_size or 1) > 1 and num_micro < pp:
        raise ValueError(
            f"the interleaved (virtual) pipeline needs at least PP={pp} micro-batches per "
            f"data-parallel rank; run.global_batch_size / (run.micro_batch_size x DP) = "
            f"{run.global_batch_size} / ({run.micro_batch_size} x {dp_size}) = {num_micro}: "
            "raise run.global_batch_size or lower run.micro_batch_size"
        )


def run_quickstart(cfg: QuickstartConfig, *, printer=print) -> dict:
    """Train up to step ``cfg.run.steps``; returns ``{"losses", "summary", "wall_time_s",
    "first_step"}`` (``losses`` of the steps this call ran, from ``first_step``)."""
    tok = CharTokenizer()
    if cfg.model.vocab_size < tok.vocab_size:
        raise ValueError(
            f"model.vocab_size ({cfg.model.vocab_size}) < tokenizer vocabulary ({tok.vocab_size})"
        )
    check_layout(cfg)
    initialize_runtime(cfg.parallel, seed=cfg.run.seed)
    try:
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        check_micro_batches(cfg, dp_size)
        chunks = build_model(cfg.model, cfg.parallel)
        run_ckpt = RunCheckpointer(
            cfg.checkpoint, cfg.model, printer=printer, base_details=tokenizer_details(tok)
        )
        run_ckpt.prepare_base(chunks)
        if cfg.plan_file:
            artifact = load_plan(cfg.plan_file)
            artifact.check_model(cfg.model, source=f"plan file {cfg.plan_file}")
            plan = artifact.to_hybrid_plan()
        else:
            names = all_linear_names(chunks, parallel_state.get_pipeline_model_parallel_group())
            plan = cfg.peft.resolve(names)
        summary: PlanSummary = apply_hybrid_plan(chunks, plan)
        ddp = wrap_ddp(chunks)
        optimizer = build_optimizer(ddp, cfg.optim)
        logging = _is_logging_rank()
        if torch.distributed.get_rank() == 0:
            printer(
                f"layout: TP={cfg.parallel.tensor_model_parallel_size} PP={cfg.parallel.pipeline_model_parallel_size} DP={dp_size}"
            )
            printer(summary.table())
        gen = torch.Generator().manual_seed(cfg.run.seed)
        data_state = {"generator": gen}
        first = run_ckpt.restore(ddp, optimizer, plan, data_state) + 1
        losses: list[float] = []
        start = time.perf_counter()
        for step in range(first, cfg.run.steps + 1):
            batch = make_sft_batch(
                cfg.task.sample(cfg.run.global_batch_size, gen), tok, cfg.run.seq_length
            )
            micro = global_batch_shard(batch, cfg.run.micro_batch_size, dp_rank, dp_size)
            set_learning_rate(optimizer, cfg.optim, step - 1, cfg.run.steps)
            loss = lm_forward_backward(ddp, micro)
            optimizer_step(optimizer, f"step {step}")
            if loss is not None:
                losses.append(loss)
                if logging and (step % cfg.run.log_interval == 0 or step == 1):
                    printer(f"step {step:4d}  loss {loss:.4f}")
            run_ckpt.after_step(step, cfg.run.steps, ddp, optimizer, plan, data_state)
        wall = time.perf_counter() - start
        if logging and losses:
            printer(
                f"trained steps {first}-{cfg.run.steps} in {wall:.1f} s; "
                f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
            )
        return {"losses": losses, "summary": summary, "wall_time_s": wall, "first_step": first}
    finally:
        destroy_runtime()
