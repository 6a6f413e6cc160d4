"""score_modules, select_and_check and plan_entries in one process (TP=PP=DP=1).

References: ``torch.linalg.svdvals`` of the full accumulated gradient / probe weight change (what
the distributed spectra must reproduce), and ``select_fft_modules`` called directly.
"""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.data.arith import ArithTask
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.runtime.distributed import ParallelConfig
from megatron_hybrid.scoring.calibration import (
    ProbeConfig,
    accumulate_gradients,
    probe_weight_deltas,
)
from megatron_hybrid.scoring.job import task_batch_source
from megatron_hybrid.scoring.run import (
    GRADIENT_METHODS,
    PROBE_METHODS,
    SCORE_METHODS,
    ModuleScore,
    ScoreConfig,
    local_candidates,
    pick_solver,
    plan_entries,
    score_modules,
    seeded_uniform,
    select_and_check,
)
from megatron_hybrid.scoring.selection import Candidate, SelectionConfig, select_fft_modules
from megatron_hybrid.train.quickstart import RunConfig
from tests.tiny_hybrid import MODEL

RUN = RunConfig(global_batch_size=4, micro_batch_size=2, seq_length=16)
LORA_RANK = 4
# Full shapes [out, in]: qkv = h + 2 x groups x head_dim, SwiGLU fc1 = 2 x ffn.
SHAPES = {
    "self_attention.linear_qkv": (64, 32),
    "self_attention.linear_proj": (32, 32),
    "mlp.linear_fc1": (128, 32),
    "mlp.linear_fc2": (32, 64),
}
ORDER = [f"decoder.layers.{i}.{p}" for i in range(2) for p in sorted(SHAPES)]


def build() -> list[torch.nn.Module]:
    return build_model(MODEL, ParallelConfig())


def batches():
    return task_batch_source(ArithTask(), RUN)


def no_batches(k: int):
    raise AssertionError(f"the random score must not read calibration data (asked for batch {k})")


def svd_scores(mat: torch.Tensor, r: int) -> dict[str, float]:
    s = torch.linalg.svdvals(mat.double())
    fro = float(mat.double().square().sum())
    top = float(s[:r].square().sum())
    return {
        "residual": fro - top,
        "residual_frac": (fro - top) / fro,
        "grad_norm": fro**0.5,
        "stable_rank": fro / float(s[0] ** 2),
    }


# -- ScoreConfig ------------------------------------------------------------------------------
def test_an_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"score\.method must be one of .*; got 'svd'") as info:
        ScoreConfig(method="svd")
    assert all(m in str(info.value) for m in SCORE_METHODS)


@pytest.mark.parametrize("objective", ["NLL", "", "grpo"])
def test_unknown_objective_is_rejected(objective):
    with pytest.raises(ValueError, match=r"score\.objective must be 'nll' or 'policy_gradient'"):
        ScoreConfig(objective=objective)


def test_policy_gradient_objective_is_accepted():
    assert ScoreConfig(objective="policy_gradient").objective == "policy_gradient"


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"solver": "lanczos"}, "solver"),
        ({"num_batches": 0}, "num_batches"),
        ({"num_batches": 2.0}, "num_batches"),
        ({"rank": 0}, "rank"),
        ({"oversample": -1}, "oversample"),
        ({"iters": 1.5}, "iters"),
        ({"seed": "x"}, "seed"),
        ({"probe": {"steps": 0}}, "probe.steps"),
    ],
)
def test_score_config_rejects_bad_values_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"score\.{key}"):
        ScoreConfig(**kw)


def test_a_probe_mapping_becomes_a_probe_config():
    cfg = ScoreConfig(probe={"steps": 3, "group_size": 2})
    assert cfg.probe == ProbeConfig(steps=3, group_size=2)


def test_the_default_method_is_the_gradient_residual():
    assert ScoreConfig().method == "residual"
    assert set(SCORE_METHODS) == {*GRADIENT_METHODS, *PROBE_METHODS, "random"}


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_an_explicit_solver_is_kept(solver):
    assert pick_solver(solver, "column", (12288, 4096), 4) == solver


@pytest.mark.parametrize(
    ("mode", "shape", "size", "want"),
    [
        ("column", (64, 32), 4, "exact"),  # small Gram side: always exact
        ("row", (1024, 65536), 2, "exact"),  # d = out = 1024
        ("column", (12288, 4096), 4, "exact"),  # Gram 128 MiB <= gather 192 MiB
        ("column", (4096, 4096), 4, "randomized"),  # Gram 128 MiB > gather 64 MiB
        ("row", (4096, 11008), 2, "randomized"),  # d = out = 4096; gather of bf16 is smaller
        ("row", (4096, 16384), 4, "exact"),
    ],
)
def test_auto_solver_compares_the_float64_gram_with_a_gather(mode, shape, size, want):
    assert pick_solver("auto", mode, shape, size) == want


# -- score_modules ----------------------------------------------------------------------------
def test_random_scores_need_no_data_and_depend_only_on_name_and_seed(single_rank_runtime):
    chunks = build()
    table = score_modules(chunks, no_batches, ScoreConfig(method="random", seed=5), LORA_RANK)
    assert [m.name for m in table] == ORDER
    for m in table:
        assert m.scores == {"random": seeded_uniform(m.name, 5)}
        assert 0 <= m.scores["random"] < 1
        assert m.shape == SHAPES[m.name.split(".", 3)[3]] and m.params == m.shape[0] * m.shape[1]
        assert m.kind == m.name.rsplit(".", 1)[1]
    other = score_modules(chunks, no_batches, ScoreConfig(method="random", seed=6), LORA_RANK)
    assert [m.scores for m in other] != [m.scores for m in table]


def test_seeded_uniform_is_a_fixed_function_of_name_and_seed():
    values = {
        seeded_uniform(f"decoder.layers.{i}.mlp.linear_fc1", s) for i in range(50) for s in range(4)
    }
    assert len(values) == 200 and all(0 <= v < 1 for v in values)
    assert seeded_uniform("x", 0) == seeded_uniform("x", 0)
    # Pinned: a plan scored with ``random`` must select the same modules in every version.
    assert seeded_uniform("decoder.layers.0.mlp.linear_fc1", 0) == 0.315032176711035


@pytest.mark.parametrize(("rank", "solver"), [(None, "auto"), (2, "exact"), (None, "randomized")])
def test_gradient_scores_equal_svdvals_of_the_accumulated_gradient(
    single_rank_runtime, rank, solver
):
    chunks = build()
    grads = accumulate_gradients(chunks, local_candidates(chunks), batches(), 2)
    cfg = ScoreConfig(
        method="residual", num_batches=2, rank=rank, solver=solver, iters=8, oversample=40
    )
    table = score_modules(chunks, batches(), cfg, LORA_RANK)
    assert [m.name for m in table] == ORDER
    r = rank or LORA_RANK
    for m in table:
        assert set(m.scores) == {*GRADIENT_METHODS, "random"}
        want = svd_scores(grads[m.name], r)
        for key in GRADIENT_METHODS:
            assert m.scores[key] == pytest.approx(want[key], rel=1e-6), f"{m.name} {key}"


def test_probe_scores_equal_svdvals_of_the_probe_weight_change(single_rank_runtime):
    chunks = build()
    probe = ProbeConfig(steps=2, lr=1e-2, eps=1e-3)
    ref = probe_weight_deltas(chunks, local_candidates(chunks), batches(), probe)
    table = score_modules(chunks, batches(), ScoreConfig(method="epd", probe=probe), LORA_RANK)
    for m in table:
        assert set(m.scores) == {*PROBE_METHODS, "random"}
        want = svd_scores(ref.delta[m.name], LORA_RANK)
        assert m.scores["probe_residual"] == pytest.approx(want["residual"], rel=1e-6)
        assert m.scores["probe_residual_frac"] == pytest.approx(want["residual_frac"], rel=1e-6)
        assert m.scores["epd"] == pytest.approx(ref.epd_local[m.name], rel=1e-12)


# -- selection and plan entries ---------------------------------------------------------------
def table_of(scores: dict[str, float]) -> list[ModuleScore]:
    return [
        ModuleScore(n, n.rsplit(".", 1)[1], (64, 32), 2048, {"residual": s, "random": -s})
        for n, s in scores.items()
    ]


def test_select_and_check_returns_the_selection_by_the_named_method(single_rank_runtime):
    table = table_of({n: float(i) for i, n in enumerate(ORDER)})
    select = SelectionConfig(budget=0.25)
    chosen = select_and_check(table, "residual", select)
    assert chosen == select_fft_modules(
        [Candidate(m.name, m.params, m.scores["residual"]) for m in table], select
    )
    assert chosen == sorted(ORDER[-2:])
    assert select_and_check(table, "random", select) == sorted(ORDER[:2])


def test_select_and_check_passes_selection_errors_through(single_rank_runtime):
    table = table_of({n: float("nan") if i == 3 else 1.0 for i, n in enumerate(ORDER)})
    with pytest.raises(ValueError, match=rf"{ORDER[3]}: score is NaN"):
        select_and_check(table, "residual", SelectionConfig())


def test_select_and_check_refuses_scores_that_are_all_equal(single_rank_runtime):
    """A zero calibration gradient (policy_gradient with no reward differences) scores every
    module 0; before, the selection then followed module names without a word."""
    table = table_of({n: 0.0 for n in ORDER})
    with pytest.raises(
        ValueError, match=rf"all {len(ORDER)} candidates have the same residual score \(0\)"
    ):
        select_and_check(table, "residual", SelectionConfig())


def test_plan_entries_mark_the_selection_fft_and_the_rest_lora_at_the_rank():
    table = table_of({n: float(i) for i, n in enumerate(ORDER)})
    entries = plan_entries(table, [ORDER[2], ORDER[5]], lora_rank=6)
    assert [e.name for e in entries] == ORDER
    for e, m in zip(entries, table):
        fft = e.name in (ORDER[2], ORDER[5])
        assert (e.decision, e.rank) == (("fft", None) if fft else ("lora", 6))
        assert (e.kind, e.shape, e.params, e.scores) == (m.kind, [64, 32], m.params, m.scores)
        assert e.scores is not m.scores, "entries must not alias the table's score dicts"
