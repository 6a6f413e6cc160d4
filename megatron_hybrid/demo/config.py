"""Configuration of the embedded benchmark (``megatron-hybrid demo``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_hybrid.config import check_int, check_known_keys, check_number
from megatron_hybrid.data.arith import ArithTask, CharTokenizer
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.rl.generation import SamplingConfig
from megatron_hybrid.rl.grpo import GRPOConfig
from megatron_hybrid.rl.losses import PolicyLossConfig
from megatron_hybrid.runtime.distributed import ParallelConfig
from megatron_hybrid.scoring.calibration import ProbeConfig
from megatron_hybrid.scoring.run import ScoreConfig
from megatron_hybrid.scoring.selection import SelectionConfig

__all__ = [
    "MODES",
    "StageConfig",
    "DemoConfig",
    "GRPOStageConfig",
    "ModeOptim",
    "SFTStageConfig",
    "StartConfig",
    "WarmupConfig",
    "quick_overrides",
]

#: Training modes compared by the benchmark.
MODES = ("fft", "lora", "hybrid", "hybrid-random", "hybrid-gradnorm")


@dataclass
class ModeOptim:
    """Learning rates of one mode: ``lr`` for full weights, ``lr x lora_lr_mult`` for adapters
    (their B matrices ``loraplus_lr_ratio`` times that: LoRA+, off at 1)."""

    lr: float
    lora_lr_mult: float = 1.0
    loraplus_lr_ratio: float = 1.0

    def __post_init__(self) -> None:
        check_number("lr", self.lr, lambda v: v > 0, "> 0")
        check_number("lora_lr_mult", self.lora_lr_mult, lambda v: v > 0, "> 0")
        check_number("loraplus_lr_ratio", self.loraplus_lr_ratio, lambda v: v > 0, "> 0")


def _merge_modes(given: dict, defaults: dict[str, ModeOptim], where: str) -> dict[str, ModeOptim]:
    """YAML/CLI mode overrides on top of the defaults (a partial entry keeps the other fields)."""
    from dataclasses import asdict

    out = dict(defaults)
    for mode, value in (given or {}).items():
        if mode not in MODES:
            raise ValueError(f"{where}.modes has unknown mode {mode!r}; valid: {', '.join(MODES)}")
        if isinstance(value, ModeOptim):
            out[mode] = value
            continue
        if not isinstance(value, dict):
            raise ValueError(
                f"{where}.modes.{mode} must be a mapping with lr / lora_lr_mult / loraplus_lr_ratio"
            )
        check_known_keys(ModeOptim, value, f"{where}.modes.{mode}")
        try:
            out[mode] = ModeOptim(**(asdict(defaults[mode]) | value))
        except ValueError as e:
            raise ValueError(f"{where}.modes.{mode}.{e}") from None
        except TypeError as e:
            raise ValueError(f"{where}.modes.{mode}: {e}") from None
    return out


def _default_mode_optim() -> dict[str, ModeOptim]:
    # One peak rate for full weights in every mode (2e-3); the adapters' multiplier per mode. Chosen
    # on the validation split for the base trained over the real vocabulary (docs/benchmark.md,
    # seeds 5-9): FFT 2e-3 (0.900, every seed 0.89-0.91; 3e-3 left two of five seeds at 0); LoRA
    # adapters at 2.1e-2 = x10.5 (x3 / x7 / x10 at 3e-3 tried: 0.267 / 0.424 / 0.383); the hybrid
    # modes x4.5 (adapters at 9e-3, as before; 2e-3 x4.5 and 3e-3 x3 within 0.02 of each other).
    return {
        "fft": ModeOptim(lr=2e-3),
        "lora": ModeOptim(lr=2e-3, lora_lr_mult=10.5),
        "hybrid": ModeOptim(lr=2e-3, lora_lr_mult=4.5),
        "hybrid-random": ModeOptim(lr=2e-3, lora_lr_mult=4.5),
        "hybrid-gradnorm": ModeOptim(lr=2e-3, lora_lr_mult=4.5),
    }


@dataclass
class WarmupConfig:
    """Supervised warm-up that makes the base model (cached on disk)."""

    task: ArithTask = field(default_factory=lambda: ArithTask(op="+", min_digits=1, max_digits=3))
    steps: int = 1200
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("steps", self.steps)
        check_int("batch_size", self.batch_size)
        check_number("lr", self.lr, lambda v: v > 0, "> 0")
        check_int("seed", self.seed, minimum=0)


def _digitwise_difference() -> ArithTask:
    # a # b, both 1-3 digits: the digit-wise difference mod 10 (see data/arith.py). New to an
    # addition-only base; it reuses the base's digit alignment but needs a new per-digit table.
    # Written with "-" (borrow-free subtraction): see docs/benchmark.md for the symbol's effect.
    return ArithTask(op="#", min_digits=1, max_digits=3, symbol="-")


@dataclass
class StageConfig:
    """What every post-training stage has: a task, held-out splits and evaluation cadence."""

    enabled: bool = True
    task: ArithTask = field(default_factory=_digitwise_difference)
    test_size: int = 500
    """Held-out test rows (final accuracy)."""
    val_size: int = 300
    """Validation rows (learning-rate sweeps; never the test rows)."""
    steps: int = 400
    eval_interval: int = 100
    eval_subset: int = 200
    """Test rows evaluated at each interval for the curves (the final number uses all)."""
    clip_grad: float = 0.0
    """Global gradient-norm clip in every mode (Megatron's ``clip_grad``); 0 disables it."""
    adam_beta2: float = 0.999
    """AdamW's second-moment decay in every mode (Megatron's ``adam_beta2``)."""

    def __post_init__(self) -> None:
        for key in ("test_size", "val_size", "steps", "eval_interval", "eval_subset"):
            check_int(key, getattr(self, key))
        check_number("clip_grad", self.clip_grad, lambda v: v >= 0, ">= 0")
        check_number("adam_beta2", self.adam_beta2, lambda v: 0 < v < 1, "in (0, 1)")


@dataclass
class SFTStageConfig(StageConfig):
    """Supervised post-training on a new operation (digit-wise difference from an addition base)."""

    steps: int = 600
    batch_size: int = 64
    warmup_steps: int = 20
    modes: dict[str, ModeOptim] = field(default_factory=_default_mode_optim)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("batch_size", self.batch_size)
        check_int("warmup_steps", self.warmup_steps, minimum=0)
        self.modes = _merge_modes(self.modes, _default_mode_optim(), "sft")


@dataclass
class StartConfig:
    """A half-trained start for the GRPO stage (``grpo.start``).

    RL from the addition base on a new operation has nothing to sharpen, and RL on a task the base
    already knows only sharpens it (no FFT - LoRA gap; docs/benchmark.md). So the GRPO runs start
    from the warm-up base fine-tuned, all weights, on the GRPO stage's own training split (its
    validation and test prompts are never trained on) until greedy accuracy on the first
    ``check_size`` validation prompts reaches ``target_accuracy``: checked every
    ``check_interval`` steps and at the end of a ``max_steps`` cosine schedule (AdamW, ``lr``,
    ``warmup_steps`` linear warm-up). Cached next to the base. ``target_accuracy=0`` starts the
    runs from the warm-up base itself.
    """

    target_accuracy: float = 0.3
    max_steps: int = 600
    lr: float = 2e-3
    """2e-3 since 2026-12-01: with the base trained over the real vocabulary, 3e-3 stayed on the
    new operation's loss plateau (0.000 after 600 steps) while 2e-3 reached 0.64 at step 240 (and
    3e-3 with batch order seed 1 0.30 at step 380); docs/benchmark.md."""
    warmup_steps: int = 20
    batch_size: int = 64
    check_interval: int = 20
    check_size: int = 100
    seed: int = 31_337
    """Order of the training batches."""

    def __post_init__(self) -> None:
        check_number("target_accuracy", self.target_accuracy, lambda v: 0 <= v <= 1, "in [0, 1]")
        check_number("lr", self.lr, lambda v: v > 0, "> 0")
        for key in ("max_steps", "batch_size", "check_interval", "check_size"):
            check_int(key, getattr(self, key))
        check_int("seed", self.seed, minimum=0)
        if type(self.warmup_steps) is not int or not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(
                f"warmup_steps must be an integer in [0, max_steps), got {self.warmup_steps!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.target_accuracy > 0


@dataclass
class GRPOStageConfig(StageConfig):
    """RL post-training with a dense verifiable reward (digit partial credit) on the SFT stage's
    new operation, from a half-trained start (:class:`StartConfig`)."""

    # The SFT stage's operation (digit-wise difference, 1-3 digits); the start knows it halfway
    # (about 0.5 exact), so RL has a lot left to learn and partial credit to learn it from.
    steps: int = 100
    eval_interval: int = 20
    start: StartConfig = field(default_factory=StartConfig)
    grpo: GRPOConfig = field(
        default_factory=lambda: GRPOConfig(
            prompts_per_step=16,
            group_size=8,
            micro_batch_size=64,
            reward="digit_partial",
            sampling=SamplingConfig(temperature=1.0, max_new_tokens=6),
            loss=PolicyLossConfig(),
        )
    )
    modes: dict[str, ModeOptim] = field(default_factory=lambda: _grpo_mode_optim())

    def __post_init__(self) -> None:
        super().__post_init__()
        self.modes = _merge_modes(self.modes, _grpo_mode_optim(), "grpo")
        if isinstance(self.grpo, dict):
            self.grpo = GRPOConfig(**self.grpo)


def _grpo_mode_optim() -> dict[str, ModeOptim]:
    # Chosen on the validation split from the half-trained start (docs/benchmark.md: seeds 0-4,
    # 1e-4 and 3e-4 per mode, then checked on fresh seeds 5-9): full weights 3e-4 in fft, 1e-4 in
    # every mode with adapters; adapters x30.
    out = {mode: ModeOptim(lr=1e-4, lora_lr_mult=30.0) for mode in MODES}
    out["fft"] = ModeOptim(lr=3e-4)
    return out


@dataclass
class DemoConfig:
    """The whole benchmark: base warm-up, then an SFT stage and a GRPO stage across modes x seeds."""

    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            num_layers=4,
            hidden_size=128,
            num_attention_heads=4,
            ffn_hidden_size=352,
            vocab_size=CharTokenizer().vocab_size,
            max_sequence_length=16,
        )
    )
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=1, alpha=1.0))
    select: SelectionConfig = field(default_factory=SelectionConfig)
    score: ScoreConfig = field(
        default_factory=lambda: ScoreConfig(
            # Picked on the validation split among the registry's scores (docs/benchmark.md; seeds
            # 5-9 with the current base: probe_residual 0.817, gradient norm 0.793, random 0.710,
            # residual = epd 0.688 in the SFT stage; probe_residual = gradient norm in GRPO).
            method="probe_residual",
            probe=ProbeConfig(steps=20, lr=3e-3),
        )
    )
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    grpo: GRPOStageConfig = field(default_factory=GRPOStageConfig)
    modes: list[str] = field(default_factory=lambda: list(MODES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    seq_length: int = 16
    out: str = "runs/demo"
    cache_dir: str | None = None
    """Where the warmed-up base is cached (default: ``<out>/../cache``)."""
    tensorboard: bool = True
    workers: int = 0
    """Processes that run the (stage, mode, seed) runs side by side: 0 = one per CPU core (at most
    8; 1 on CUDA or under torchrun). See :mod:`megatron_hybrid.demo.pool`."""

    def __post_init__(self) -> None:
        check_int("workers", self.workers, minimum=0)  # 0 = automatic
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"demo.modes has unknown modes {unknown}; valid: {', '.join(MODES)}")
        if not isinstance(self.seeds, list) or not self.seeds:
            raise ValueError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        for i, seed in enumerate(self.seeds):
            check_int(f"seeds[{i}]", seed, minimum=0)
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            raise ValueError(f"seeds must be distinct (paired comparisons); repeated: {repeated}")
        if self.score.objective != "nll":
            raise ValueError(
                f"score.objective={self.score.objective!r}: the benchmark scores the modules with "
                "the next-token loss on each stage's data (nll); policy_gradient is for "
                "megatron-hybrid score"
            )
        check_int("seq_length", self.seq_length)
        if self.seq_length > self.model.max_sequence_length:
            raise ValueError(
                f"seq_length ({self.seq_length}) exceeds model.max_sequence_length "
                f"({self.model.max_sequence_length})"
            )
        paths = (
            {"out": self.out}
            if self.cache_dir is None
            else {"out": self.out, "cache_dir": self.cache_dir}
        )
        for key, value in paths.items():  # cache_dir may be null (the default)
            if not (isinstance(value, str) and value):
                raise ValueError(f"{key} must be a non-empty path string, got {value!r}")


def quick_overrides() -> list[str]:
    """The ``--quick`` preset: a few minutes on 2 CPU cores (a smoke test, not a benchmark)."""
    return [
        "warmup.steps=200",
        "warmup.batch_size=64",
        "seeds=[0]",
        "sft.steps=60",
        "sft.eval_interval=30",
        "sft.test_size=100",
        "sft.val_size=50",
        "sft.eval_subset=50",
        "grpo.steps=6",
        "grpo.eval_interval=3",
        "grpo.test_size=100",
        "grpo.val_size=50",
        "grpo.eval_subset=50",
        "grpo.grpo.prompts_per_step=8",
        "grpo.grpo.group_size=4",
        "grpo.start.max_steps=40",
        "grpo.start.check_size=50",
        "score.probe.steps=5",
    ]
