"""select_fft_modules: top-k under a module budget, the exact knapsack under a parameter budget
(checked against brute force over all subsets), its greedy fallback, forced / banned modules,
per-layer caps, and SelectionConfig validation.

Pure selection logic on hand-made candidates; no model is built.
"""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest

from megatron_hybrid.peft.plan import match_pattern
from megatron_hybrid.scoring.selection import Candidate, SelectionConfig, select_fft_modules

_PATHS = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


def name(layer: int, slot: int) -> str:
    return f"decoder.layers.{layer}.{_PATHS[slot]}"


def model_candidates(scores: list[float], params: list[int] | None = None) -> list[Candidate]:
    """Candidates named like a model's: four per layer, in the order of ``_PATHS``."""
    params = params or [100] * len(scores)
    return [Candidate(name(i // 4, i % 4), p, s) for i, (s, p) in enumerate(zip(scores, params))]


def params_cfg(budget: float, **kw) -> SelectionConfig:
    return SelectionConfig(budget=budget, budget_unit="params", **kw)


def value(cands: list[Candidate], chosen: list[str]) -> float:
    by_name = {c.name: c for c in cands}
    return sum(by_name[n].score for n in chosen)


def cost(cands: list[Candidate], chosen: list[str]) -> int:
    by_name = {c.name: c for c in cands}
    return sum(by_name[n].params for n in chosen)


def per_layer_counts(chosen: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in chosen:
        layer = n.split("decoder.layers.", 1)[1].split(".", 1)[0]
        counts[layer] = counts.get(layer, 0) + 1
    return counts


def brute_force_knapsack(
    cands: list[Candidate],
    capacity: int,
    forced: set[str] = frozenset(),
    banned: set[str] = frozenset(),
) -> float:
    """The best total score over ALL subsets that contain ``forced``, avoid ``banned`` and fit."""
    free = [c for c in cands if c.name not in forced and c.name not in banned]
    base_cost = sum(c.params for c in cands if c.name in forced)
    base_value = sum(c.score for c in cands if c.name in forced)
    best = -math.inf
    for mask in range(1 << len(free)):
        subset = [c for i, c in enumerate(free) if mask >> i & 1]
        if base_cost + sum(c.params for c in subset) <= capacity:
            best = max(best, base_value + sum(c.score for c in subset))
    return best


def random_instance(rng: random.Random, sizes: str) -> list[Candidate]:
    n = rng.randint(1, 10)
    if sizes == "few":
        choices = rng.sample([1, 3, 4, 7, 10, 16], rng.randint(1, 3))
        params = [rng.choice(choices) for _ in range(n)]
    else:
        params = rng.sample(range(1, 64), n)
    scores = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.15:
            scores.append(0.0)
        elif kind < 0.3:
            scores.append(-rng.uniform(0.0, 2.0))
        elif kind < 0.45:
            scores.append(float(rng.randint(1, 3)))  # exact ties
        else:
            scores.append(rng.uniform(0.0, 5.0))
    return [
        Candidate(f"decoder.layers.{i // 4}.m{i}", p, s)
        for i, (p, s) in enumerate(zip(params, scores))
    ]


# -- module budget ----------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.01, 0.05, 0.1, 0.25, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("n", [1, 3, 10, 16, 20, 30, 40])
def test_module_budget_picks_ceil_budget_times_n_at_least_one(n, budget):
    cands = model_candidates([float(i) for i in range(n)])
    chosen = select_fft_modules(cands, SelectionConfig(budget=budget))
    # Decimal intent: 0.1 x 30 is 3 modules although 0.1 * 30 == 3.0000000000000004 in floats.
    assert len(chosen) == max(1, math.ceil(Fraction(str(budget)) * n))


def test_module_budget_takes_the_top_k_scores_and_returns_them_sorted_by_name():
    rng = random.Random(0)
    scores = [rng.uniform(-1, 1) for _ in range(16)]
    cands = model_candidates(scores)
    chosen = select_fft_modules(cands, SelectionConfig(budget=0.25))
    want = [c.name for c in sorted(cands, key=lambda c: -c.score)[:4]]
    assert chosen == sorted(want)


def test_module_budget_breaks_ties_by_name_whatever_the_input_order():
    cands = [Candidate(n, 10, 1.0) for n in ("b", "d", "a", "c")] + [Candidate("e", 10, 0.5)]
    cfg = SelectionConfig(budget=0.4)  # k = 2 of 5
    assert select_fft_modules(cands, cfg) == ["a", "b"]
    assert select_fft_modules(list(reversed(cands)), cfg) == ["a", "b"]


def test_module_budget_counts_modules_not_parameters():
    cands = [Candidate("big", 10_000, 2.0), Candidate("small", 1, 1.0), Candidate("tiny", 1, 0.0)]
    assert select_fft_modules(cands, SelectionConfig(budget=0.34)) == ["big", "small"]


def test_module_budget_still_takes_k_modules_when_scores_are_negative():
    cands = [Candidate("a", 1, -3.0), Candidate("b", 1, -1.0), Candidate("c", 1, -2.0)]
    assert select_fft_modules(cands, SelectionConfig(budget=0.5)) == ["b", "c"]


# -- parameter budget: exact knapsack ---------------------------------------------------------
@pytest.mark.parametrize("sizes", ["few", "distinct"])
def test_exact_knapsack_equals_brute_force_on_random_instances(sizes):
    rng = random.Random(1234 if sizes == "few" else 4321)
    for trial in range(150):
        cands = random_instance(rng, sizes)
        budget = rng.choice([rng.uniform(0.02, 1.0), 1.0, 0.5])
        capacity = math.floor(budget * sum(c.params for c in cands))
        chosen = select_fft_modules(cands, params_cfg(budget))
        assert chosen == sorted(set(chosen)), f"trial {trial}: not sorted / duplicated"
        assert cost(cands, chosen) <= capacity, f"trial {trial}: {chosen} exceeds {capacity}"
        best = brute_force_knapsack(cands, capacity)
        assert value(cands, chosen) == pytest.approx(best, abs=1e-9), f"trial {trial}: {cands}"
        assert all(c.score > 0 for c in cands if c.name in chosen), (
            "non-positive scores add nothing"
        )


def test_exact_knapsack_with_forced_and_banned_modules_equals_brute_force():
    rng = random.Random(7)
    for trial in range(100):
        cands = random_instance(rng, rng.choice(["few", "distinct"]))
        names = [c.name for c in cands]
        forced = set(rng.sample(names, rng.randint(0, min(2, len(names)))))
        banned = (
            set(rng.sample([n for n in names if n not in forced], rng.randint(0, 2)))
            if len(names) > 3
            else set()
        )
        total = sum(c.params for c in cands)
        budget = max(cost(cands, list(forced)) / total, rng.uniform(0.05, 1.0))
        budget = min(1.0, budget * 1.0001)
        capacity = math.floor(budget * total)
        if cost(cands, list(forced)) > capacity:
            continue
        cfg = params_cfg(budget, always_fft=sorted(forced), never_fft=sorted(banned))
        chosen = select_fft_modules(cands, cfg)
        assert forced <= set(chosen) and not banned & set(chosen), f"trial {trial}"
        assert cost(cands, chosen) <= capacity
        best = brute_force_knapsack(cands, capacity, forced, banned)
        assert value(cands, chosen) == pytest.approx(best, abs=1e-9), f"trial {trial}: {cands}"


def test_exact_knapsack_beats_greedy_by_score_per_parameter():
    # Greedy by density takes "a" (6.1 / 6) and then nothing fits; the optimum is b + c.
    cands = [Candidate("a", 6, 6.1), Candidate("b", 5, 5.0), Candidate("c", 5, 5.0)]
    assert select_fft_modules(cands, params_cfg(10 / 16)) == ["b", "c"]


def test_parameter_budget_may_select_nothing_when_no_module_fits():
    cands = [Candidate("a", 50, 1.0), Candidate("b", 50, 2.0)]
    assert select_fft_modules(cands, params_cfg(0.4)) == []


def test_parameter_capacity_is_not_lost_to_float_round_off():
    cands = [Candidate("a", 29, 1.0), Candidate("b", 71, 0.5)]
    assert select_fft_modules(cands, params_cfg(0.29)) == ["a"]


# -- parameter budget: greedy fallback --------------------------------------------------------
def test_a_tiny_max_frontier_falls_back_to_greedy_by_score_per_parameter():
    cands = [Candidate("a", 6, 6.1), Candidate("b", 5, 5.0), Candidate("c", 5, 5.0)]
    assert select_fft_modules(cands, params_cfg(10 / 16), max_frontier=1) == ["a"]


@pytest.mark.parametrize("max_per_layer", [None, 1, 2])
def test_greedy_fallback_respects_capacity_caps_and_forced_modules(max_per_layer):
    rng = random.Random(99)
    for trial in range(150):
        cands = random_instance(rng, rng.choice(["few", "distinct"]))
        forced = {cands[0].name} if rng.random() < 0.3 else set()
        total = sum(c.params for c in cands)
        budget = min(1.0, max(rng.uniform(0.05, 1.0), cost(cands, list(forced)) / total * 1.0001))
        capacity = math.floor(budget * total)
        if cost(cands, list(forced)) > capacity:
            continue
        cfg = params_cfg(budget, always_fft=sorted(forced), max_per_layer=max_per_layer)
        chosen = select_fft_modules(cands, cfg, max_frontier=1)
        assert cost(cands, chosen) <= capacity, f"trial {trial}"
        assert forced <= set(chosen)
        if max_per_layer is not None:
            assert max(per_layer_counts(chosen).values(), default=0) <= max_per_layer, (
                f"trial {trial}"
            )
        # Greedy is maximal: no left-out positive-score module would still fit (caps permitting).
        room = capacity - cost(cands, chosen)
        counts = per_layer_counts(chosen)
        for c in cands:
            layer = c.name.split(".")[2]
            capped = max_per_layer is not None and counts.get(layer, 0) >= max_per_layer
            if c.name not in chosen and c.score > 0 and c.params <= room and not capped:
                pytest.fail(f"trial {trial}: {c.name} still fits")


def test_max_per_layer_switches_the_parameter_budget_to_greedy_within_caps():
    cands = model_candidates([5.0, 4.0, 3.0, 0.5, 0.4, 0.3, 0.2, 0.1], [10] * 8)
    chosen = select_fft_modules(cands, params_cfg(0.5, max_per_layer=2))
    assert chosen == sorted([name(0, 0), name(0, 1), name(1, 0), name(1, 1)])


def test_greedy_fallback_never_takes_a_negative_score():
    cands = model_candidates([1.0, -1.0, -5.0, 2.0], [10] * 4)
    chosen = select_fft_modules(cands, params_cfg(1.0, max_per_layer=4))
    assert chosen == sorted([name(0, 0), name(0, 3)])


# -- always_fft / never_fft -------------------------------------------------------------------
def test_always_fft_modules_count_toward_the_module_budget():
    cands = model_candidates([float(i) for i in range(10)])  # scores rise with the index
    chosen = select_fft_modules(cands, SelectionConfig(budget=0.2, always_fft=[name(0, 0)]))
    assert chosen == sorted([name(0, 0), name(2, 1)])  # the forced one + the best of the rest


def test_always_fft_accepts_kinds_and_globs():
    cands = model_candidates([float(i) for i in range(8)])
    chosen = select_fft_modules(
        cands, SelectionConfig(budget=0.5, always_fft=["linear_qkv", "*.1.mlp.linear_fc2"])
    )
    assert chosen == sorted([name(0, 0), name(1, 0), name(1, 3), name(1, 2)])


def test_always_fft_modules_count_toward_the_parameter_budget():
    cands = [Candidate("a", 40, 0.0), Candidate("b", 30, 5.0), Candidate("c", 30, 4.0)]
    assert select_fft_modules(cands, params_cfg(0.7, always_fft=["a"])) == ["a", "b"]


def test_always_fft_beyond_the_module_budget_is_an_error():
    cands = model_candidates([1.0] * 10)
    with pytest.raises(
        ValueError, match="select.always_fft names 4 modules but the budget allows 1"
    ):
        select_fft_modules(cands, SelectionConfig(budget=0.1, always_fft=["decoder.layers.0.*"]))


def test_always_fft_beyond_the_parameter_budget_is_an_error():
    cands = [Candidate("a", 60, 1.0), Candidate("b", 40, 1.0)]
    with pytest.raises(
        ValueError, match=r"select.always_fft modules hold 60 parameters; the budget allows 50"
    ):
        select_fft_modules(cands, params_cfg(0.5, always_fft=["a"]))


def test_never_fft_modules_are_skipped_even_with_the_top_score():
    cands = model_candidates([9.0, 1.0, 2.0, 3.0])
    chosen = select_fft_modules(cands, SelectionConfig(budget=0.5, never_fft=["linear_qkv"]))
    assert chosen == sorted([name(0, 3), name(0, 2)])
    chosen = select_fft_modules(cands, params_cfg(0.5, never_fft=["linear_qkv"]))
    assert chosen == sorted([name(0, 3), name(0, 2)])


@pytest.mark.parametrize("key", ["always_fft", "never_fft"])
def test_a_pattern_that_matches_nothing_is_an_error(key):
    cands = model_candidates([1.0] * 8)
    with pytest.raises(
        ValueError, match=rf"select.{key}: pattern 'linear_fc3' matches no candidate"
    ):
        select_fft_modules(cands, SelectionConfig(budget=0.5, **{key: ["linear_fc3"]}))


def test_a_module_both_forced_and_banned_is_an_error():
    cands = model_candidates([1.0] * 8)
    cfg = SelectionConfig(budget=0.5, always_fft=["linear_fc1"], never_fft=["decoder.layers.1.*"])
    with pytest.raises(
        ValueError, match=r"both in select.always_fft and select.never_fft.*layers.1.mlp.linear_fc1"
    ):
        select_fft_modules(cands, cfg)


# -- per-layer caps ---------------------------------------------------------------------------
def test_max_per_layer_module_budget_equals_brute_force_under_the_caps():
    rng = random.Random(5)
    for trial in range(60):
        n = rng.randint(4, 12)
        cands = model_candidates([rng.uniform(-1, 3) for _ in range(n)])
        cap = rng.randint(1, 3)
        budget = rng.uniform(0.1, 1.0)
        chosen = select_fft_modules(cands, SelectionConfig(budget=budget, max_per_layer=cap))
        k = max(1, math.ceil(budget * n - 1e-9))
        assert max(per_layer_counts(chosen).values()) <= cap
        feasible = [
            s
            for size in range(min(k, n) + 1)
            for s in itertools.combinations(cands, size)
            if max(per_layer_counts([c.name for c in s]).values(), default=0) <= cap
        ]
        most = max(len(s) for s in feasible)
        assert len(chosen) == min(k, most), f"trial {trial}"
        best = max(sum(c.score for c in s) for s in feasible if len(s) == len(chosen))
        assert value(cands, chosen) == pytest.approx(best, abs=1e-9), f"trial {trial}"


def test_always_fft_beyond_max_per_layer_is_an_error():
    cands = model_candidates([1.0] * 8)
    cfg = SelectionConfig(budget=1.0, always_fft=["decoder.layers.1.mlp.*"], max_per_layer=1)
    with pytest.raises(ValueError, match=r"exceeds max_per_layer=1 in layers \['1'\]"):
        select_fft_modules(cands, cfg)


def test_modules_outside_decoder_layers_are_not_capped():
    cands = [
        Candidate("output_layer", 10, 5.0),
        Candidate("embedding.proj", 10, 4.0),
    ] + model_candidates([3.0, 2.0, 1.0, 0.0])
    chosen = select_fft_modules(cands, SelectionConfig(budget=0.5, max_per_layer=1))
    assert chosen == sorted(["output_layer", "embedding.proj", name(0, 0)])


# -- invalid input ----------------------------------------------------------------------------
@pytest.mark.parametrize("unit", ["modules", "params"])
def test_a_nan_score_is_an_error_naming_the_module(unit):
    cands = model_candidates([1.0, float("nan"), 2.0, 3.0])
    with pytest.raises(
        ValueError, match=r"decoder\.layers\.0\.self_attention\.linear_proj: score is NaN"
    ):
        select_fft_modules(cands, SelectionConfig(budget=0.5, budget_unit=unit))


def test_duplicate_candidate_names_are_an_error_naming_them():
    with pytest.raises(ValueError, match=r"duplicate candidate names: \['a'\]"):
        select_fft_modules(
            [Candidate("a", 1, 1.0), Candidate("b", 1, 1.0), Candidate("a", 2, 2.0)],
            SelectionConfig(),
        )


def test_a_numpy_budget_works_like_the_same_python_float():
    """np.float64 subclasses float and passed validation, then broke the exact budget arithmetic
    (``Fraction(repr(...))``) with a message that did not name select.budget."""
    np = pytest.importorskip("numpy")
    cands = model_candidates([float(i) for i in range(30)])
    want = select_fft_modules(cands, SelectionConfig(budget=0.25))
    for budget in (np.float64(0.25), np.float32(0.25)):
        cfg = SelectionConfig(budget=budget)
        assert type(cfg.budget) is float
        assert select_fft_modules(cands, cfg) == want


@pytest.mark.parametrize(
    "budget", [0, 0.0, -0.1, 1.01, 2, float("nan"), float("inf"), True, "0.1", None]
)
def test_a_budget_outside_zero_one_is_an_error_naming_select_budget(budget):
    with pytest.raises(ValueError, match=r"select\.budget must be in \(0, 1\]"):
        SelectionConfig(budget=budget)


@pytest.mark.parametrize("budget", [1e-6, 0.1, 1, 1.0])
def test_budgets_in_zero_one_are_accepted(budget):
    assert SelectionConfig(budget=budget).budget == budget


def test_an_unknown_budget_unit_is_an_error():
    with pytest.raises(
        ValueError, match=r"select\.budget_unit must be 'modules' or 'params', got 'flops'"
    ):
        SelectionConfig(budget_unit="flops")


@pytest.mark.parametrize("cap", [0, -1, 1.5, "2"])
def test_max_per_layer_must_be_a_positive_integer(cap):
    with pytest.raises(ValueError, match=r"select\.max_per_layer"):
        SelectionConfig(max_per_layer=cap)


@pytest.mark.parametrize("key", ["always_fft", "never_fft"])
def test_pattern_lists_must_be_lists_of_strings(key):
    with pytest.raises(ValueError, match=rf"select\.{key} must be a list of strings"):
        SelectionConfig(**{key: "linear_fc1"})


def test_match_pattern_is_what_always_fft_uses():
    # Guard for the helpers above: full names are globs that match exactly themselves.
    assert match_pattern(name(1, 2), name(1, 2)) and not match_pattern(name(1, 2), name(11, 2))
