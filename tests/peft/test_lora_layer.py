"""LoRA wrappers around Megatron column/row-parallel linears at TP=1, against plain torch.

Reference: ``y = x W^T (+ b) + s * (x A^T) B^T`` written with ``@`` on detached copies of the
layer's tensors; gradients come from autograd on that formula. Multi-rank layouts are covered by
``tests/peft/test_lora_tp.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.lora import (
    LoRAColumnParallelLinear,
    LoRAParallelLinear,
    LoRARowParallelLinear,
    _shard_rows,
    parallel_mode_of,
)

IN, OUT, RANK = 12, 20, 4
SEQ, BATCH = 5, 3
LORA = LoRAConfig(rank=RANK, alpha=6.0, b_init="gaussian", init_std=0.3)

pytestmark = pytest.mark.usefixtures("single_rank_runtime")


def _config() -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=IN,
        num_attention_heads=1,
        use_cpu_initialization=True,
        perform_initialization=True,
    )


def _init(w: torch.Tensor) -> torch.Tensor:
    return torch.nn.init.normal_(w, std=0.2)


def make_layer(
    kind: str,
    lora: LoRAConfig = LORA,
    *,
    bias: bool = False,
    skip_bias_add: bool = False,
    gated: bool = False,
) -> LoRAParallelLinear:
    """A wrapped ``column`` (IN -> OUT) or ``row`` (OUT -> IN) linear with a nonzero bias."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if kind == "column":
        base = ColumnParallelLinear(
            IN,
            OUT,
            config=_config(),
            init_method=_init,
            bias=bias,
            gather_output=False,
            skip_bias_add=skip_bias_add,
            tp_group=tp_group,
        )
        cls = LoRAColumnParallelLinear
    else:
        base = RowParallelLinear(
            OUT,
            IN,
            config=_config(),
            init_method=_init,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=skip_bias_add,
            tp_group=tp_group,
        )
        cls = LoRARowParallelLinear
    if bias:
        with torch.no_grad():  # Megatron zeroes biases; a zero bias would hide a misplaced add
            base.bias.normal_()
    return cls(base, lora, name=f"test.{kind}", tp_group=tp_group, gated=gated, seed=0)


def layer_input(layer: LoRAParallelLinear, seed: int = 0) -> torch.Tensor:
    in_features = layer.base_layer.weight.shape[1]
    return torch.randn(SEQ, BATCH, in_features, generator=torch.Generator().manual_seed(seed))


def reference(layer: LoRAParallelLinear, x, *, add_bias: bool = True, dropped_x=None, mask=None):
    """Plain-torch forward on detached copies: returns (out, tensors) with tensors requiring grad."""
    w = layer.base_layer.weight.detach().clone().requires_grad_()
    a = layer.lora_A.detach().clone().requires_grad_()
    b = layer.lora_B.detach().clone().requires_grad_()
    out = x @ w.T
    bias = layer.base_layer.bias
    if bias is not None and add_bias:
        out = out + bias.detach()
    h = x if dropped_x is None else dropped_x
    delta = layer.scaling * ((h @ a.T) @ b.T)
    if mask is not None:
        delta = delta * mask
    return out + delta, (w, a, b)


def reseed(seed: int) -> None:
    """Reset both RNG streams the wrappers use (global, and Megatron's model-parallel tracker)."""
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


# -- construction -----------------------------------------------------------------------------
def test_adapter_shapes_dtype_and_tp_attributes():
    col, row = make_layer("column"), make_layer("row")
    assert col.lora_A.shape == (RANK, IN) and col.lora_B.shape == (OUT, RANK)
    assert row.lora_A.shape == (RANK, OUT) and row.lora_B.shape == (IN, RANK)
    for layer in (col, row):
        assert layer.lora_A.dtype == layer.lora_B.dtype == layer.base_layer.weight.dtype
        assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
        assert layer.weight is layer.base_layer.weight
        assert parallel_mode_of(layer.base_layer) == layer.parallel_mode
        assert not layer.sequence_parallel
    # the sharded adapter carries Megatron's TP attributes like the base weight it follows
    assert col.lora_B.tensor_model_parallel and col.lora_B.partition_dim == 0
    assert not getattr(col.lora_A, "tensor_model_parallel", False)
    assert row.lora_A.tensor_model_parallel and row.lora_A.partition_dim == 1
    assert not getattr(row.lora_B, "tensor_model_parallel", False)


def test_init_is_seeded_by_name_and_seed():
    a1, a2 = make_layer("column"), make_layer("column")
    assert torch.equal(a1.lora_A, a2.lora_A) and torch.equal(a1.lora_B, a2.lora_B)
    other = LoRAColumnParallelLinear(
        a1.base_layer, LORA, name="test.other", tp_group=a1.tp_group, seed=0
    )
    assert not torch.equal(other.lora_A, a1.lora_A)
    reseeded = LoRAColumnParallelLinear(
        a1.base_layer, LORA, name="test.column", tp_group=a1.tp_group, seed=1
    )
    assert not torch.equal(reseeded.lora_A, a1.lora_A)


def test_default_zero_b_makes_the_wrapper_start_equal_to_the_base():
    layer = make_layer("column", LoRAConfig(rank=RANK))
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = layer_input(layer)
    torch.testing.assert_close(layer(x)[0], layer.base_layer(x)[0], rtol=0, atol=0)


def test_rank_larger_than_min_in_out_raises_naming_the_module():
    with pytest.raises(ValueError, match=r"test\.column: LoRA rank 13 exceeds min\(in, out\)"):
        make_layer("column", LoRAConfig(rank=13))


# -- forward and backward against the plain formula ------------------------------------------
@pytest.mark.parametrize("kind", ["column", "row"])
def test_forward_matches_the_plain_formula(kind):
    layer = make_layer(kind)
    x = layer_input(layer)
    out, bias = layer(x)
    expected, _ = reference(layer, x)
    assert bias is None
    assert out.shape == (SEQ, BATCH, layer.out_features_full)
    torch.testing.assert_close(out, expected)
    # the adapter contributes: the output is not the base output
    assert not torch.allclose(out, layer.base_layer(x)[0], atol=1e-3)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_gradients_match_autograd_on_the_plain_formula(kind):
    layer = make_layer(kind, bias=True)
    x = layer_input(layer).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(SEQ, BATCH, layer.out_features_full, generator=torch.Generator().manual_seed(1))
    out, _ = layer(x)
    (out * g).sum().backward()
    expected, (w, a, b) = reference(layer, x_ref)
    (expected * g).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.grad, b.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.base_layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.base_layer.bias.grad, g.sum((0, 1)))


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("skip_bias_add", [False, True])
def test_output_bias_contract_matches_the_base_layer(kind, skip_bias_add):
    layer = make_layer(kind, bias=True, skip_bias_add=skip_bias_add)
    x = layer_input(layer)
    out, bias = layer(x)
    _, base_bias = layer.base_layer(x)
    expected, _ = reference(layer, x, add_bias=not skip_bias_add)
    torch.testing.assert_close(out, expected)
    if skip_bias_add:  # bias handed back, not added, exactly as the base does
        assert bias is layer.base_layer.bias and base_bias is layer.base_layer.bias
    else:
        assert bias is None and base_bias is None


@pytest.mark.parametrize("kind", ["column", "row"])
def test_delta_weight_equals_the_forward_difference(kind):
    layer = make_layer(kind)
    x = layer_input(layer)
    delta = layer(x)[0] - layer.base_layer(x)[0]
    torch.testing.assert_close(delta, x @ layer.delta_weight().T)
    torch.testing.assert_close(layer.delta_weight(), layer.scaling * layer.lora_B @ layer.lora_A)


@pytest.mark.parametrize("kind", ["column", "row"])
def test_merge_and_unmerge(kind):
    layer = make_layer(kind, bias=True)
    x = layer_input(layer)
    w0 = layer.base_layer.weight.detach().clone()
    unmerged = layer(x)[0].detach()
    layer.merge()
    assert layer.merged and "merged" in layer.extra_repr()
    torch.testing.assert_close(layer(x)[0], unmerged)
    torch.testing.assert_close(layer.base_layer.weight, w0 + layer.delta_weight())
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x)[0], unmerged)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


# -- dropout ----------------------------------------------------------------------------------
# Which RNG stream masks the adapter path: sharded tensors use Megatron's model-parallel tracker.
_TRACKER_STREAM = {("column", "pre"): False, ("column", "post"): True, ("row", "pre"): True,
                   ("row", "post"): False}  # fmt: skip


@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("position", ["pre", "post"])
def test_dropout_is_off_in_eval_and_a_reproducible_mask_in_train(kind, position):
    p = 0.5
    layer = make_layer(
        kind, LoRAConfig(**{**vars(LORA), "dropout": p, "dropout_position": position})
    )
    x = layer_input(layer)
    plain, _ = reference(layer, x)

    layer.eval()
    torch.testing.assert_close(layer(x)[0], plain)

    layer.train()
    reseed(5)
    first = layer(x)[0]
    reseed(5)
    again = layer(x)[0]
    fresh = layer(x)[0]
    assert torch.equal(first, again)
    assert not torch.allclose(first, plain, atol=1e-3)
    assert not torch.allclose(first, fresh, atol=1e-3)

    # Replay the mask from the same stream and apply it where the position says.
    reseed(5)
    shape = x.shape if position == "pre" else first.shape
    if _TRACKER_STREAM[(kind, position)]:
        with tensor_parallel.get_cuda_rng_tracker().fork():
            mask = F.dropout(torch.ones(shape), p, training=True)
    else:
        mask = F.dropout(torch.ones(shape), p, training=True)
    if position == "pre":
        expected, _ = reference(layer, x, dropped_x=x * mask)
    else:
        expected, _ = reference(layer, x, mask=mask)
    torch.testing.assert_close(first, expected)


def test_no_dropout_module_when_p_is_zero():
    assert make_layer("column").dropout is None


# -- layout helpers and repr ------------------------------------------------------------------
def test_shard_rows_plain_and_gated_layouts_at_tp2():
    full = torch.arange(8.0).unsqueeze(1)  # rows 0..3 = gate, 4..7 = up when gated
    assert _shard_rows(full, 0, 2, gated=False).flatten().tolist() == [0, 1, 2, 3]
    assert _shard_rows(full, 1, 2, gated=False).flatten().tolist() == [4, 5, 6, 7]
    assert _shard_rows(full, 0, 2, gated=True).flatten().tolist() == [0, 1, 4, 5]
    assert _shard_rows(full, 1, 2, gated=True).flatten().tolist() == [2, 3, 6, 7]
    for gated in (False, True):
        assert torch.equal(_shard_rows(full, 0, 1, gated=gated), full)  # TP=1 is the identity


def test_gated_wrapper_at_tp1_holds_full_b_and_matches_the_formula():
    layer = make_layer("column", gated=True)
    plain = make_layer("column")
    assert layer.gated and "gated" in layer.extra_repr()
    assert torch.equal(layer.lora_B, plain.lora_B)  # [gate; up] of one rank is the full matrix
    x = layer_input(layer)
    torch.testing.assert_close(layer(x)[0], reference(layer, x)[0])


def test_extra_repr_names_module_mode_rank_scaling_and_tp():
    col, row = make_layer("column"), make_layer("row")
    assert "test.column" in col.extra_repr() and "mode=column" in col.extra_repr()
    assert "mode=row" in row.extra_repr()
    for layer in (col, row):
        text = repr(layer)
        assert f"r={RANK}" in text and "TP=1" in text and "scaling=1.5" in text
        assert "sequence_parallel=False" in text
