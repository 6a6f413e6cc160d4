"""Pick the modules to fully fine-tune from their scores under a budget.

* ``budget_unit: modules``: k = ceil(budget x n) modules (at least one), the top-k by score.
  With per-layer caps this is a partition-matroid constraint, for which greedy by score is optimal.
* ``budget_unit: params``: a 0/1 knapsack (value = score, cost = parameters, capacity = budget x
  candidate parameters). Solved exactly by merging Pareto frontiers over groups of equal-cost
  modules (a transformer has a handful of distinct module sizes, so the frontier stays small);
  within a group the best subset of a given size is its top scores. With per-layer caps, or if the
  frontier would exceed ``max_frontier``, it falls back to greedy by score per parameter.

Ties are broken by name (ascending), so every rank computes the same selection.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from megatron_hybrid.config import check_int
from megatron_hybrid.peft.plan import match_pattern

__all__ = ["Candidate", "SelectionConfig", "select_fft_modules"]

_LAYER_OF = "decoder.layers."


@dataclass(frozen=True)
class Candidate:
    """One scored module."""

    name: str
    params: int
    score: float


@dataclass
class SelectionConfig:
    """How many modules may be fully fine-tuned, and which ones must or must not be."""

    budget: float = 0.10
    """Fraction in (0, 1] of candidate modules (or of candidate parameters)."""
    budget_unit: str = "modules"
    """``modules`` or ``params``."""
    always_fft: list[str] = field(default_factory=list)
    """Patterns (kinds or globs) always fully fine-tuned; they count toward the budget."""
    never_fft: list[str] = field(default_factory=list)
    """Patterns never fully fine-tuned."""
    max_per_layer: int | None = None
    """At most this many FFT modules in one decoder layer."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.budget, bool)
            or not isinstance(self.budget, numbers.Real)
            or not 0 < self.budget <= 1
        ):
            raise ValueError(f"select.budget must be in (0, 1], got {self.budget!r}")
        self.budget = float(self.budget)  # NumPy floats too; the exact budget uses repr()
        if self.budget_unit not in ("modules", "params"):
            raise ValueError(
                f"select.budget_unit must be 'modules' or 'params', got {self.budget_unit!r}"
            )
        check_int("select.max_per_layer", self.max_per_layer, optional=True)
        for key in ("always_fft", "never_fft"):
            value = getattr(self, key)
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"select.{key} must be a list of strings, got {value!r}")


def _fraction_of(budget: float, total: int) -> Fraction:
    """budget x total, exact for the budget as written: 0.29 x 100 is 29 (in floats, 28.99...)."""
    return Fraction(repr(budget)) * total


def _layer(name: str) -> str | None:
    if _LAYER_OF not in name:
        return None
    return name.split(_LAYER_OF, 1)[1].split(".", 1)[0]


def _order(c: Candidate) -> tuple:
    return (-c.score, c.name)


def _check_patterns(key: str, patterns: list[str], names: list[str]) -> None:
    for p in patterns:
        if not any(match_pattern(p, n) for n in names):
            raise ValueError(f"select.{key}: pattern {p!r} matches no candidate module")


def select_fft_modules(
    candidates: Sequence[Candidate], cfg: SelectionConfig, max_frontier: int = 200_000
) -> list[str]:
    """Names of the modules to fully fine-tune (sorted), respecting the budget exactly.

    Raises:
        ValueError: a NaN score, ``always_fft`` modules that alone exceed the budget or a layer cap,
        or a pattern that matches no candidate.
    """
    cands = sorted(candidates, key=lambda c: c.name)
    names = [c.name for c in cands]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate candidate names: {repeated}")
    for c in cands:
        if math.isnan(c.score):
            raise ValueError(f"{c.name}: score is NaN")
    _check_patterns("always_fft", cfg.always_fft, names)
    _check_patterns("never_fft", cfg.never_fft, names)
    forced = [c for c in cands if any(match_pattern(p, c.name) for p in cfg.always_fft)]
    banned = {c.name for c in cands if any(match_pattern(p, c.name) for p in cfg.never_fft)}
    clash = sorted(banned & {c.name for c in forced})
    if clash:
        raise ValueError(f"modules both in select.always_fft and select.never_fft: {clash}")
    pool = [c for c in cands if c.name not in banned and c not in forced]

    per_layer: dict[str | None, int] = defaultdict(int)
    for c in forced:
        per_layer[_layer(c.name)] += 1
    if cfg.max_per_layer is not None:
        over = {k: v for k, v in per_layer.items() if k is not None and v > cfg.max_per_layer}
        if over:
            raise ValueError(
                f"select.always_fft exceeds max_per_layer={cfg.max_per_layer} in layers {sorted(over)}"
            )

    if cfg.budget_unit == "modules":
        k = max(1, math.ceil(_fraction_of(cfg.budget, len(cands))))
        if len(forced) > k:
            raise ValueError(
                f"select.always_fft names {len(forced)} modules but the budget allows {k}"
            )
        chosen = list(forced)
        for c in sorted(pool, key=_order):
            if len(chosen) >= k:
                break
            layer = _layer(c.name)
            if (
                cfg.max_per_layer is not None
                and layer is not None
                and per_layer[layer] >= cfg.max_per_layer
            ):
                continue
            chosen.append(c)
            per_layer[layer] += 1
        return sorted(c.name for c in chosen)

    capacity = math.floor(_fraction_of(cfg.budget, sum(c.params for c in cands)))
    used = sum(c.params for c in forced)
    if used > capacity:
        raise ValueError(
            f"select.always_fft modules hold {used:,} parameters; the budget allows {capacity:,}"
        )
    if cfg.max_per_layer is None:
        picked = _knapsack_exact(pool, capacity - used, max_frontier)
        if picked is not None:
            return sorted([c.name for c in forced] + picked)
    chosen = list(forced)
    for c in sorted(pool, key=lambda c: (-(c.score / max(c.params, 1)), c.name)):
        layer = _layer(c.name)
        # As in the exact solver: a module without a positive score only lowers the total.
        if c.score <= 0 or used + c.params > capacity:
            continue
        if (
            cfg.max_per_layer is not None
            and layer is not None
            and per_layer[layer] >= cfg.max_per_layer
        ):
            continue
        chosen.append(c)
        used += c.params
        per_layer[layer] += 1
    return sorted(c.name for c in chosen)


def _knapsack_exact(
    pool: Sequence[Candidate], capacity: int, max_frontier: int
) -> list[str] | None:
    """Exact 0/1 knapsack by Pareto-frontier merging over equal-cost groups; None if too large.

    Only positive-score modules are worth taking. Frontier entries: cost -> (value, names).
    Ties in value prefer lower cost, then the lexicographically smaller sorted name list.
    """
    groups: dict[int, list[Candidate]] = defaultdict(list)
    for c in pool:
        if c.score > 0 and c.params <= capacity:
            groups[c.params].append(c)
    frontier: list[tuple[int, float, tuple[str, ...]]] = [(0, 0.0, ())]
    for cost in sorted(groups):
        items = sorted(groups[cost], key=_order)
        prefix_value = [0.0]
        for c in items:
            prefix_value.append(prefix_value[-1] + c.score)
        merged: dict[int, tuple[float, tuple[str, ...]]] = {}
        for f_cost, f_value, f_names in frontier:
            for n in range(len(items) + 1):
                total = f_cost + n * cost
                if total > capacity:
                    break
                value = f_value + prefix_value[n]
                names = tuple(sorted(f_names + tuple(c.name for c in items[:n])))
                best = merged.get(total)
                if best is None or value > best[0] or (value == best[0] and names < best[1]):
                    merged[total] = (value, names)
        # Keep the Pareto frontier: increasing cost must buy strictly more value.
        frontier = []
        best_value = -math.inf
        for total in sorted(merged):
            value, names = merged[total]
            if value > best_value:
                frontier.append((total, value, names))
                best_value = value
        if len(frontier) > max_frontier:
            return None
    # Values strictly increase along the frontier, so its last entry is the optimum.
    return list(frontier[-1][2])
