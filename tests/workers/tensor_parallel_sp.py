"""Tensor-parallel collectives and sequence-parallel linears on 2 CPU ranks.

Run under torchrun with 2 ranks by ``tests/runtime/test_cpu_compat.py``::

    torchrun --nproc_per_node 2 tensor_parallel_sp.py --part mappings|layers

``mappings``: the gather / reduce-scatter helpers of ``tensor_parallel.mappings`` (output buffers on
``torch.cuda.current_device()``) against their definitions. ``layers``: a sequence-parallel
``ColumnParallelLinear`` and ``RowParallelLinear`` (reduce-scatter buffer of the column linear's
backward on ``current_device()``) against a dense single-rank computation. Exits nonzero on any
mismatch.
"""

from __future__ import annotations

import argparse

import torch


def check_mappings(rank: int) -> None:
    from megatron.core.tensor_parallel import mappings

    full = torch.arange(4 * 2 * 6, dtype=torch.float32).reshape(4, 2, 6)
    seq_shard = full.chunk(2, dim=0)[rank]
    hidden_shard = full.chunk(2, dim=-1)[rank]
    torch.testing.assert_close(mappings.gather_from_sequence_parallel_region(seq_shard), full)
    torch.testing.assert_close(
        mappings.reduce_scatter_to_sequence_parallel_region(full), 2 * seq_shard
    )
    torch.testing.assert_close(
        mappings.all_gather_last_dim_from_tensor_parallel_region(hidden_shard), full
    )
    torch.testing.assert_close(
        mappings.reduce_scatter_last_dim_to_tensor_parallel_region(full), 2 * hidden_shard
    )


def check_layers(rank: int) -> None:
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    config = ModelParallelConfig(
        tensor_model_parallel_size=2,
        sequence_parallel=True,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
    )
    gen = torch.Generator().manual_seed(0)
    seq, batch, hidden, inner = 4, 2, 8, 6
    w_in = torch.randn(inner, hidden, generator=gen)
    w_out = torch.randn(hidden, inner, generator=gen)
    x = torch.randn(seq, batch, hidden, generator=gen)
    target = torch.randn(seq, batch, hidden, generator=gen)

    # Dense reference: y = (x W_in^T) W_out^T, loss = sum(y * target).
    x_ref = x.clone().requires_grad_()
    w_in_ref = w_in.clone().requires_grad_()
    w_out_ref = w_out.clone().requires_grad_()
    ((x_ref @ w_in_ref.T @ w_out_ref.T) * target).sum().backward()

    init = torch.nn.init.zeros_
    column = ColumnParallelLinear(
        hidden, inner, config=config, init_method=init, bias=False, gather_output=False
    )
    row = RowParallelLinear(
        inner,
        hidden,
        config=config,
        init_method=init,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=True,
    )
    with torch.no_grad():
        column.weight.copy_(w_in.chunk(2, dim=0)[rank])
        row.weight.copy_(w_out.chunk(2, dim=1)[rank])
    x_local = x.chunk(2, dim=0)[rank].clone().requires_grad_()
    hidden_states, _ = column(x_local)  # all-gathers the sequence: [seq, batch, inner / 2]
    y_local, _ = row(hidden_states)  # reduce-scatters the sequence: [seq / 2, batch, hidden]
    (y_local * target.chunk(2, dim=0)[rank]).sum().backward()

    torch.testing.assert_close(x_local.grad, x_ref.grad.chunk(2, dim=0)[rank])
    torch.testing.assert_close(column.weight.grad, w_in_ref.grad.chunk(2, dim=0)[rank])
    torch.testing.assert_close(row.weight.grad, w_out_ref.grad.chunk(2, dim=1)[rank])


def main() -> None:
    from megatron.core import parallel_state

    from megatron_hybrid.runtime.distributed import (
        ParallelConfig,
        destroy_runtime,
        initialize_runtime,
    )

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=("mappings", "layers"), required=True)
    args = parser.parse_args()
    initialize_runtime(
        ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), seed=1234
    )
    rank = parallel_state.get_tensor_model_parallel_rank()
    {"mappings": check_mappings, "layers": check_layers}[args.part](rank)
    print(f"rank {rank}: {args.part} ok", flush=True)
    destroy_runtime()


if __name__ == "__main__":
    main()
