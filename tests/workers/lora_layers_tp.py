"""Worker: every LoRA-wrapped layer type at TP=2 equals the same layer at TP=1 (dense reference).

Run on 2 ranks. For each case (column / gated column / row base, with and without sequence
parallelism) both a TP=1 layer (on a one-rank group) and a TP=2 layer are built from the same full
weights; the adapters come from the same seed (their init is layout-independent). Output, input
gradient, adapter gradients and (for a trainable base) weight gradients are compared shard by shard.
Then the TP=2 layer is merged and must give the same output as unmerged.

The ``layernorm_column`` cases wrap a stand-in for Transformer Engine's fused LayerNorm + column
linear (``TELayerNormColumnParallelLinear``; TE is not installed on CPU machines): it follows the
return contract of Megatron's TE wrapper (``((out, ln_out), None)``, or ``(out, bias, ln_out)`` when
it returns the bias) and TE's gradient rule for a returned, non-gathered ``ln_out`` (added after the
layer's own reduce-scatter / all-reduce). The adapter must read ``ln(x)``, and a merged adapter
must get the plain ``(out, bias)`` back.

Prints ``OK <case>`` per case; any mismatch raises (nonzero exit).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_hybrid.peft import lora as lora_module
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.lora import LoRAColumnParallelLinear, LoRARowParallelLinear, _shard_rows
from megatron_hybrid.runtime.distributed import ParallelConfig, initialize_runtime

S, B, IN, OUT, R = 8, 2, 16, 24, 4
KINDS = ("column", "gated", "row", "layernorm_column")
TOL = dict(rtol=1e-5, atol=1e-5)


def _config(sp: bool, tp: int) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sp and tp > 1,
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
    )


class FakeTELayerNormColumnParallelLinear(torch.nn.Module):
    """RMSNorm then a column-parallel linear, with the call contract of Megatron's TE wrapper.

    ``return_layernorm_output`` returns this rank's ``ln(x)`` (``[s/t, b, in]`` under sequence
    parallelism); its gradient joins the layer's own input gradient after the sequence
    reduce-scatter, as in TE. The gathered variant is refused: LoRA must not rely on it.
    """

    def __init__(self, cfg, group, w, b, ln_w, te_return_bias: bool):
        super().__init__()
        self.config, self.tp_group = cfg, group
        self.weight = torch.nn.Parameter(w.clone())
        self.bias = torch.nn.Parameter(b.clone()) if b is not None else None
        self.layer_norm_weight = torch.nn.Parameter(ln_w.clone())
        self.layer_norm_weight.sequence_parallel = cfg.sequence_parallel
        self.te_return_bias = te_return_bias
        self.return_layernorm_output = False
        self.return_layernorm_output_gathered = False

    def forward(self, x):
        if self.return_layernorm_output_gathered:
            raise AssertionError("LoRA asked TE for the sequence-gathered layernorm output")
        ln = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * self.layer_norm_weight
        if self.config.sequence_parallel:
            total = gather_from_sequence_parallel_region(
                ln, tensor_parallel_output_grad=True, group=self.tp_group
            )
        else:
            total = copy_to_tensor_model_parallel_region(ln, group=self.tp_group)
        out = torch.nn.functional.linear(total, self.weight)
        bias = self.bias
        if bias is not None and not self.te_return_bias:
            out, bias = out + bias, None
        if self.te_return_bias:
            return (out, bias, ln) if self.return_layernorm_output else (out, bias)
        return ((out, ln) if self.return_layernorm_output else out), None


def _layernorm(x, ln_w):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * ln_w


def _build(kind: str, sp: bool, group, w_full, b_full, bias: bool, skip_bias_add: bool):
    tp, rank = group.size(), group.rank()
    cfg = _config(sp, tp)
    init = torch.nn.init.zeros_
    if kind == "layernorm_column":
        ln_w = 1 + 0.1 * torch.arange(IN, dtype=torch.float32) / IN
        base = FakeTELayerNormColumnParallelLinear(
            cfg,
            group,
            _shard_rows(w_full, rank, tp, False),
            _shard_rows(b_full.unsqueeze(1), rank, tp, False).squeeze(1) if bias else None,
            ln_w,
            te_return_bias=skip_bias_add,
        )
    elif kind == "row":
        base = RowParallelLinear(
            IN,
            OUT,
            config=cfg,
            init_method=init,
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=skip_bias_add,
            tp_group=group,
        )
        w = w_full.chunk(tp, dim=1)[rank]
        b = b_full
    else:
        base = ColumnParallelLinear(
            IN,
            OUT,
            config=cfg,
            init_method=init,
            bias=bias,
            gather_output=False,
            skip_bias_add=skip_bias_add,
            tp_group=group,
        )
        w = _shard_rows(w_full, rank, tp, kind == "gated")
        b = _shard_rows(b_full.unsqueeze(1), rank, tp, kind == "gated").squeeze(1)
    if kind != "layernorm_column":
        with torch.no_grad():
            base.weight.copy_(w)
            if bias:
                base.bias.copy_(b)
    lora = LoRAConfig(rank=R, alpha=8.0, a_init="kaiming", b_init="gaussian")
    cls = LoRARowParallelLinear if kind == "row" else LoRAColumnParallelLinear
    return cls(
        base,
        lora,
        name=f"decoder.layers.0.test.{kind}",
        tp_group=group,
        gated=kind == "gated",
        seed=7,
    )


def _allreduce_sp_grads(module, group) -> None:
    """What Megatron's finalize_model_grads does for sequence-parallel-tagged parameters."""
    for p in module.parameters():
        if p.grad is not None and getattr(p, "sequence_parallel", False) and group.size() > 1:
            dist.all_reduce(p.grad, group=group)


def _run(module, x, dy, skip_bias_add):
    x = x.clone().requires_grad_(True)
    out, bias = module(x)
    if skip_bias_add and bias is not None:
        out = out + bias
    (out * dy).sum().backward()
    return out.detach(), x.grad


def run_case(kind: str, sp: bool, train_base: bool, bias: bool, skip_bias_add: bool) -> None:
    tp_group = parallel_state.get_tensor_model_parallel_group()
    solo = dist.new_group([dist.get_rank()], backend="gloo")
    tp, rank = tp_group.size(), tp_group.rank()
    # Same data on every rank (never seed from hash(): it is randomised per process).
    g = torch.Generator().manual_seed(1000 + 100 * KINDS.index(kind) + 10 * sp + train_base)
    w_full = torch.randn(OUT, IN, generator=g)
    b_full = torch.randn(OUT, generator=g)
    x_full = torch.randn(S, B, IN, generator=g)
    dy_full = torch.randn(S, B, OUT, generator=g)

    ref = _build(kind, sp, solo, w_full, b_full, bias, skip_bias_add)
    par = _build(kind, sp, tp_group, w_full, b_full, bias, skip_bias_add)
    for m in (ref, par):
        for p in m.base_layer.parameters():
            p.requires_grad_(train_base)

    y_ref, dx_ref = _run(ref, x_full, dy_full, skip_bias_add)
    if kind == "layernorm_column":  # the TP=1 layer against the formula: the adapter reads ln(x)
        h = _layernorm(x_full, ref.base_layer.layer_norm_weight.detach())
        want = h @ w_full.T + ref.scaling * (h @ ref.lora_A.detach().T) @ ref.lora_B.detach().T
        if bias:
            want = want + b_full
        if not torch.allclose(y_ref, want, **TOL):
            raise AssertionError(f"{kind}: TP=1 output is not ln(x) W^T + s ln(x) A^T B^T")
        base = ref.base_layer
        if base.return_layernorm_output or base.return_layernorm_output_gathered:
            raise AssertionError(f"{kind}: the TE layer's layernorm-output flags were left set")

    # Inputs and upstream grads as this rank sees them.
    if kind == "row":
        x = x_full.chunk(tp, dim=2)[rank]
        dy = dy_full.chunk(tp, dim=0)[rank] if sp else dy_full
    else:
        x = x_full.chunk(tp, dim=0)[rank] if sp else x_full
        dy = _shard_rows(dy_full.permute(2, 0, 1), rank, tp, kind == "gated").permute(1, 2, 0)
    y, dx = _run(par, x, dy, skip_bias_add)
    _allreduce_sp_grads(par, tp_group)

    case = f"{kind} sp={sp} train_base={train_base} bias={bias} skip_bias_add={skip_bias_add}"

    def check(what, got, want):
        if not torch.allclose(got, want, **TOL):
            err = (got - want).abs().max().item()
            raise AssertionError(
                f"{case}: {what} differs from TP=1 reference (max abs err {err:.3g})"
            )

    # Output
    if kind == "row":
        check("output", y, y_ref.chunk(tp, dim=0)[rank] if sp else y_ref)
        check("input grad", dx, dx_ref.chunk(tp, dim=2)[rank])
        check("lora_A grad", par.lora_A.grad, ref.lora_A.grad.chunk(tp, dim=1)[rank])
        check("lora_B grad", par.lora_B.grad, ref.lora_B.grad)
        if train_base:
            check(
                "weight grad",
                par.base_layer.weight.grad,
                ref.base_layer.weight.grad.chunk(tp, dim=1)[rank],
            )
    else:
        gated = kind == "gated"
        check("output", y, _shard_rows(y_ref.permute(2, 0, 1), rank, tp, gated).permute(1, 2, 0))
        check("input grad", dx, dx_ref.chunk(tp, dim=0)[rank] if sp else dx_ref)
        check("lora_A grad", par.lora_A.grad, ref.lora_A.grad)
        check("lora_B grad", par.lora_B.grad, _shard_rows(ref.lora_B.grad, rank, tp, gated))
        if train_base:
            check(
                "weight grad",
                par.base_layer.weight.grad,
                _shard_rows(ref.base_layer.weight.grad, rank, tp, gated),
            )
    # Adapters were initialised identically (layout-independent init), B nonzero.
    if par.lora_B.abs().sum() == 0:
        raise AssertionError(f"{case}: B is zero; the test would be trivial")

    # Merge at TP=2: same output as unmerged, different weights from the base.
    with torch.no_grad():
        w_before = par.base_layer.weight.clone()
        par.merge()
        y_merged, _ = par(x.clone())
        if skip_bias_add and par.base_layer.bias is not None:
            y_merged = y_merged + par.base_layer.bias
        check("merged output", y_merged, y)
        if torch.allclose(par.base_layer.weight, w_before):
            raise AssertionError(f"{case}: merge did not change the weight")
        par.unmerge()
        check("unmerged weight", par.base_layer.weight, w_before)
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"OK {case}", flush=True)


def main() -> int:
    initialize_runtime(ParallelConfig(tensor_model_parallel_size=2), seed=3)
    lora_module._TE_LN = (FakeTELayerNormColumnParallelLinear,)
    for kind in KINDS:
        for sp in (False, True):
            run_case(kind, sp, train_base=False, bias=False, skip_bias_add=False)
        run_case(kind, False, train_base=True, bias=True, skip_bias_add=False)
        run_case(kind, True, train_base=True, bias=True, skip_bias_add=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
