"""ModelConfig validation: every bad value is named by its dotted key."""

from __future__ import annotations

from dataclasses import replace

import pytest


def test_model_config_checks_rope_base_and_fp8_naming_the_key():
    """A float RoPE base (HF ``rope_theta: 500000.0``) is accepted; a bad fp8 recipe is named
    (before, any string passed until Transformer Engine failed)."""
    from megatron_hybrid.config import load_config
    from megatron_hybrid.models.config import ModelConfig
    from megatron_hybrid.train.quickstart import QuickstartConfig

    assert (
        load_config(QuickstartConfig, overrides=["model.rotary_base=5e5"]).model.rotary_base == 5e5
    )
    with pytest.raises(ValueError, match=r"model.fp8 must be e4m3, hybrid or null, got 'bogus'"):
        replace(ModelConfig(), transformer_impl="transformer_engine", fp8="bogus")
    with pytest.raises(ValueError, match=r"model.rotary_base must be a number > 0"):
        replace(ModelConfig(), rotary_base=0)
