"""The embedded benchmark: warm up a base, then compare modes x seeds in an SFT and a GRPO stage.

Every run of a stage starts from the same weights (the warmed-up base; the GRPO stage from a
half-trained start, ``grpo.start``); seeds are shared across modes (the
seed picks the data order, the adapters' init, sampling, and the ``hybrid-random`` modules), so
differences between modes can be compared per seed (paired).
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.checkpoint.io import save_model, save_trainables
from megatron_hybrid.data.arith import ArithTask, CharTokenizer, make_sft_batch
from megatron_hybrid.data.tokenizers import tokenizer_details
from megatron_hybrid.demo.config import DemoConfig, ModeOptim, StageConfig
from megatron_hybrid.demo.pool import resolve_workers, run_jobs
from megatron_hybrid.fileio import atomic_write, atomic_write_text
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan
from megatron_hybrid.peft.plan import HybridPlan, ModuleDecision
from megatron_hybrid.rl.evaluate import greedy_accuracy
from megatron_hybrid.rl.generation import rollout_seed
from megatron_hybrid.rl.grpo import grpo_step
from megatron_hybrid.rl.reference import ReferencePolicy
from megatron_hybrid.runtime.distributed import destroy_runtime, initialize_runtime, on_all_ranks
from megatron_hybrid.scoring.run import ScoreConfig, score_modules, seeded_uniform
from megatron_hybrid.scoring.selection import Candidate, select_fft_modules
from megatron_hybrid.train.quickstart import global_batch_shard
from megatron_hybrid.train.step import (
    OptimConfig,
    build_optimizer,
    lm_forward_backward,
    optimizer_step,
    set_learning_rate,
    wrap_ddp,
)

__all__ = [
    "ProblemSet",
    "RunResult",
    "default_sweep_grid",
    "make_problem_set",
    "run_demo",
    "run_sweep",
]


@dataclass
class ProblemSet:
    """(prompt, answer) pairs split into train / validation / test."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]


def make_problem_set(
    task: ArithTask, test_size: int, val_size: int, seed: int = 12345, train_pool: int = 50_000
) -> ProblemSet:
    """Enumerate small problem spaces and split them; sample large ones (``train_pool`` training
    problems, with the held-out test/validation prompts removed from them)."""
    gen = torch.Generator().manual_seed(seed)
    if task.space_size() <= 200_000:
        pairs = task.enumerate_all()
        order = torch.randperm(len(pairs), generator=gen).tolist()
        pairs = [pairs[i] for i in order]
        if test_size + val_size >= len(pairs):
            raise ValueError(
                f"test_size + val_size ({test_size + val_size}) >= {len(pairs)} problems"
            )
        return ProblemSet(
            pairs[test_size + val_size :],
            pairs[test_size : test_size + val_size],
            pairs[:test_size],
        )
    held = task.sample(test_size + val_size, gen)
    seen = {p for p, _ in held}
    train = [pair for pair in task.sample(train_pool, gen) if pair[0] not in seen]
    return ProblemSet(train, held[test_size:], held[:test_size])


@dataclass
class RunResult:
    """One (stage, mode, seed) run; the fields of ``results.json``."""

    mode: str
    stage: str
    seed: int
    final_heldout_accuracy: float
    reward_curve: list[list[float]]
    accuracy_curve: list[list[float]]
    loss_curve: list[list[float]]
    wall_time_s: float
    trainable_params: int
    optimizer_state_bytes: int
    peak_memory_bytes: int
    """CUDA: peak allocated during the run. CPU: peak RSS increase during the run, sampled every
    20 ms, over a baseline taken after earlier runs' memory was released (it includes activations
    and allocator overhead, so on a tiny model it differs little between modes)."""
    training_state_bytes: int = 0
    """Parameters + gradients of trainables + optimizer state, counted exactly (all ranks)."""
    fft_modules: list[str] = field(default_factory=list)
    shared_with: str | None = None
    """Mode whose run this is: same stage, seed, plan and optimizer settings, so the same
    (deterministic) run; it was trained once and its result is reported under both modes."""
    reward_errors: int = 0
    """GRPO: completions whose reward function raised or returned a non-number (scored 0)."""
    reward_timeouts: int = 0
    """GRPO: completions whose reward function ran out of time (scored 0)."""
    reward_first_error: str | None = None
    """GRPO: the first failed reward call (``step <s>: completion <i>: <type>: <message>``)."""
    checkpoint: str | None = None
    """Where the trained weights were saved (``run(save_dir=...)``), else None."""


def _job_key(job: tuple) -> str:
    """Identity of a run: two jobs with equal keys train the same model the same way."""
    stage, _mode, seed, problems, plan, mode_optim = job
    return _digest(stage, seed, id(problems), plan.to_dict(), asdict(mode_optim))


def dedupe_jobs(jobs: list[tuple]) -> tuple[list[tuple], list[int]]:
    """Unique jobs (first occurrence) and, for every job, the index of its unique job."""
    first: dict[str, int] = {}
    unique: list[tuple] = []
    where: list[int] = []
    for job in jobs:
        key = _job_key(job)
        if key not in first:
            first[key] = len(unique)
            unique.append(job)
        where.append(first[key])
    return unique, where


def _release_freed_memory() -> None:
    """Free what earlier runs in this process left behind, so the next run's baseline is real:
    collect reference cycles (a finished run's DDP model and optimizer sit in some) and hand freed
    heap back to the OS (glibc's ``malloc_trim``; without it a later run reuses freed pages and its
    resident-memory growth reads low)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline is only approximate
        pass


class PeakRSS:
    """Peak resident memory above the level at entry (CPU), or CUDA peak allocation (GPU); memory
    earlier runs in the same process freed is released first (:func:`_release_freed_memory`)."""

    def __enter__(self):
        _release_freed_memory()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        import psutil

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak = self._peak - self._base


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state (moments, fp32 masters) on this rank. Megatron's mixed-precision
    optimizer keeps the fp32 master copies as its parameters (``fp32_from_float16_groups``), not in
    ``state``, so they are counted from there."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    total = 0
    for opt in inner:
        for group in getattr(opt, "fp32_from_float16_groups", None) or []:
            total += sum(p.numel() * p.element_size() for p in group)
        torch_opt = getattr(opt, "optimizer", opt)
        for state in torch_opt.state.values():
            total += sum(
                v.numel() * v.element_size()
                for v in state.values()
                if torch.is_tensor(v) and v.dim() > 0
            )
    return total


def _mp_sum(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    group = parallel_state.get_model_parallel_group()
    if group.size() > 1:
        dist.all_reduce(t, group=group)
    return int(t)


#: Bumped when the training math changes, so that cached bases and starts are retrained:
#: 2 = the loss over the real vocabulary (padding rows masked) and the cosine schedule that ends
#: after the last step (2026-12-01).
_TRAINING_RECIPE = 2


def _digest(*objs) -> str:
    return hashlib.sha256(
        json.dumps(
            [asdict(o) if hasattr(o, "__dataclass_fields__") else o for o in objs],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:12]


class Demo:
    """State shared by the runs of one benchmark (base weights, tokenizer, score tables)."""

    def __init__(
        self,
        cfg: DemoConfig,
        printer: Callable[[str], None],
        tokenizer=None,
        *,
        log_suffix: str = "",
    ) -> None:
        self.cfg = cfg
        self.tok = tokenizer or CharTokenizer()
        self.say = printer
        self.log_progress = False
        """Print the loss / reward and held-out accuracy at every evaluation of a run."""
        self.rank0 = dist.get_rank() == 0
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        n = cfg.grpo.grpo.prompts_per_step
        if cfg.grpo.enabled and n % self.dp_size:
            raise ValueError(
                f"grpo.grpo.prompts_per_step={n} must be a multiple of the data-parallel size "
                f"{self.dp_size} (each rank takes an equal share of the prompts)"
            )
        self.base_state: list[dict[str, torch.Tensor]] | None = None
        self.base_path: Path | None = None
        """This rank's cached base weights (set by :meth:`warm_up`; worker processes load it)."""
        self.start_states: dict[str, list[dict[str, torch.Tensor]]] = {}
        """stage -> the weights its runs start from instead of the base (:meth:`prepare_start`)."""
        self.start_paths: dict[str, Path] = {}
        """stage -> this rank's cached start weights (worker processes load them)."""
        self.writer = None
        if cfg.tensorboard and self.rank0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(
                    str(Path(cfg.out) / "tensorboard"), filename_suffix=log_suffix
                )
            except Exception as e:  # noqa: BLE001 - tensorboard is optional
                self.say(f"(TensorBoard logging off: {e})")

    # -- models ------------------------------------------------------------------------------------
    def fresh_model(self, stage: str | None = None) -> list[torch.nn.Module]:
        """The model chunks with ``stage``'s start weights (:meth:`prepare_start`), else the base's."""
        chunks = build_model(self.cfg.model, self.cfg.parallel)
        state = self.start_states.get(stage, self.base_state)
        if state is not None:
            for i, c in enumerate(chunks):
                missing = c.load_state_dict(state[i], strict=False)
                bad = [k for k in missing.missing_keys if not k.endswith("_extra_state")]
                if bad or missing.unexpected_keys:
                    raise RuntimeError(
                        f"base state does not fit the model: missing {bad}, unexpected {missing.unexpected_keys}"
                    )
        return chunks

    def _progress(self, tag, step, steps, name, curve, acc_curve) -> None:
        """One line per evaluation when ``self.log_progress`` (single runs: ``sft`` / ``grpo``
        jobs; the benchmark's many runs report through their progress bar instead)."""
        if not self.log_progress:
            return
        recent = [v for s, v in curve if s > acc_curve[-2][0]] if len(acc_curve) > 1 else []
        mean = f"{name} {sum(recent) / len(recent):.4f}, " if recent else ""
        self.say(
            f"[{tag}] step {step}/{steps}: {mean}held-out accuracy {acc_curve[-1][1]:.3f} "
            f"(on {self.cfg.sft.eval_subset if tag.startswith('sft') else self.cfg.grpo.eval_subset})"
        )

    def encode(self, pairs):
        return [(self.tok.encode_prompt(p), a) for p, a in pairs]

    def accuracy(self, chunks, pairs) -> float:
        return greedy_accuracy(
            chunks,
            self.encode(pairs),
            decode=self.tok.decode,
            stop_token=self.tok.stop_ids,
            vocab_size=self.tok.vocab_size,
            max_new_tokens=self.cfg.grpo.grpo.sampling.max_new_tokens,
            reward="math" if self.cfg.grpo.grpo.reward == "math" else "exact_int",
        )

    def _shard(self, batch, batch_size: int):
        """This DP rank's share of a global batch, as two micro-batches."""
        micro = max(batch_size // self.dp_size // 2, 1)
        return global_batch_shard(batch, micro, self.dp_rank, self.dp_size)

    def sft_batches(self, pairs, batch_size: int, seed: int):
        gen = torch.Generator().manual_seed(seed)

        def draw():
            idx = torch.randint(0, len(pairs), (batch_size,), generator=gen).tolist()
            batch = make_sft_batch([pairs[i] for i in idx], self.tok, self.cfg.seq_length)
            return self._shard(batch, batch_size)

        return draw

    # -- base --------------------------------------------------------------------------------------
    def warm_up(self) -> None:
        cfg = self.cfg
        key = self._base_key()
        path = self._cache_path("base", key)
        self.base_path = path
        if on_all_ranks(path.is_file()):
            self.base_state = torch.load(path, weights_only=True)
            self.say(f"base model: loaded from cache {path.parent} ({key})")
            return
        self.say(
            f"base model: supervised warm-up on {cfg.warmup.task.op} ({cfg.warmup.steps} steps) ..."
        )
        chunks = build_model(cfg.model, cfg.parallel)
        ddp = wrap_ddp(chunks)
        optim = OptimConfig(
            lr=cfg.warmup.lr,
            warmup_steps=min(50, cfg.warmup.steps // 10),
            decay="cosine",
            min_lr_ratio=0.1,
        )
        opt = build_optimizer(ddp, optim)
        draw = self._sampled_batches(cfg.warmup.task, cfg.warmup.batch_size, cfg.warmup.seed)
        t0 = time.perf_counter()
        for _ in self._lm_steps(ddp, opt, optim, draw, cfg.warmup.steps, "warm-up"):
            pass
        acc = self.accuracy(ddp, make_problem_set(cfg.warmup.task, 500, 0, seed=999).test)
        self.say(
            f"base model: {time.perf_counter() - t0:.0f} s, accuracy on 500 sampled "
            f"{cfg.warmup.task.op} problems (the warm-up's distribution; not held out): {acc:.3f}"
        )
        self.base_state = self._save_weights(ddp, path)

    def _lm_steps(self, ddp, opt, optim: OptimConfig, draw, total: int, what: str):
        """Supervised steps 1..``total`` on ``draw()`` batches with ``optim``'s schedule; yields
        ``(step, loss, grad_norm)`` after each optimizer step (stop early by breaking out).
        FloatingPointError naming ``what`` and the step on non-finite gradients."""
        for step in range(1, total + 1):
            set_learning_rate(opt, optim, step - 1, total)
            loss = lm_forward_backward(ddp, draw())
            grad_norm = optimizer_step(opt, f"{what} step {step}")
            yield step, loss, grad_norm

    def _save_weights(self, ddp: list[torch.nn.Module], path: Path) -> list[dict]:
        """A copy of the ``ddp`` chunks' weights, written to ``path`` atomically by one writer per
        data-parallel group (its ranks hold the same weights); every rank waits for the write."""
        state = [
            {
                k: v.detach().clone()
                for k, v in c.module.state_dict().items()
                if not k.endswith("_extra_state")
            }
            for c in ddp
        ]
        if self.dp_rank == 0:
            atomic_write(path, lambda f: torch.save(state, f), binary=True)
        dist.barrier()
        return state

    def _base_key(self) -> str:
        return _digest(self.cfg.model, self.cfg.warmup, self.cfg.seq_length, _TRAINING_RECIPE)

    def _cache_path(self, kind: str, key: str) -> Path:
        """This model-parallel rank's file of a cached model (``kind``: base, start)."""
        cfg = self.cfg
        cache = Path(cfg.cache_dir or (Path(cfg.out).parent / "cache"))
        par = cfg.parallel
        layout = f"tp{par.tensor_model_parallel_size}pp{par.pipeline_model_parallel_size}"
        if (par.virtual_pipeline_model_parallel_size or 1) > 1:  # chunks per rank differ
            layout += f"vpp{par.virtual_pipeline_model_parallel_size}"
        mp_rank = parallel_state.get_model_parallel_group().rank()
        return cache / f"{kind}-{key}-{layout}-mp{mp_rank}.pt"

    def prepare_start(self, stage: str) -> dict | None:
        """The GRPO stage's half-trained start (``grpo.start``, see
        :class:`~megatron_hybrid.demo.config.StartConfig`): loaded from the cache or trained from
        the base (call :meth:`warm_up` first), then every ``stage`` run starts there.

        Returns ``{"target_accuracy", "steps", "accuracy", "check_size"}`` (``steps`` trained,
        greedy accuracy at the last check), or None when ``stage`` has no start.
        """
        cfg = self.cfg
        start = cfg.grpo.start
        if stage != "grpo" or not start.enabled:
            return None
        if self.base_state is None:
            raise RuntimeError("prepare_start needs the base: call warm_up() first")
        task = cfg.grpo.task
        # everything that decides the start: the base, the schedule and data, and what the stop
        # check measures (greedy answers up to max_new_tokens, graded by the stage's reward kind)
        key = _digest(
            self._base_key(),
            start,
            task,
            cfg.grpo.test_size,
            cfg.grpo.val_size,
            cfg.grpo.grpo.sampling.max_new_tokens,
            cfg.grpo.grpo.reward == "math",
        )
        path = self._cache_path("start", key)
        # per layout, like the weights: each layout trains its own start from its own base
        meta_path = path.with_name(path.name.rsplit("-mp", 1)[0] + ".json")
        if on_all_ranks(path.is_file() and meta_path.is_file()):
            self.start_states[stage] = torch.load(path, weights_only=True)
            self.start_paths[stage] = path
            info = json.loads(meta_path.read_text())
            self.say(f"[{stage}] start: loaded from cache {path.parent} ({key})")
            return info
        problems = make_problem_set(task, cfg.grpo.test_size, cfg.grpo.val_size)
        check = problems.val[: start.check_size]
        self.say(
            f"[{stage}] start: fine-tuning the base on {len(problems.train)} training problems "
            f"until {start.target_accuracy:.0%} of {len(check)} validation prompts are right ..."
        )
        torch.manual_seed(0)
        ddp = wrap_ddp(self.fresh_model())
        optim = OptimConfig(
            lr=start.lr, warmup_steps=start.warmup_steps, decay="cosine", min_lr_ratio=0.0
        )
        opt = build_optimizer(ddp, optim)
        draw = self.sft_batches(problems.train, start.batch_size, seed=start.seed)
        t0 = time.perf_counter()
        step, acc = 0, 0.0
        for step, _, _ in self._lm_steps(ddp, opt, optim, draw, start.max_steps, "grpo.start"):
            if step % start.check_interval == 0 or step == start.max_steps:
                acc = self.accuracy(ddp, check)
                if acc >= start.target_accuracy:
                    break
        info = {
            "target_accuracy": start.target_accuracy,
            "steps": step,
            "accuracy": acc,
            "check_size": len(check),
        }
        if dist.get_rank() == 0:
            atomic_write_text(meta_path, json.dumps(info) + "\n")
        self.start_states[stage] = self._save_weights(ddp, path)
        self.start_paths[stage] = path
        self.say(
            f"[{stage}] start: the base after {step} steps (all weights, {time.perf_counter() - t0:.0f} s), "
            f"accuracy {acc:.3f} on {len(check)} validation prompts"
        )
        if acc < start.target_accuracy:
            self.say(
                f"[{stage}] WARNING: the start missed its target accuracy {start.target_accuracy:g}; "
                "RL from it has little to learn from (try another grpo.start.lr or grpo.start.seed)"
            )
        return info

    def _sampled_batches(self, task: ArithTask, batch_size: int, seed: int):
        gen = torch.Generator().manual_seed(seed)

        def draw():
            batch = make_sft_batch(task.sample(batch_size, gen), self.tok, self.cfg.seq_length)
            return self._shard(batch, batch_size)

        return draw

    # -- plans -------------------------------------------------------------------------------------
    def score_table(self, problems: ProblemSet, stage: str) -> dict[str, dict]:
        """Scores of every candidate at the base, for the stage's data (gradient and probe families)."""
        cfg = self.cfg
        chunks = self.fresh_model(stage)
        draw = self.sft_batches(problems.train, 64, seed=4242)
        cache: dict[int, list] = {}

        def batches(k: int):
            if k not in cache:
                cache[k] = draw()
            return cache[k]

        table: dict[str, dict] = {}
        for method in ("grad_norm", cfg.score.method):
            sc = ScoreConfig(**{**asdict(cfg.score), "method": method, "probe": cfg.score.probe})
            for m in score_modules(chunks, batches, sc, cfg.lora.rank):
                entry = {"params": m.params, "kind": m.kind, "shape": list(m.shape)}
                table.setdefault(m.name, entry).update(m.scores)
        at = "the stage's start" if stage in self.start_states else "the base"
        self.say(
            f"[{stage}] scored {len(table)} candidate modules ({cfg.score.method}, grad_norm) at {at}"
        )
        return table

    def validation_stage(self, stage: str) -> tuple[ProblemSet, dict[str, dict]]:
        """The stage's problems with the VALIDATION split in the test slot (so that runs evaluate
        on it, never on the test split), and the score table at the base."""
        scfg = getattr(self.cfg, stage)
        problems = make_problem_set(scfg.task, scfg.test_size, scfg.val_size)
        on_val = ProblemSet(train=problems.train, val=problems.val, test=problems.val)
        return on_val, self.score_table(problems, stage)

    def plan_for(self, mode: str, table: dict[str, dict], seed: int) -> HybridPlan:
        cfg = self.cfg
        names = sorted(table)
        if mode == "fft":
            return HybridPlan({n: ModuleDecision("fft") for n in names}, lora=cfg.lora, seed=seed)
        if mode == "lora":
            return HybridPlan({n: ModuleDecision("lora") for n in names}, lora=cfg.lora, seed=seed)
        key = {"hybrid": cfg.score.method, "hybrid-gradnorm": "grad_norm"}.get(mode)
        scores = {n: (table[n][key] if key else seeded_uniform(n, seed)) for n in names}
        fft = set(
            select_fft_modules(
                [Candidate(n, table[n]["params"], scores[n]) for n in names], cfg.select
            )
        )
        return HybridPlan(
            {n: ModuleDecision("fft" if n in fft else "lora") for n in names},
            lora=cfg.lora,
            seed=seed,
        )

    # -- runs --------------------------------------------------------------------------------------
    def run(
        self,
        stage: str,
        mode: str,
        seed: int,
        problems: ProblemSet,
        plan: HybridPlan,
        mode_optim: ModeOptim,
        *,
        save_dir: str | Path | None = None,
        base_checkpoint: str | Path | None = None,
    ) -> RunResult:
        """Train one (stage, mode, seed) run and evaluate it on ``problems.test``.

        ``save_dir``: also save the result, as a trainables checkpoint (LoRA A/B and FFT weights,
        the plan; ``save_dir/iter_<steps>``, ``save_dir/latest``) on top of
        ``base_checkpoint``, or, when that is None, of the starting weights saved to
        ``save_dir/base`` first: ``megatron-hybrid merge`` / ``export-peft`` read it.
        """
        cfg = self.cfg
        stage_cfg = cfg.sft if stage == "sft" else cfg.grpo
        torch.manual_seed(seed)
        reward_errors = reward_timeouts = 0
        reward_first_error = None
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            chunks = self.fresh_model(stage)
            if save_dir is not None and base_checkpoint is None:
                base_checkpoint = save_model(
                    Path(save_dir) / "base",
                    chunks,
                    cfg.model,
                    details=tokenizer_details(self.tok),
                    overwrite=True,
                )
            summary = apply_hybrid_plan(chunks, plan)
            reference = (
                ReferencePolicy(chunks)
                if stage == "grpo" and cfg.grpo.grpo.loss.kl_coef > 0
                else None
            )
            ddp = wrap_ddp(chunks)
            optim = stage_optim(stage, stage_cfg, mode_optim)
            opt = build_optimizer(ddp, optim)
            subset = problems.test[: stage_cfg.eval_subset]
            acc_curve: list[list[float]] = [[0, self.accuracy(ddp, subset)]]
            reward_curve: list[list[float]] = []
            loss_curve: list[list[float]] = []
            tag = f"{stage}/{mode}/seed{seed}"
            if stage == "sft":
                draw = self.sft_batches(problems.train, cfg.sft.batch_size, seed=10_000 + seed)
                for step, loss, grad_norm in self._lm_steps(
                    ddp, opt, optim, draw, cfg.sft.steps, tag
                ):
                    self._scalar(f"{tag}/grad_norm", grad_norm, step)
                    if loss is not None:
                        loss_curve.append([step, loss])
                        self._scalar(f"{tag}/loss", loss, step)
                    if step % cfg.sft.eval_interval == 0 and step < cfg.sft.steps:
                        acc_curve.append([step, self.accuracy(ddp, subset)])
                        self._scalar(f"{tag}/heldout_accuracy", acc_curve[-1][1], step)
                        self._progress(tag, step, cfg.sft.steps, "loss", loss_curve, acc_curve)
            else:
                g = cfg.grpo.grpo
                gen = torch.Generator().manual_seed(20_000 + seed)
                encoded = self.encode(problems.train)
                per_rank = g.prompts_per_step // self.dp_size
                for step in range(1, cfg.grpo.steps + 1):
                    idx = torch.randint(
                        0, len(encoded), (g.prompts_per_step,), generator=gen
                    ).tolist()
                    mine = [encoded[i] for i in idx][
                        self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank
                    ]
                    stats = grpo_step(
                        ddp,
                        opt,
                        mine,
                        g,
                        decode=self.tok.decode,
                        stop_token=self.tok.stop_ids,
                        vocab_size=self.tok.vocab_size,
                        seed=rollout_seed(seed, step, self.dp_rank),
                        optim=optim,
                        step=step - 1,
                        total_steps=cfg.grpo.steps,
                        reference=reference,
                    )
                    reward_curve.append([step, stats.reward_mean])
                    reward_errors += stats.reward_errors
                    reward_timeouts += stats.reward_timeouts
                    if reward_first_error is None and stats.reward_first_error is not None:
                        reward_first_error = f"step {step}: {stats.reward_first_error}"
                    if stats.reward_errors or stats.reward_timeouts:
                        self._scalar(f"{tag}/reward_errors", stats.reward_errors, step)
                        self._scalar(f"{tag}/reward_timeouts", stats.reward_timeouts, step)
                    if stats.loss is not None:
                        loss_curve.append([step, stats.loss])
                    self._scalar(f"{tag}/reward", stats.reward_mean, step)
                    if "grad_norm" in stats.metrics:
                        self._scalar(f"{tag}/grad_norm", stats.metrics["grad_norm"], step)
                    if step % cfg.grpo.eval_interval == 0 and step < cfg.grpo.steps:
                        acc_curve.append([step, self.accuracy(ddp, subset)])
                        self._scalar(f"{tag}/heldout_accuracy", acc_curve[-1][1], step)
                        self._progress(tag, step, cfg.grpo.steps, "reward", reward_curve, acc_curve)
            final = self.accuracy(ddp, problems.test)
            steps = cfg.sft.steps if stage == "sft" else cfg.grpo.steps
            saved = None
            if save_dir is not None:
                saved = save_trainables(
                    save_dir,
                    steps,
                    ddp,
                    plan=plan,
                    model_cfg=cfg.model,
                    base=base_checkpoint,
                    save_rng=False,
                )
            acc_curve.append([steps, self.accuracy(ddp, subset)])
            wall = time.perf_counter() - t0
            opt_bytes = _mp_sum(optimizer_state_bytes(opt))
            state_bytes = (
                _mp_sum(
                    sum(
                        p.numel() * p.element_size() * (2 if p.requires_grad else 1)
                        for c in ddp
                        for p in c.module.parameters()
                    )
                )
                + opt_bytes
            )
        self._scalar(f"{tag}/final_heldout_accuracy", final, steps)
        return RunResult(
            mode=mode,
            stage=stage,
            seed=seed,
            final_heldout_accuracy=final,
            reward_curve=reward_curve,
            accuracy_curve=acc_curve,
            loss_curve=loss_curve,
            wall_time_s=wall,
            trainable_params=summary.trainable_params,
            optimizer_state_bytes=opt_bytes,
            peak_memory_bytes=int(mem.peak),
            training_state_bytes=state_bytes,
            fft_modules=plan.names("fft") if mode != "fft" else [],
            reward_errors=reward_errors,
            reward_timeouts=reward_timeouts,
            reward_first_error=reward_first_error,
            checkpoint=None if saved is None else str(saved),
        )

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)


def stage_optim(stage: str, stage_cfg: StageConfig, mode_optim: ModeOptim) -> OptimConfig:
    """AdamW settings of one run: the mode's rates, the stage's schedule, clipping and beta2.

    SFT warms up for ``warmup_steps`` then decays with a cosine to 0; GRPO keeps the rate constant.
    """
    return OptimConfig(
        lr=mode_optim.lr,
        lora_lr_mult=mode_optim.lora_lr_mult,
        loraplus_lr_ratio=mode_optim.loraplus_lr_ratio,
        warmup_steps=getattr(stage_cfg, "warmup_steps", 0),
        decay="cosine" if stage == "sft" else "constant",
        clip_grad=stage_cfg.clip_grad,
        adam_beta2=stage_cfg.adam_beta2,
    )


def run_demo(
    cfg: DemoConfig, *, printer: Callable[[str], None] = print, progress: bool = True
) -> dict:
    """Run the benchmark; writes results.json, report.md and report.png under ``cfg.out``."""
    from megatron_hybrid.demo.report import write_report

    initialize_runtime(cfg.parallel, seed=1234)
    try:
        rank0 = dist.get_rank() == 0
        say = printer if rank0 else (lambda *_a, **_k: None)
        demo = Demo(cfg, say)
        start = time.perf_counter()
        demo.warm_up()
        stages = [s for s in ("sft", "grpo") if getattr(cfg, s).enabled]
        plans_used: dict[str, dict] = {}
        starts: dict[str, dict] = {}
        jobs = []
        for stage in stages:
            info = demo.prepare_start(stage)
            if info is not None:
                starts[stage] = info
            scfg = getattr(cfg, stage)
            problems = make_problem_set(scfg.task, scfg.test_size, scfg.val_size)
            table = demo.score_table(problems, stage)
            plans_used[stage] = {"scores": table}
            for seed in cfg.seeds:
                for mode in cfg.modes:
                    plan = demo.plan_for(mode, table, seed)
                    jobs.append((stage, mode, seed, problems, plan, scfg.modes[mode]))
        unique, where = dedupe_jobs(jobs)
        workers = resolve_workers(cfg.workers, len(unique))
        shared = len(jobs) - len(unique)
        say(
            f"{len(unique)} runs in {workers} process{'es' if workers > 1 else ''}"
            + (f" ({shared} more share a run: same plan, seed and settings)" if shared else "")
        )
        bar = None
        if progress and rank0:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(unique), desc="runs", unit="run")
        done: dict[int, RunResult] = {}

        def on_result(index: int, res: RunResult) -> None:
            done[index] = res
            if rank0:  # partial results survive an interrupted benchmark
                partial = [done[i] for i in sorted(done)]
                _write_partial(Path(cfg.out), cfg, partial, time.perf_counter() - start)
            if bar is not None:
                bar.update(1)
                bar.write(
                    f"  {res.stage:4s} {res.mode:16s} seed {res.seed}: held-out accuracy "
                    f"{res.final_heldout_accuracy:.3f} ({res.wall_time_s:.0f} s)"
                )

        run_jobs(demo, unique, workers, on_result)
        results = [
            done[u] if jobs[i] is unique[u] else _shared_result(done[u], jobs[i][1])
            for i, u in enumerate(where)
        ]
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        out = {
            "config": _jsonable(asdict(cfg)),
            "total_wall_time_s": elapsed,
            "starts": starts,
            "plans": plans_used,
            "runs": [asdict(r) for r in results],
        }
        if rank0:
            paths = write_report(out, Path(cfg.out))
            (Path(cfg.out) / "results.partial.json").unlink(missing_ok=True)  # results.json has all
            say(f"benchmark done in {elapsed / 60:.1f} min: " + ", ".join(str(p) for p in paths))
        if demo.writer is not None:
            demo.writer.close()
        return out
    finally:
        destroy_runtime()


def _shared_result(res: RunResult, mode: str) -> RunResult:
    from dataclasses import replace

    return replace(res, mode=mode, shared_with=res.mode)


def default_sweep_grid(
    cfg: DemoConfig,
    stage: str,
    lrs: list[float] | None = None,
    lora_mults: list[float] | None = None,
) -> dict[str, list[ModeOptim]]:
    """mode -> the (lr, lora_lr_mult) points to try.

    ``lrs`` for every mode, else the stage's rate x (1/3, 1, 3); ``lora_mults`` (the adapters'
    multiplier) for every mode with adapters, else the configured one. ``fft`` has no adapters and
    keeps its multiplier.
    """
    if stage not in ("sft", "grpo"):
        raise ValueError(f"unknown stage {stage!r}; valid: sft, grpo")
    for name, values in (("learning rates", lrs), ("lora_lr_mults", lora_mults)):
        if values is not None and (not values or any(not v > 0 for v in values)):
            raise ValueError(f"sweep {name} must be > 0, got {values}")
    modes = getattr(cfg, stage).modes
    grid: dict[str, list[ModeOptim]] = {}
    for m in cfg.modes:
        rates = dict.fromkeys(lrs or [modes[m].lr / 3, modes[m].lr, modes[m].lr * 3])
        mults = dict.fromkeys(lora_mults if lora_mults and m != "fft" else [modes[m].lora_lr_mult])
        ratio = modes[m].loraplus_lr_ratio
        grid[m] = [
            ModeOptim(lr=lr, lora_lr_mult=k, loraplus_lr_ratio=ratio) for lr in rates for k in mults
        ]
    return grid


def run_sweep(
    cfg: DemoConfig,
    stage: str,
    grid: dict[str, list[ModeOptim]],
    *,
    seeds: tuple[int, ...] = (0,),
    printer=print,
) -> dict[str, dict]:
    """Learning-rate sweep on the VALIDATION split (never the test set).

    ``grid``: mode -> the (lr, lora_lr_mult) points to try; every point is trained once per seed in
    ``seeds`` (single runs of this benchmark are bimodal, so one seed can mislead). Returns mode ->
    {"results": [{"lr", "lora_lr_mult", "mean", "per_seed": {seed: accuracy}}, ...],
    "best": the point with the highest mean (ties: the lower rates)} and writes
    ``<out>/sweep_<stage>.json``.
    """
    seeds = tuple(dict.fromkeys(seeds))  # a repeated seed would be the same run twice
    if not seeds:
        raise ValueError("sweep seeds must not be empty")
    initialize_runtime(cfg.parallel, seed=1234)
    try:
        rank0 = dist.get_rank() == 0
        say = printer if rank0 else (lambda *_a, **_k: None)
        demo = Demo(cfg, say)
        demo.warm_up()
        demo.prepare_start(stage)
        on_val, table = demo.validation_stage(stage)
        # (mode, index of the point in grid[mode], seed), one training run each
        points = [
            (mode, j, seed)
            for mode, opts in grid.items()
            for j in range(len(opts))
            for seed in seeds
        ]
        jobs = [
            (stage, mode, seed, on_val, demo.plan_for(mode, table, seed), grid[mode][j])
            for mode, j, seed in points
        ]
        found: dict[tuple[str, int, int], float] = {}

        def on_result(index: int, res: RunResult) -> None:
            mode, j, seed = points[index]
            found[points[index]] = res.final_heldout_accuracy
            opt = grid[mode][j]
            say(
                f"  sweep {stage} {mode:16s} lr {opt.lr:.1e} adapters x{opt.lora_lr_mult:g} seed {seed}: "
                f"validation accuracy {res.final_heldout_accuracy:.3f} ({res.wall_time_s:.0f} s)"
            )

        run_jobs(demo, jobs, resolve_workers(cfg.workers, len(jobs)), on_result)
        out: dict[str, dict] = {}
        for mode, opts in grid.items():
            results = []
            for j, opt in enumerate(opts):
                per_seed = {str(seed): found[(mode, j, seed)] for seed in seeds}
                mean = sum(per_seed.values()) / len(per_seed)
                results.append(
                    {
                        "lr": opt.lr,
                        "lora_lr_mult": opt.lora_lr_mult,
                        "per_seed": per_seed,
                        "mean": mean,
                    }
                )
            best = max(results, key=lambda r: (r["mean"], -r["lr"], -r["lora_lr_mult"]))
            out[mode] = {
                "results": results,
                "best": {k: best[k] for k in ("lr", "lora_lr_mult", "mean")},
            }
            say(
                f"  best {stage} {mode:16s} lr {best['lr']:.1e} adapters x{best['lora_lr_mult']:g}: "
                f"mean validation accuracy {best['mean']:.3f} over seeds {', '.join(map(str, seeds))}"
            )
        if rank0:
            path = Path(cfg.out) / f"sweep_{stage}.json"
            atomic_write_text(path, json.dumps(out, indent=1) + "\n")
            say(f"sweep written to {path}")
        return out
    finally:
        destroy_runtime()


def _write_partial(out: Path, cfg: DemoConfig, results: list[RunResult], elapsed: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "partial": True,
        "config": _jsonable(asdict(cfg)),
        "total_wall_time_s": elapsed,
        "runs": [asdict(r) for r in results],
    }
    atomic_write_text(out / "results.partial.json", json.dumps(data, default=str) + "\n")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj
