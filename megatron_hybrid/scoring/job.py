"""``megatron-hybrid score``: score the candidates of a model and write the plan artifact.

Run: ``megatron-hybrid score --out plan.json`` (tiny model, built-in task) or under torchrun,
``torchrun --nproc_per_node 4 -m megatron_hybrid.cli score parallel.tensor_model_parallel_size=2
parallel.pipeline_model_parallel_size=2 --out plan.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_hybrid.data.arith import ArithTask, CharTokenizer, make_sft_batch
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.rl.grpo import GRPOConfig
from megatron_hybrid.runtime.distributed import (
    ParallelConfig,
    destroy_runtime,
    initialize_runtime,
    on_rank0,
)
from megatron_hybrid.scoring.plan_io import (
    PlanArtifact,
    layout_record,
    model_fingerprint,
    save_plan,
)
from megatron_hybrid.scoring.run import (
    PROBE_METHODS,
    ScoreConfig,
    describe,
    local_candidates,
    plan_entries,
    score_modules,
    select_and_check,
)
from megatron_hybrid.scoring.selection import SelectionConfig
from megatron_hybrid.train.quickstart import RunConfig, global_batch_shard

__all__ = ["ScoreJobConfig", "run_score_job", "task_batch_source"]


@dataclass
class ScoreJobConfig:
    """Sections of ``megatron-hybrid score`` (YAML keys of the same names)."""

    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(vocab_size=CharTokenizer().vocab_size)
    )
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=4, alpha=8.0))
    """The adapters the non-selected modules will get (rank r also sets the residual's r)."""
    task: ArithTask = field(default_factory=ArithTask)
    run: RunConfig = field(default_factory=RunConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectionConfig = field(default_factory=SelectionConfig)
    grpo: GRPOConfig = field(
        default_factory=lambda: GRPOConfig(
            prompts_per_step=16, group_size=8, reward="digit_partial"
        )
    )
    """Rollout settings for ``score.objective: policy_gradient``."""
    out: str = "plan.json"
    """Where the plan artifact is written (atomically, by global rank 0)."""

    def __post_init__(self) -> None:
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a file path, got {self.out!r}")
        if self.out.endswith(("/", "\\")) or Path(self.out).is_dir():
            raise ValueError(
                f"out={self.out} is a directory; give the plan file, e.g. "
                f"{Path(self.out) / 'plan.json'}"
            )


def task_batch_source(task: ArithTask, run: RunConfig, seed_offset: int = 7919):
    """``batches(k)``: this DP rank's micro-batches of calibration step k (layout-independent)."""
    tok = CharTokenizer()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()

    def batches(k: int):
        gen = torch.Generator().manual_seed(run.seed * 1_000_003 + seed_offset + k)
        batch = make_sft_batch(task.sample(run.global_batch_size, gen), tok, run.seq_length)
        return global_batch_shard(batch, run.micro_batch_size, dp_rank, dp_size)

    return batches


def _policy_gradient_source(chunks, cfg: ScoreJobConfig):
    """Rollouts of the built-in task for the ``policy_gradient`` objective."""
    from megatron_hybrid.scoring.objectives import policy_gradient_source

    tok = CharTokenizer()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    if cfg.grpo.prompts_per_step % dp_size:
        raise ValueError(
            f"grpo.prompts_per_step={cfg.grpo.prompts_per_step} must be a multiple of the "
            f"data-parallel size {dp_size} (each DP rank samples an equal share of the prompts)"
        )
    per_rank = cfg.grpo.prompts_per_step // dp_size

    def prompts(k: int):
        gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + 104_729 + k)
        pairs = cfg.task.sample(per_rank * dp_size, gen)[
            dp_rank * per_rank : (dp_rank + 1) * per_rank
        ]
        return [(tok.encode_prompt(p), a) for p, a in pairs]

    return policy_gradient_source(
        chunks,
        prompts,
        cfg.grpo,
        decode=tok.decode,
        stop_token=tok.stop_ids,
        vocab_size=tok.vocab_size,
        seed=cfg.run.seed,
    )


def run_score_job(
    cfg: ScoreJobConfig, *, printer=print, show_progress: bool = True
) -> PlanArtifact:
    """Build the model, score, select, write the plan; returns the artifact on every rank."""
    initialize_runtime(cfg.parallel, seed=cfg.run.seed)
    try:
        chunks = build_model(cfg.model, cfg.parallel)
        rank0 = torch.distributed.get_rank() == 0
        method = cfg.score.method
        steps = 0 if method == "random" else cfg.score.num_batches
        if method in PROBE_METHODS:  # one tick per (group, step) of this rank's probe
            group = cfg.score.probe.group_size
            n = len(local_candidates(chunks))
            steps = cfg.score.probe.steps * (math.ceil(n / group) if group else 1)
        bar = None
        if show_progress and rank0 and steps:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"score ({method})", unit="batch")
        start = time.perf_counter()
        batches, forward_step = task_batch_source(cfg.task, cfg.run), None
        if cfg.score.objective == "policy_gradient":
            batches, forward_step = _policy_gradient_source(chunks, cfg)
        table = score_modules(
            chunks,
            batches,
            cfg.score,
            cfg.lora.rank,
            progress=(lambda _k: bar.update(1)) if bar is not None else None,
            forward_step=forward_step,
        )
        if bar is not None:
            bar.close()
        fft = select_and_check(table, method, cfg.select)
        elapsed = time.perf_counter() - start
        artifact = PlanArtifact(
            model=model_fingerprint(cfg.model),
            budget=asdict(cfg.select),
            score=describe(cfg.score) | {"rank": cfg.score.rank or cfg.lora.rank},
            calibration={
                "objective": cfg.score.objective,
                "num_batches": steps,
                "global_batch_size": cfg.run.global_batch_size,
                "seq_length": cfg.run.seq_length,
                "task": asdict(cfg.task),
                "layout": layout_record(cfg.parallel),
                "seconds": round(elapsed, 3),
            },
            lora=asdict(cfg.lora),
            modules=plan_entries(table, fft, cfg.lora.rank),
            seed=cfg.run.seed,
        )
        # Rank 0 writes; an error there (disk full, no permission) reaches every rank at once
        # instead of leaving the others in a barrier until the timeout.
        path = on_rank0(lambda: save_plan(artifact, Path(cfg.out)))
        if rank0:
            printer(
                f"scored {len(table)} modules with {method} in {elapsed:.1f} s; FFT: {', '.join(fft)}"
            )
            printer(f"plan written to {path}")
        return artifact
    finally:
        destroy_runtime()
