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


def test_dr_grpo_does_not_divide_by_the_group_std():
    # Dr.GRPO (arXiv 2503.20783) drops both the length and the std normalisation.
    def cfg(*o):
        return load_config(DemoConfig, None, [f"grpo.grpo.{x}" for x in o]).grpo.grpo

    assert cfg().scale_advantages is True
    assert cfg("loss.loss=gspo").scale_advantages is True
    assert cfg("loss.loss=dr_grpo").scale_advantages is False
    assert cfg("loss.loss=dr_grpo", "scale_advantages=false").scale_advantages is False
    assert cfg("scale_advantages=false").scale_advantages is False  # plain GRPO without the std
    with pytest.raises(
        ValueError, match=r"grpo.scale_advantages=true contradicts loss.loss=dr_grpo"
    ):
        cfg("loss.loss=dr_grpo", "scale_advantages=true")
    with pytest.raises(ValueError, match=r"grpo.scale_advantages must be true, false or null"):
        cfg("scale_advantages=2")


def test_from_dict_rederives_the_scale_and_the_constant_normaliser():
    dr = GRPOConfig.from_dict({"loss": {"loss": "dr_grpo"}})
    assert dr.scale_advantages is False
    back = GRPOConfig.from_dict({"loss": {"loss": "grpo"}}, base=dr)
    assert back.scale_advantages is True  # the loss changed and d does not name the scale
    kept = GRPOConfig.from_dict({"group_size": 4}, base=dr)
    assert (kept.scale_advantages, kept.loss.loss) == (False, "dr_grpo")
    # A normaliser taken from the sampler follows a new max_new_tokens ...
    longer = GRPOConfig.from_dict({"sampling": {"max_new_tokens": 32}}, base=dr)
    assert longer.loss.max_response_length == 32
    # ... one set explicitly stays.
    fixed = GRPOConfig.from_dict({"loss": {"loss": "dr_grpo", "max_response_length": 100}})
    again = GRPOConfig.from_dict({"sampling": {"max_new_tokens": 32}}, base=fixed)
    assert again.loss.max_response_length == 100


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


def test_greedy_rollouts_are_refused():
    with pytest.raises(ValueError, match=r"grpo.sampling.temperature=0 .* every advantage is 0"):
        load_config(DemoConfig, None, ["grpo.grpo.sampling.temperature=0"])
    assert GRPOConfig(sampling={"temperature": 0.5}).sampling.temperature == 0.5
