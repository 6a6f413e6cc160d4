"""Score every candidate module, select the FFT modules, and build the plan artifact.

Distributed layout: each pipeline stage scores the candidates it holds; within a stage the
spectra are computed on the TP shards with all-reduces over the TP group (never gathering a
weight-sized matrix); the per-module table is then all-gathered over the pipeline group so every
rank holds all of it, every rank runs the same deterministic selection, and an all-gather of a
hash of the selection checks that they agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.config import check_int
from megatron_hybrid.peft.lora import parallel_mode_of
from megatron_hybrid.peft.naming import CANDIDATE_KINDS, ModuleRef, module_kind, walk_modules
from megatron_hybrid.scoring.calibration import (
    BatchSource,
    ProbeConfig,
    accumulate_gradients,
    probe_weight_deltas,
)
from megatron_hybrid.scoring.plan_io import ModuleEntry
from megatron_hybrid.scoring.selection import Candidate, SelectionConfig, select_fft_modules
from megatron_hybrid.scoring.sharded import sharded_spectral_stats
from megatron_hybrid.scoring.spectra import SCORE_FUNCTIONS, SpectralStats

__all__ = [
    "GRADIENT_METHODS",
    "PROBE_METHODS",
    "SCORE_METHODS",
    "ModuleScore",
    "ScoreConfig",
    "score_modules",
    "seeded_uniform",
    "select_and_check",
]

#: Scores computed from the accumulated calibration gradient G.
GRADIENT_METHODS = ("residual", "residual_frac", "grad_norm", "stable_rank")
#: Scores computed from the FFT probe (weight change dW, Adam moments).
PROBE_METHODS = ("probe_residual", "probe_residual_frac", "epd")
SCORE_METHODS = (*GRADIENT_METHODS, *PROBE_METHODS, "random")


@dataclass
class ScoreConfig:
    """How candidate modules are scored (the ``score:`` section)."""

    method: str = "residual"
    """Which score decides; one of :data:`SCORE_METHODS`. Default: the gradient residual, the best
    registry score in each of this project's three measured regimes and the cheapest (no probe, no
    optimizer state); docs/method.md has the evidence, including the prototype's opposite result."""
    rank: int | None = None
    """r in the residual (energy beyond the top-r singular values); None = the LoRA rank."""
    solver: str = "auto"
    """``exact`` (d x d Gram all-reduced, eigvalsh), ``randomized`` (subspace iteration, O(d q)
    communication per product) or ``auto``: exact when d <= 1024 or when the float64 Gram is no
    larger than gathering the matrix would be, randomized otherwise (d is the Gram side: ``in`` for
    column-parallel, ``out`` for row-parallel modules; for Megatron's candidates d = hidden size)."""
    num_batches: int = 8
    """K calibration steps for gradient scores (each a global batch of micro-batches)."""
    objective: str = "nll"
    """``nll``: next-token loss on prompt + reference answer (answer tokens counted);
    ``policy_gradient``: the GRPO loss on rollouts sampled from the base (see scoring/objectives.py)."""
    oversample: int = 8
    """Randomized solver: extra subspace columns beyond r."""
    iters: int = 4
    """Randomized solver: power iterations."""
    seed: int = 0
    """Seeds the randomized solver's start block and the ``random`` score."""
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    """The FFT probe behind ``probe_residual`` / ``epd``."""

    def __post_init__(self) -> None:
        if isinstance(self.probe, dict):
            self.probe = ProbeConfig(**self.probe)
        if self.method not in SCORE_METHODS:
            raise ValueError(
                f"score.method must be one of {', '.join(SCORE_METHODS)}; got {self.method!r}"
            )
        if self.solver not in ("auto", "exact", "randomized"):
            raise ValueError(
                f"score.solver must be 'auto', 'exact' or 'randomized', got {self.solver!r}"
            )
        check_int("score.num_batches", self.num_batches)
        check_int("score.rank", self.rank, optional=True)
        check_int("score.oversample", self.oversample, minimum=0)
        check_int("score.iters", self.iters, minimum=0)
        check_int("score.seed", self.seed, minimum=0)
        if self.objective not in ("nll", "policy_gradient"):
            raise ValueError(
                f"score.objective must be 'nll' or 'policy_gradient', got {self.objective!r}"
            )


@dataclass
class ModuleScore:
    """One candidate's scores (identical on every rank after the gather)."""

    name: str
    kind: str
    shape: tuple[int, int]
    params: int
    scores: dict[str, float]


def seeded_uniform(name: str, seed: int) -> float:
    """A layout-independent pseudo-random number in [0, 1) for module ``name`` (``random``)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def local_candidates(chunks: Sequence[torch.nn.Module]) -> list[ModuleRef]:
    """This rank's candidate modules (qkv, proj, fc1, fc2), sorted by global name."""
    refs = [
        r
        for r in walk_modules(chunks)
        if module_kind(r.name) in CANDIDATE_KINDS
        and parallel_mode_of(getattr(r.module, "base_layer", r.module))
    ]
    return sorted(refs, key=lambda r: r.name)


def pick_solver(solver: str, mode: str, full_shape: tuple[int, int], element_size: int) -> str:
    """Resolve ``auto`` for one module (see :attr:`ScoreConfig.solver`)."""
    if solver != "auto":
        return solver
    d = full_shape[1] if mode == "column" else full_shape[0]
    gram_bytes = 8 * d * d
    gather_bytes = full_shape[0] * full_shape[1] * element_size
    return "exact" if d <= 1024 or gram_bytes <= gather_bytes else "randomized"


def _full_shape(module: torch.nn.Module, mode: str, tp: int) -> tuple[int, int]:
    out_local, in_local = module.weight.shape
    return (out_local * tp, in_local) if mode == "column" else (out_local, in_local * tp)


def _spectral_scores(stats: SpectralStats, prefix: str = "") -> dict[str, float]:
    names = ("residual", "residual_frac") if prefix else GRADIENT_METHODS
    return {f"{prefix}{n}": float(SCORE_FUNCTIONS[n](stats)) for n in names}


def score_modules(
    chunks: Sequence[torch.nn.Module],
    batches: BatchSource,
    cfg: ScoreConfig,
    lora_rank: int,
    *,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    progress: Callable[[int], None] | None = None,
    forward_step: Callable | None = None,
) -> list[ModuleScore]:
    """Scores of every candidate of the whole model (all stages), on every rank.

    Args:
        chunks: this rank's plain model chunks (the base model, before any plan is applied).
        batches: ``batches(k)`` -> this DP rank's micro-batches for calibration/probe step k.
        cfg: method, solver, K, probe settings.
        lora_rank: r used by the residual scores when ``cfg.rank`` is None.
    """
    tp_group = tp_group or parallel_state.get_tensor_model_parallel_group()
    pp_group = pp_group or parallel_state.get_pipeline_model_parallel_group()
    tp = tp_group.size()
    r = cfg.rank or lora_rank
    refs = local_candidates(chunks)
    local: dict[str, ModuleScore] = {}
    for ref in refs:
        base = getattr(ref.module, "base_layer", ref.module)
        mode = parallel_mode_of(base)
        shape = _full_shape(base, mode, tp)
        local[ref.name] = ModuleScore(
            ref.name, module_kind(ref.name), shape, shape[0] * shape[1], {}
        )

    def spectrum(mat: torch.Tensor, ref: ModuleRef) -> SpectralStats:
        mode = parallel_mode_of(getattr(ref.module, "base_layer", ref.module))
        shape = local[ref.name].shape
        k = min(r, *shape)
        stats, _ = sharded_spectral_stats(
            mat,
            mode,
            tp_group,
            k,
            solver=pick_solver(cfg.solver, mode, shape, mat.element_size()),
            oversample=cfg.oversample,
            iters=cfg.iters,
            seed=cfg.seed,
        )
        return stats

    if cfg.method in GRADIENT_METHODS:
        grads = accumulate_gradients(
            chunks, refs, batches, cfg.num_batches, progress=progress, forward_step=forward_step
        )
        for ref in refs:
            local[ref.name].scores.update(_spectral_scores(spectrum(grads.pop(ref.name), ref)))
    elif cfg.method in PROBE_METHODS:
        by_name = {ref.name: ref for ref in refs}

        def score_delta(name: str, delta: torch.Tensor) -> None:
            # Scored as soon as its probe group finishes; the fp32 change is dropped after.
            local[name].scores.update(_spectral_scores(spectrum(delta, by_name[name]), "probe_"))

        result = probe_weight_deltas(
            chunks,
            refs,
            batches,
            cfg.probe,
            progress=progress,
            forward_step=forward_step,
            on_delta=score_delta,
        )
        epd = torch.tensor([result.epd_local[ref.name] for ref in refs], dtype=torch.float64)
        if tp > 1 and len(refs):
            dist.all_reduce(epd, group=tp_group)
        for i, ref in enumerate(refs):
            local[ref.name].scores["epd"] = float(epd[i])
    for ref in refs:
        local[ref.name].scores["random"] = seeded_uniform(ref.name, cfg.seed)

    gathered: list[list[ModuleScore] | None] = [None] * pp_group.size()
    dist.all_gather_object(gathered, list(local.values()), group=pp_group)
    table = {m.name: m for part in gathered for m in (part or [])}
    return [table[n] for n in sorted(table, key=_natural_key)]


def _natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def select_and_check(
    table: Sequence[ModuleScore], method: str, select: SelectionConfig
) -> list[str]:
    """The FFT selection by ``method``; verified identical on every rank (all-gather of a hash).

    Raises:
        ValueError: every candidate has the same ``method`` score (nothing to rank: the selection
            would follow module names).
    """
    values = {m.scores[method] for m in table}
    if len(table) > 1 and len(values) == 1:
        raise ValueError(
            f"all {len(table)} candidates have the same {method} score ({values.pop():g}), so the "
            "selection would only follow module names: the calibration gradient is zero "
            "(score.objective=policy_gradient: no reward differences within any group, so every "
            "advantage is 0; pick prompts the model sometimes solves, or use objective nll)"
        )
    chosen = select_fft_modules(
        [Candidate(m.name, m.params, m.scores[method]) for m in table], select
    )
    digest = hashlib.sha256(json.dumps(chosen).encode()).hexdigest()
    if dist.is_initialized() and dist.get_world_size() > 1:
        digests: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        odd = [i for i, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise RuntimeError(f"ranks {odd} computed a different FFT selection than rank 0")
    return chosen


def plan_entries(
    table: Sequence[ModuleScore], fft: Sequence[str], lora_rank: int
) -> list[ModuleEntry]:
    """Per-module plan entries: selected -> fft, the other candidates -> lora at ``lora_rank``."""
    chosen = set(fft)
    return [
        ModuleEntry(
            name=m.name,
            kind=m.kind,
            shape=list(m.shape),
            params=m.params,
            scores=dict(m.scores),
            decision="fft" if m.name in chosen else "lora",
            rank=None if m.name in chosen else lora_rank,
        )
        for m in table
    ]


def describe(cfg: ScoreConfig) -> dict:
    """The ``score`` section of the plan artifact, as JSON reads it back (tuples become lists)."""
    return json.loads(json.dumps(asdict(cfg)))
