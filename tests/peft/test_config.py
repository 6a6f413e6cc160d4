"""LoRAConfig: validation names the offending field, scaling, and the alias-aware ``from_dict``."""

from __future__ import annotations

import math

import pytest

from megatron_hybrid.peft.config import A_INITS, B_INITS, LoRAConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rank", 0),
        ("rank", -2),
        ("rank", 2.0),
        ("rank", True),
        ("alpha", 0),
        ("alpha", -1.0),
        ("alpha", "16"),
        ("dropout", -0.1),
        ("dropout", 1.0),
        ("dropout_position", "middle"),
        ("a_init", "orthogonal"),
        ("b_init", "ones"),
        ("init_std", 0.0),
        ("init_std", -1e-3),
    ],
)
def test_bad_field_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"lora\.{field}\b"):
        LoRAConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), [("dropout", "0.1"), ("init_std", "1e-3")])
def test_non_numeric_float_field_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"lora\.{field}\b"):
        LoRAConfig(**{field: value})


def test_both_inits_zero_is_rejected_because_no_gradient_would_flow():
    with pytest.raises(ValueError, match=r"lora\.a_init and lora\.b_init"):
        LoRAConfig(a_init="zero", b_init="zero")


@pytest.mark.parametrize(
    ("a_init", "b_init"),
    [(a, b) for a in A_INITS for b in B_INITS if (a, b) != ("zero", "zero")],
)
def test_every_other_init_pair_is_accepted(a_init, b_init):
    cfg = LoRAConfig(a_init=a_init, b_init=b_init)
    assert (cfg.a_init, cfg.b_init) == (a_init, b_init)


@pytest.mark.parametrize(("rank", "alpha"), [(1, 1.0), (4, 8.0), (8, 16.0), (16, 8.0), (3, 7.0)])
def test_scaling_is_alpha_over_rank(rank, alpha):
    assert LoRAConfig(rank=rank, alpha=alpha).scaling == pytest.approx(alpha / rank, rel=1e-12)


@pytest.mark.parametrize(("rank", "alpha"), [(1, 1.0), (4, 8.0), (16, 8.0), (3, 7.0)])
def test_rslora_scaling_is_alpha_over_sqrt_rank(rank, alpha):
    cfg = LoRAConfig(rank=rank, alpha=alpha, use_rslora=True)
    assert cfg.scaling == pytest.approx(alpha / math.sqrt(rank), rel=1e-12)


def test_with_rank_keeps_alpha_so_scaling_follows_the_rank():
    cfg = LoRAConfig(rank=8, alpha=16.0, dropout=0.1, b_init="gaussian")
    other = cfg.with_rank(2)
    assert other.rank == 2 and other.alpha == 16.0 and other.scaling == 8.0
    assert (other.dropout, other.b_init) == (0.1, "gaussian")
    assert cfg.rank == 8  # a copy, not an in-place change
    with pytest.raises(ValueError, match=r"lora\.rank"):
        cfg.with_rank(0)


def test_from_dict_canonical_keys():
    d = {"rank": 4, "alpha": 8.0, "dropout": 0.05, "dropout_position": "post", "init_std": 0.01}
    assert LoRAConfig.from_dict(d) == LoRAConfig(
        rank=4, alpha=8.0, dropout=0.05, dropout_position="post", init_std=0.01
    )


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("dim", 4, "rank"),  # NeMo / Megatron-Bridge
        ("r", 4, "rank"),  # HF PEFT
        ("lora_alpha", 32.0, "alpha"),
        ("lora_dropout", 0.2, "dropout"),
    ],
)
def test_from_dict_aliases(key, value, field):
    cfg = LoRAConfig.from_dict({key: value})
    assert getattr(cfg, field) == value
    assert cfg == LoRAConfig(**{field: value})


def test_from_dict_peft_style_mapping():
    cfg = LoRAConfig.from_dict({"r": 16, "lora_alpha": 32, "lora_dropout": 0.1})
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.scaling) == (16, 32, 0.1, 2.0)


def test_from_dict_unknown_key_lists_valid_keys_and_aliases():
    with pytest.raises(ValueError) as info:
        LoRAConfig.from_dict({"rnk": 4})
    msg = str(info.value)
    assert "'rnk'" in msg
    for valid in [*LoRAConfig.__dataclass_fields__, "dim", "r", "lora_alpha", "lora_dropout"]:
        assert valid in msg, valid


def test_from_dict_alias_and_canonical_key_together_is_an_error():
    with pytest.raises(ValueError, match=r"'r' given twice \(as 'rank'\)"):
        LoRAConfig.from_dict({"rank": 4, "r": 8})


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match=r"lora\.rank"):
        LoRAConfig.from_dict({"dim": 0})


def test_from_empty_dict_is_the_default():
    assert LoRAConfig.from_dict({}) == LoRAConfig()
