"""Hybrid plans: which modules are fully fine-tuned, which get LoRA (and at what rank), the rest frozen.

A :class:`HybridPlan` maps GLOBAL module names (see :mod:`megatron_hybrid.peft.naming`) to a
:class:`ModuleDecision`. A :class:`PeftSpec` is the user-facing, glob-based form (NeMo-style
``target_modules`` / ``exclude_modules`` plus ``fft_modules``) that :meth:`PeftSpec.resolve` turns into
a plan against the model's real module names.

Pattern rules (both specs and plans): a pattern without dots and wildcards names a module kind
(``linear_qkv`` matches every layer's ``linear_qkv``); anything else is an ``fnmatch`` glob over the
full global name (``decoder.layers.1*.mlp.linear_fc?``, ``*.layers.3.*``).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from megatron_hybrid.config import check_int
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.naming import CANDIDATE_KINDS, module_kind

__all__ = ["MODES", "HybridPlan", "ModuleDecision", "PeftSpec", "closest_names", "match_pattern"]

MODES = ("fft", "lora", "frozen")


@dataclass(frozen=True)
class ModuleDecision:
    """What happens to one module."""

    mode: str
    """``fft`` (weight and bias trained in place), ``lora`` (wrapped), or ``frozen``."""
    rank: int | None = None
    """LoRA rank; None uses the plan's default ``lora.rank``. Only for ``lora``."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.rank is not None and self.mode != "lora":
            raise ValueError(f"rank is only meaningful for mode 'lora', not {self.mode!r}")


def match_pattern(pattern: str, name: str) -> bool:
    """Whether a target pattern selects the global module name ``name`` (see module docstring)."""
    if "." not in pattern and not any(c in pattern for c in "*?["):
        return module_kind(name) == pattern
    return fnmatch.fnmatchcase(name, pattern)


def closest_names(pattern: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The real names most similar to a pattern, for error messages."""
    names = list(names)
    kinds = sorted({module_kind(x) for x in names})
    pool = kinds if "." not in pattern else names
    return difflib.get_close_matches(pattern, pool, n=n, cutoff=0.0)


@dataclass
class HybridPlan:
    """Resolved plan: global module name -> decision; unnamed modules stay frozen."""

    modules: dict[str, ModuleDecision]
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Default adapter hyper-parameters (a decision's ``rank`` overrides ``lora.rank``)."""
    seed: int = 0
    """Seed of the adapter initialisation (shared by all ranks; layout-independent)."""

    def __post_init__(self) -> None:
        for name, decision in self.modules.items():
            if not isinstance(decision, ModuleDecision):
                raise ValueError(
                    f"{name}: decision must be a ModuleDecision, got {type(decision).__name__}"
                )

    def names(self, mode: str) -> list[str]:
        """Sorted global names with the given mode."""
        return sorted(n for n, d in self.modules.items() if d.mode == mode)

    def lora_config_for(self, name: str) -> LoRAConfig:
        decision = self.modules[name]
        return self.lora if decision.rank is None else self.lora.with_rank(decision.rank)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {
            "lora": asdict(self.lora),
            "seed": self.seed,
            "modules": {
                n: ({"mode": d.mode} | ({"rank": d.rank} if d.rank is not None else {}))
                for n, d in sorted(self.modules.items())
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> HybridPlan:
        unknown = set(d) - {"lora", "seed", "modules"}
        if unknown:
            raise ValueError(f"unknown plan keys: {sorted(unknown)}; valid: lora, modules, seed")
        modules = {}
        for name, entry in (d.get("modules") or {}).items():
            if isinstance(entry, str):
                entry = {"mode": entry}
            try:
                modules[name] = ModuleDecision(**entry)
            except (TypeError, ValueError) as e:
                raise ValueError(f"plan module {name!r}: {e}") from None
        return cls(
            modules=modules,
            lora=LoRAConfig.from_dict(d.get("lora") or {}),
            seed=int(d.get("seed", 0)),
        )


@dataclass
class PeftSpec:
    """Glob-based description of a hybrid plan (the ``peft:`` section of a config).

    Precedence: ``fft_modules`` > LoRA targets; ``exclude_modules`` removes modules from both.
    """

    target_modules: list[str] = field(default_factory=lambda: list(CANDIDATE_KINDS))
    """Modules that get LoRA (kinds or globs over global names). Empty list: no LoRA."""
    exclude_modules: list[str] = field(default_factory=list)
    """Modules that are neither adapted nor fully fine-tuned."""
    fft_modules: list[str] = field(default_factory=list)
    """Modules fully fine-tuned in place (kinds or globs)."""
    rank_overrides: dict[str, int] = field(default_factory=dict)
    """Pattern -> LoRA rank for matching LoRA modules (the first matching pattern wins)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Default adapter hyper-parameters."""
    seed: int = 0
    """Adapter init seed."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig.from_dict(self.lora)
        for key in ("target_modules", "exclude_modules", "fft_modules"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"peft.{key} must be a list of strings, got {value!r}")
        for pattern, rank in self.rank_overrides.items():
            check_int(f"peft.rank_overrides[{pattern!r}]", rank)

    def resolve(self, names: Sequence[str]) -> HybridPlan:
        """Resolve against the model's global module names; every pattern must match something."""
        names = list(names)

        def select(key: str, patterns: list[str]) -> set[str]:
            chosen: set[str] = set()
            for p in patterns:
                hits = {n for n in names if match_pattern(p, n)}
                if not hits:
                    raise ValueError(
                        f"peft.{key}: pattern {p!r} matches no module of the model; "
                        f"closest names: {closest_names(p, names)}"
                    )
                chosen |= hits
            return chosen

        excluded = select("exclude_modules", self.exclude_modules)
        fft = select("fft_modules", self.fft_modules) - excluded
        lora = select("target_modules", self.target_modules) - excluded - fft
        select("rank_overrides", list(self.rank_overrides))
        for p in self.rank_overrides:
            if not any(match_pattern(p, n) for n in lora):
                raise ValueError(
                    f"peft.rank_overrides: pattern {p!r} matches no LoRA module (the modules it "
                    "matches are fully fine-tuned, excluded or not in target_modules), so its rank "
                    "would never apply"
                )
        modules: dict[str, ModuleDecision] = {n: ModuleDecision("fft") for n in fft}
        for n in lora:
            rank = next((r for p, r in self.rank_overrides.items() if match_pattern(p, n)), None)
            modules[n] = ModuleDecision("lora", rank)
        return HybridPlan(modules=modules, lora=self.lora, seed=self.seed)
