"""LoRA around Transformer Engine layers (GPU only): same results as around the local layers.

Skipped cleanly without CUDA or Transformer Engine (the conftest skips ``gpu``-marked tests without
CUDA; the import guard below skips when TE does not import).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


def _te_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TE raises RuntimeError
        return False
    return True


@pytest.fixture
def te_runtime():
    if not _te_available():
        pytest.skip("Transformer Engine does not import")
    from megatron.core import parallel_state

    from megatron_hybrid.runtime.distributed import ParallelConfig, initialize_runtime

    initialize_runtime(ParallelConfig(), seed=0)
    yield
    parallel_state.destroy_model_parallel()


@pytest.mark.parametrize("kind", ["column", "row", "layernorm_column"])
def test_lora_around_te_layer_matches_plain_formula(te_runtime, kind):
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_hybrid.peft.config import LoRAConfig
    from megatron_hybrid.peft.lora import LoRAColumnParallelLinear, LoRARowParallelLinear

    cfg = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, params_dtype=torch.float32
    )
    init = torch.nn.init.normal_
    common = dict(config=cfg, init_method=init, bias=False, skip_bias_add=True, is_expert=False)
    if kind == "row":
        base = TERowParallelLinear(64, 64, input_is_parallel=True, **common)
        wrapper = LoRARowParallelLinear
    elif kind == "column":
        base = TEColumnParallelLinear(
            64, 96, gather_output=False, skip_weight_param_allocation=False, **common
        )
        wrapper = LoRAColumnParallelLinear
    else:
        base = TELayerNormColumnParallelLinear(
            64, 96, gather_output=False, skip_weight_param_allocation=False, **common
        )
        wrapper = LoRAColumnParallelLinear
    base.weight.requires_grad_(False)
    lora = wrapper(
        base, LoRAConfig(rank=4, alpha=8, b_init="gaussian"), name=f"te.{kind}", tp_group=None
    )
    x = torch.randn(8, 2, 64, device="cuda")
    out, _ = lora(x)
    inp = x
    if kind == "layernorm_column":
        inp = torch.nn.functional.layer_norm(
            x, (64,), base.layer_norm_weight, base.layer_norm_bias, cfg.layernorm_epsilon
        )
    want = inp @ base.weight.T + lora.scaling * (inp @ lora.lora_A.T) @ lora.lora_B.T
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    lora.merge()
    merged, _ = lora(x)
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)
