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
    x = torch.randn(8, 2, 64, device="cuda", requires_grad=True)
    out, _ = lora(x)
    dy = torch.randn_like(out)
    (out * dy).sum().backward()
    got_dx, got_da = x.grad.clone(), lora.lora_A.grad.clone()

    # The same formula in plain torch ops, with its own autograd.
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref = lora.lora_A.detach().clone().requires_grad_(True)
    inp = x_ref
    if kind == "layernorm_column":
        inp = torch.nn.functional.layer_norm(
            x_ref,
            (64,),
            base.layer_norm_weight.detach(),
            base.layer_norm_bias.detach(),
            cfg.layernorm_epsilon,
        )
    w, b_mat = base.weight.detach(), lora.lora_B.detach()
    want = inp @ w.T + lora.scaling * (inp @ a_ref.T) @ b_mat.T
    (want * dy).sum().backward()
    torch.testing.assert_close(out.detach(), want.detach(), rtol=1e-4, atol=1e-4)
    # The input gradient includes the adapter's path (through ln(x) for the fused layer).
    torch.testing.assert_close(got_dx, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_da, a_ref.grad, rtol=1e-4, atol=1e-4)
    # A merged adapter gets the base's plain (out, bias) back, after a forward with adapters on.
    lora.merge()
    with torch.no_grad():
        merged, _ = lora(x)
    assert torch.is_tensor(merged)
    torch.testing.assert_close(merged, want.detach(), rtol=1e-4, atol=1e-4)
