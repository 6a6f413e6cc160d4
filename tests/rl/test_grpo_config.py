"""``grpo:`` config sections from YAML / key=value: losses switch with their normalisation."""

from __future__ import annotations

import pytest

from megatron_hybrid.config import load_config
from megatron_hybrid.demo.config import DemoConfig
from megatron_hybrid.rl.grpo import GRPOConfig


def _loss(*overrides: str):
    return load_config(DemoConfig, None, [f"grpo.grpo.{o}" for o in overrides]).grpo.grpo.loss


def test_naming_a_loss_rederives_its_normalisation():
    assert _loss().normalization == "token"
    assert _loss("loss.loss=gspo").normalization == "sequence"
    dr = _loss("loss.loss=dr_grpo")
    assert (dr.normalization, dr.max_response_length) == ("constant", 6)  # demo's max_new_tokens
    dr = _loss("loss.loss=dr_grpo", "sampling.max_new_tokens=9")
    assert dr.max_response_length == 9
    assert _loss("loss.loss=gspo", "loss.normalization=token").normalization == "token"
    assert _loss("loss.normalization=sequence").loss == "grpo"
    kept = _loss("loss.eps_high=0.28")  # other keys keep the base's values
    assert (kept.loss, kept.normalization, kept.eps_high) == ("grpo", "token", 0.28)


def test_from_dict_over_a_dr_grpo_base_switches_back():
    base = GRPOConfig.from_dict({"loss": {"loss": "dr_grpo"}})
    assert base.loss.max_response_length == base.sampling.max_new_tokens
    back = GRPOConfig.from_dict({"loss": {"loss": "grpo"}}, base=base)
    assert (back.loss.normalization, back.loss.max_response_length) == ("token", None)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["loss.loss=dr_grpo", "loss.normalization=token"], "requires normalization='constant'"),
        (["loss.foo=1"], r"grpo.grpo: unknown config key 'loss.foo'"),
        (["loss.loss=ppo"], r"unknown loss 'ppo'; valid names"),
        (["loss=3"], r"loss: expected a mapping"),
    ],
)
def test_bad_loss_sections_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=match):
        _loss(*overrides)
