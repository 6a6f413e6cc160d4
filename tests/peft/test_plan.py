"""PeftSpec.resolve (kinds, globs, precedence, rank overrides, errors) and HybridPlan serialisation.

Pure name logic: the module names are the global names ``candidate_names`` returns for a 3-layer
model, so no model is built here.
"""

from __future__ import annotations

import json

import pytest

from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.naming import CANDIDATE_KINDS
from megatron_hybrid.peft.plan import (
    HybridPlan,
    ModuleDecision,
    PeftSpec,
    closest_names,
    match_pattern,
)

_PATHS = {
    "linear_qkv": "self_attention.linear_qkv",
    "linear_proj": "self_attention.linear_proj",
    "linear_fc1": "mlp.linear_fc1",
    "linear_fc2": "mlp.linear_fc2",
}
NAMES = sorted(f"decoder.layers.{i}.{_PATHS[k]}" for i in range(3) for k in CANDIDATE_KINDS)


def name(layer: int, kind: str) -> str:
    return f"decoder.layers.{layer}.{_PATHS[kind]}"


def modes(plan: HybridPlan) -> dict[str, str]:
    return {n: d.mode for n, d in plan.modules.items()}


# -- patterns ---------------------------------------------------------------------------------
def test_a_bare_kind_matches_that_kind_in_every_layer():
    assert [n for n in NAMES if match_pattern("linear_fc1", n)] == [
        name(i, "linear_fc1") for i in range(3)
    ]


def test_a_bare_kind_does_not_match_a_substring_or_another_component():
    assert not match_pattern("linear_fc", name(0, "linear_fc1"))
    assert not match_pattern("mlp", name(0, "linear_fc1"))


def test_a_glob_matches_the_full_global_name():
    hits = [n for n in NAMES if match_pattern("decoder.layers.1.*", n)]
    assert hits == sorted(name(1, k) for k in CANDIDATE_KINDS)
    hits = [n for n in NAMES if match_pattern("*.mlp.linear_fc?", n)]
    assert hits == sorted(name(i, k) for i in range(3) for k in ("linear_fc1", "linear_fc2"))
    assert match_pattern(name(2, "linear_qkv"), name(2, "linear_qkv"))  # exact name
    assert not match_pattern("layers.2.self_attention.linear_qkv", name(2, "linear_qkv"))


def test_closest_names_compares_kinds_for_bare_patterns_and_full_names_for_dotted_ones():
    assert closest_names("linear_qvk", NAMES)[0] == "linear_qkv"
    assert closest_names("decoder.layers.2.mlp.linear_fc3", NAMES)[0] in {
        name(2, "linear_fc1"),
        name(2, "linear_fc2"),
    }


# -- resolve ----------------------------------------------------------------------------------
def test_default_spec_puts_lora_on_every_candidate_and_nothing_else():
    plan = PeftSpec().resolve(NAMES)
    assert modes(plan) == dict.fromkeys(NAMES, "lora")
    assert all(d.rank is None for d in plan.modules.values())


def test_kinds_and_globs_select_lora_targets():
    plan = PeftSpec(target_modules=["linear_qkv", "decoder.layers.2.mlp.*"]).resolve(NAMES)
    expected = {name(i, "linear_qkv") for i in range(3)} | {
        name(2, "linear_fc1"),
        name(2, "linear_fc2"),
    }
    assert modes(plan) == dict.fromkeys(expected, "lora")


def test_fft_takes_precedence_over_lora_targets():
    spec = PeftSpec(fft_modules=["decoder.layers.1.mlp.linear_fc1", "linear_proj"])
    plan = spec.resolve(NAMES)
    fft = {name(1, "linear_fc1")} | {name(i, "linear_proj") for i in range(3)}
    assert plan.names("fft") == sorted(fft)
    assert plan.names("lora") == sorted(set(NAMES) - fft)
    assert all(plan.modules[n].rank is None for n in fft)


def test_exclude_removes_modules_from_both_lora_and_fft():
    spec = PeftSpec(
        fft_modules=["linear_fc1"],
        exclude_modules=["decoder.layers.0.*"],
    )
    plan = spec.resolve(NAMES)
    assert not any(n.startswith("decoder.layers.0.") for n in plan.modules)
    assert plan.names("fft") == [name(1, "linear_fc1"), name(2, "linear_fc1")]
    assert len(plan.names("lora")) == 2 * 3


def test_empty_targets_with_fft_only_gives_an_fft_only_plan():
    plan = PeftSpec(target_modules=[], fft_modules=["decoder.layers.2.*"]).resolve(NAMES)
    assert modes(plan) == {name(2, k): "fft" for k in CANDIDATE_KINDS}


def test_rank_overrides_first_matching_pattern_wins():
    spec = PeftSpec(
        rank_overrides={"decoder.layers.0.*": 2, "linear_qkv": 16},
        lora=LoRAConfig(rank=4, alpha=8.0),
    )
    plan = spec.resolve(NAMES)
    assert plan.modules[name(0, "linear_qkv")].rank == 2  # both match; the first wins
    assert plan.modules[name(0, "linear_fc2")].rank == 2
    assert plan.modules[name(1, "linear_qkv")].rank == 16
    assert plan.modules[name(1, "linear_fc2")].rank is None
    assert plan.lora_config_for(name(1, "linear_fc2")) == LoRAConfig(rank=4, alpha=8.0)
    cfg = plan.lora_config_for(name(1, "linear_qkv"))
    assert (cfg.rank, cfg.alpha, cfg.scaling) == (16, 8.0, 0.5)


def test_rank_overrides_do_not_touch_fft_modules():
    spec = PeftSpec(fft_modules=["decoder.layers.0.*"], rank_overrides={"linear_qkv": 16})
    plan = spec.resolve(NAMES)
    assert plan.modules[name(0, "linear_qkv")] == ModuleDecision("fft")
    assert all(plan.modules[name(i, "linear_qkv")] == ModuleDecision("lora", 16) for i in (1, 2))


@pytest.mark.parametrize(
    "other", [{"fft_modules": ["linear_qkv"]}, {"exclude_modules": ["linear_qkv"]}]
)
def test_a_rank_override_that_reaches_no_lora_module_is_refused(other):
    spec = PeftSpec(rank_overrides={"linear_fc1": 8, "linear_qkv": 16}, **other)
    with pytest.raises(ValueError, match=r"rank_overrides: pattern 'linear_qkv' matches no LoRA"):
        spec.resolve(NAMES)


def test_spec_carries_lora_config_and_seed_into_the_plan():
    lora = LoRAConfig(rank=2, alpha=4.0, b_init="gaussian")
    plan = PeftSpec(lora=lora, seed=7).resolve(NAMES)
    assert plan.lora == lora and plan.seed == 7


def test_spec_accepts_lora_as_a_mapping_with_aliases():
    assert PeftSpec(lora={"r": 2, "lora_alpha": 4}).lora == LoRAConfig(rank=2, alpha=4)


@pytest.mark.parametrize(
    ("key", "pattern", "closest"),
    [
        ("target_modules", "linear_qvk", "linear_qkv"),
        ("fft_modules", "decoder.layers.1.mlp.linear_fc3", None),
        ("exclude_modules", "decoder.layers.9.*", None),
        ("rank_overrides", "linear_fc", "linear_fc1"),
    ],
)
def test_a_pattern_that_matches_nothing_names_the_pattern_and_the_closest_names(
    key, pattern, closest
):
    value = {pattern: 2} if key == "rank_overrides" else [pattern]
    with pytest.raises(ValueError) as info:
        PeftSpec(**{key: value}).resolve(NAMES)
    msg = str(info.value)
    assert f"peft.{key}" in msg and repr(pattern) in msg
    suggested = msg.split("closest names:", 1)[1]
    if closest is not None:
        assert repr(closest) in suggested
    else:  # a dotted pattern is compared with real full names
        assert any(repr(n) in suggested for n in NAMES)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_modules": "linear_qkv"}, r"peft\.target_modules must be a list of strings"),
        ({"fft_modules": [1]}, r"peft\.fft_modules must be a list of strings"),
        ({"exclude_modules": "x"}, r"peft\.exclude_modules must be a list of strings"),
        ({"rank_overrides": {"linear_qkv": 0}}, r"peft\.rank_overrides\['linear_qkv'\]"),
        ({"rank_overrides": {"linear_qkv": 2.0}}, r"peft\.rank_overrides\['linear_qkv'\]"),
        ({"rank_overrides": {"linear_qkv": True}}, r"peft\.rank_overrides\['linear_qkv'\]"),
        ({"lora": {"rank": 0}}, r"lora\.rank"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PeftSpec(**kwargs)


# -- ModuleDecision / HybridPlan --------------------------------------------------------------
def test_module_decision_validation():
    with pytest.raises(ValueError, match=r"mode must be one of \('fft', 'lora', 'frozen'\)"):
        ModuleDecision("full")
    for mode in ("fft", "frozen"):
        with pytest.raises(
            ValueError, match=rf"rank is only meaningful for mode 'lora', not '{mode}'"
        ):
            ModuleDecision(mode, rank=4)
    assert ModuleDecision("lora", 4).rank == 4
    assert ModuleDecision("lora").rank is None


def test_plan_rejects_decisions_that_are_not_module_decisions():
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.mlp\.linear_fc1: decision must be"):
        HybridPlan(modules={name(0, "linear_fc1"): "fft"})


def test_plan_names_by_mode_are_sorted():
    plan = HybridPlan(
        modules={
            name(2, "linear_fc1"): ModuleDecision("fft"),
            name(0, "linear_fc1"): ModuleDecision("fft"),
            name(1, "linear_qkv"): ModuleDecision("lora", 2),
            name(1, "linear_proj"): ModuleDecision("frozen"),
        }
    )
    assert plan.names("fft") == [name(0, "linear_fc1"), name(2, "linear_fc1")]
    assert plan.names("lora") == [name(1, "linear_qkv")]
    assert plan.names("frozen") == [name(1, "linear_proj")]


def test_plan_round_trips_through_to_dict_and_json():
    spec = PeftSpec(
        fft_modules=["decoder.layers.1.mlp.linear_fc1"],
        exclude_modules=["decoder.layers.0.self_attention.linear_proj"],
        rank_overrides={"linear_qkv": 2},
        lora=LoRAConfig(rank=4, alpha=8.0, use_rslora=True, dropout=0.1, b_init="gaussian"),
        seed=3,
    )
    plan = spec.resolve(NAMES)
    plan.modules[name(0, "linear_proj")] = ModuleDecision("frozen")
    d = plan.to_dict()
    assert list(d["modules"]) == sorted(d["modules"])
    assert d["modules"][name(0, "linear_qkv")] == {"mode": "lora", "rank": 2}
    assert d["modules"][name(0, "linear_fc1")] == {"mode": "lora"}
    assert d["modules"][name(1, "linear_fc1")] == {"mode": "fft"}
    again = HybridPlan.from_dict(json.loads(json.dumps(d)))
    assert again == plan
    assert again.to_dict() == d


def test_plan_from_dict_accepts_a_bare_mode_string_and_defaults():
    plan = HybridPlan.from_dict({"modules": {name(0, "linear_fc1"): "fft"}})
    assert plan.modules == {name(0, "linear_fc1"): ModuleDecision("fft")}
    assert plan.lora == LoRAConfig() and plan.seed == 0


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"modules": {}, "rank": 4}, r"unknown plan keys: \['rank'\]"),
        ({"modules": {"a.b": {"mode": "fft", "rank": 2}}}, r"plan module 'a\.b': rank is only"),
        ({"modules": {"a.b": {"mode": "lora", "rnk": 2}}}, r"plan module 'a\.b': .*rnk"),
        ({"modules": {"a.b": "full"}}, r"plan module 'a\.b': mode must be one of"),
        ({"lora": {"rnk": 2}}, r"unknown lora key 'rnk'"),
    ],
)
def test_plan_from_dict_errors(d, match):
    with pytest.raises(ValueError, match=match):
        HybridPlan.from_dict(d)
