"""The plan artifact: a versioned JSON file written by ``megatron-hybrid score``.

It records what was scored and how (model fingerprint, budget, score method, solver, calibration)
and, per candidate module, its global name, kind, full shape, parameters, scores, decision and
LoRA rank. :meth:`PlanArtifact.to_hybrid_plan` turns it into the :class:`HybridPlan` that
:func:`~megatron_hybrid.peft.apply.apply_hybrid_plan` applies at any TP/PP layout.
Files are written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_hybrid.fileio import atomic_write
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.plan import HybridPlan, ModuleDecision

__all__ = [
    "SCHEMA_VERSION",
    "ModuleEntry",
    "PlanArtifact",
    "load_plan",
    "model_fingerprint",
    "save_plan",
]

SCHEMA_VERSION = 1

_FINGERPRINT_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "swiglu",
    "add_bias_linear",
    "add_qkv_bias",
)


def model_fingerprint(model: ModelConfig) -> dict:
    """Architecture facts a plan depends on (layout-independent)."""
    d = {k: getattr(model, k) for k in _FINGERPRINT_KEYS}
    d["num_query_groups"] = model.kv_heads
    return d


@dataclass
class ModuleEntry:
    """One candidate module in the plan."""

    name: str
    kind: str
    shape: list[int]
    """Full (unsharded) weight shape [out, in]."""
    params: int
    scores: dict[str, float]
    decision: str
    """``fft`` or ``lora`` (or ``frozen``)."""
    rank: int | None = None


@dataclass
class PlanArtifact:
    model: dict
    budget: dict
    score: dict
    calibration: dict
    lora: dict
    modules: list[ModuleEntry]
    seed: int = 0
    schema_version: int = SCHEMA_VERSION
    created_by: str = field(default_factory=lambda: f"megatron-hybrid {_version()}")

    def fft_names(self) -> list[str]:
        return sorted(m.name for m in self.modules if m.decision == "fft")

    def to_hybrid_plan(self) -> HybridPlan:
        decisions = {}
        for m in self.modules:
            if m.decision == "lora":
                decisions[m.name] = ModuleDecision("lora", m.rank)
            elif m.decision == "fft":
                decisions[m.name] = ModuleDecision("fft")
        return HybridPlan(modules=decisions, lora=LoRAConfig.from_dict(self.lora), seed=self.seed)

    def check_model(self, model: ModelConfig, source: str = "plan") -> None:
        """Raise ValueError naming every architecture field that differs from ``model``."""
        want = model_fingerprint(model)
        diffs = [
            f"{k}: plan has {self.model.get(k)!r}, model has {v!r}"
            for k, v in want.items()
            if self.model.get(k) != v
        ]
        if diffs:
            raise ValueError(f"{source} was made for another architecture: " + "; ".join(diffs))

    def to_dict(self) -> dict:
        d = asdict(self)
        order = [
            "schema_version",
            "created_by",
            "model",
            "budget",
            "score",
            "calibration",
            "lora",
            "seed",
            "modules",
        ]
        return {k: d[k] for k in order}


def layout_record(parallel) -> dict:
    """The ``calibration.layout`` of a plan: the TP / PP / virtual-PP sizes and sequence
    parallelism of ``parallel`` (a :class:`~megatron_hybrid.runtime.distributed.ParallelConfig`)
    and the DP size in use."""
    from megatron.core import parallel_state

    return {
        "tensor_model_parallel_size": parallel.tensor_model_parallel_size,
        "pipeline_model_parallel_size": parallel.pipeline_model_parallel_size,
        "virtual_pipeline_model_parallel_size": parallel.virtual_pipeline_model_parallel_size,
        "sequence_parallel": parallel.sequence_parallel,
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }


def _version() -> str:
    from megatron_hybrid import __version__

    return __version__


def save_plan(artifact: PlanArtifact, path: str | Path) -> Path:
    """Write the plan atomically; returns the path."""

    def write(f) -> None:
        json.dump(artifact.to_dict(), f, indent=1)
        f.write("\n")

    return atomic_write(path, write)


def _is_int(x: object, low: int) -> bool:
    return type(x) is int and x >= low


def _entry_problem(entry: ModuleEntry) -> str | None:
    """What is wrong with one module entry (None when nothing is)."""
    if not isinstance(entry.name, str) or not entry.name:
        return f"name must be a non-empty string, got {entry.name!r}"
    if entry.decision not in ("fft", "lora", "frozen"):
        return f"unknown decision {entry.decision!r}"
    if not isinstance(entry.kind, str):
        return f"kind must be a string, got {entry.kind!r}"
    shape = entry.shape
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(x, 1) for x in shape)):
        return f"shape must be [out, in] (two positive integers), got {shape!r}"
    if not _is_int(entry.params, 0):
        return f"params must be a non-negative integer, got {entry.params!r}"
    scores = entry.scores
    if not isinstance(scores, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()
    ):
        return f"scores must map score names to numbers, got {scores!r}"
    if entry.decision == "lora":
        if entry.rank is not None and not _is_int(entry.rank, 1):
            return f"rank must be a positive integer, got {entry.rank!r}"
    elif entry.rank is not None:
        return f"rank {entry.rank!r} is given, but a {entry.decision} module has no adapter"
    return None


def load_plan(path: str | Path) -> PlanArtifact:
    """Read and validate a plan file; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan file {path} does not exist")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"plan file {path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"plan file {path}: top level must be an object")
    version = d.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"plan file {path} has schema_version {version!r}; this version reads {SCHEMA_VERSION}"
        )
    required = ("model", "budget", "score", "calibration", "lora", "modules")
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"plan file {path} lacks keys {missing}")
    for key in ("model", "budget", "score", "calibration", "lora"):
        if not isinstance(d[key], dict):
            raise ValueError(f"plan file {path}: {key} must be an object, got {d[key]!r}")
    if not isinstance(d["modules"], list):
        raise ValueError(f"plan file {path}: modules must be a list, got {d['modules']!r}")
    seed = d.get("seed", 0)
    if type(seed) is not int:
        raise ValueError(f"plan file {path}: seed must be an integer, got {seed!r}")
    modules = []
    first: dict[str, int] = {}
    for i, m in enumerate(d["modules"]):
        if not isinstance(m, dict):
            raise ValueError(f"plan file {path}: modules[{i}] must be an object, got {m!r}")
        try:
            entry = ModuleEntry(**m)
        except TypeError as e:
            raise ValueError(f"plan file {path}: modules[{i}]: {e}") from None
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(f"plan file {path}: modules[{i}] ({entry.name}): {problem}")
        if entry.name in first:
            raise ValueError(
                f"plan file {path}: modules[{i}] ({entry.name}) repeats modules[{first[entry.name]}]"
            )
        first[entry.name] = i
        modules.append(entry)
    try:
        LoRAConfig.from_dict(d["lora"])
    except ValueError as e:
        raise ValueError(f"plan file {path}: lora: {e}") from None
    return PlanArtifact(
        model=d["model"],
        budget=d["budget"],
        score=d["score"],
        calibration=d["calibration"],
        lora=d["lora"],
        modules=modules,
        seed=seed,
        schema_version=version,
        created_by=d.get("created_by", "unknown"),
    )
