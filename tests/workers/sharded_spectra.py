"""Worker: :func:`sharded_spectral_stats` on TP shards equals ``svdvals`` of the full matrix.

Run on 4 ranks by ``tests/scoring/test_sharded.py``::

    torchrun --nproc_per_node 4 sharded_spectra.py --tp 4 2

For each TP size (TP=2 runs as two TP groups, DP=2) every rank builds the same full float32
matrices from fixed seeds, slices its shard (column: row chunks; gated: ``[gate_i; up_i]``; row:
column chunks; replicated: the full matrix) and checks, for both solvers:

* singular values against ``torch.linalg.svdvals`` of the full matrix (exact: rel 1e-4;
  randomized: rel 1e-2 on decaying spectra), ||G||_F^2 and the ``residual`` score;
* the same stats, bit for bit, on every rank of the TP group;
* communication: only all-reduces (an all-gather raises), their bytes as reported by
  :class:`CommStats`, and below ``gather_bytes`` for the tall/wide matrices where ``d * q`` is
  far below ``out * in``.

Prints ``OK tp=<t> <case>`` per case; any mismatch raises (nonzero exit).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime
from megatron_hybrid.scoring.sharded import sharded_spectral_stats
from megatron_hybrid.scoring.spectra import get_score_function

K = 4
SEEDS = {"gaussian": 101, "decaying": 202, "low_rank": 303, "tall": 404, "wide": 505}
# The comm check needs d * q * (iters + 1) * 8 well below out * in * 4: d = 32 and out * in = 16384.
COMM_CASES = {("tall", "column"), ("tall", "gated"), ("wide", "row")}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _decaying(rows: int, cols: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    n = min(rows, cols)
    U = torch.linalg.qr(torch.randn(rows, n, generator=_gen(seed), dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(cols, n, generator=_gen(seed + 1), dtype=torch.float64)).Q
    return U @ torch.diag(decay ** torch.arange(n, dtype=torch.float64)) @ V.mT


def full_matrix(name: str) -> torch.Tensor:
    """The full float32 ``out x in`` matrix of case ``name`` (identical on every rank)."""
    seed = SEEDS[name]
    if name == "gaussian":
        full = torch.randn(48, 40, generator=_gen(seed), dtype=torch.float64)
    elif name == "decaying":
        full = _decaying(48, 40, seed)
    elif name == "low_rank":  # rank 3 < K + oversample
        a = torch.randn(48, 3, generator=_gen(seed), dtype=torch.float64)
        full = a @ torch.randn(3, 40, generator=_gen(seed + 1), dtype=torch.float64)
    elif name == "tall":
        full = _decaying(512, 32, seed)
    elif name == "wide":
        full = _decaying(32, 512, seed)
    else:
        raise KeyError(name)
    return full.float()


def shard_of(full: torch.Tensor, mode: str, rank: int, size: int) -> torch.Tensor:
    if mode == "replicated":
        return full.clone()
    if mode == "row":
        return full.chunk(size, dim=1)[rank].contiguous()
    if mode == "gated":
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    return full.chunk(size, dim=0)[rank].contiguous()


@contextlib.contextmanager
def recorded_all_reduces():
    """Sizes of the tensors passed to ``dist.all_reduce``; any all-gather raises."""
    sizes: list[int] = []
    saved = {
        name: getattr(dist, name)
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object")
    }

    def all_reduce(tensor, *args, **kwargs):
        sizes.append(tensor.numel() * tensor.element_size())
        return saved["all_reduce"](tensor, *args, **kwargs)

    def no_gather(*args, **kwargs):
        raise AssertionError("sharded_spectral_stats must not all-gather")

    dist.all_reduce = all_reduce
    for name in ("all_gather", "all_gather_into_tensor", "all_gather_object"):
        setattr(dist, name, no_gather)
    try:
        yield sizes
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def check_case(tp: int, group, name: str, mode: str, solver: str) -> None:
    tp_rank = dist.get_rank(group)
    full = full_matrix(name)
    shard = shard_of(full, mode, tp_rank, tp)
    with recorded_all_reduces() as sizes:
        stats, comm = sharded_spectral_stats(
            shard,
            "column" if mode == "gated" else mode,
            group,
            K,
            solver=solver,
            seed=7,
        )
    case = f"{name} {mode} {solver}"

    ref = torch.linalg.svdvals(full.double())
    expected = torch.cat([ref[:K], ref.new_zeros(max(0, K - ref.numel()))])
    rtol = 1e-4 if solver == "exact" else 1e-2
    # Beyond the rank of G: sqrt of round-off-sized eigenvalues, ~sqrt(eps64) * s_1.
    torch.testing.assert_close(
        stats.top_singular_values, expected, rtol=rtol, atol=1e-6 * ref[0].item(), msg=case
    )
    frob = full.double().square().sum().item()
    assert abs(stats.frobenius_sq - frob) <= 1e-10 * frob, (case, stats.frobenius_sq, frob)
    resid = ref[K:].square().sum().item()
    got = get_score_function("residual")(stats)
    assert abs(got - resid) <= 1e-3 * resid + 1e-9 * frob, (case, got, resid)

    # Every rank of the TP group must hold the same stats (the selection depends on them).
    mine = torch.cat([stats.top_singular_values, torch.tensor([stats.frobenius_sq])])
    everyone = [torch.empty_like(mine) for _ in range(tp)]
    dist.all_gather(everyone, mine, group=group)
    assert all(torch.equal(mine, other) for other in everyone), (case, everyone)

    assert comm.all_reduce_bytes == sum(sizes), (case, comm, sizes)
    assert comm.all_reduce_calls == len(sizes), (case, comm, sizes)
    if mode == "replicated":
        assert comm.all_reduce_bytes == 0 and comm.gather_bytes == full.numel() * 4, (case, comm)
    else:
        assert comm.gather_bytes == full.numel() * full.element_size(), (case, comm)
        assert comm.all_reduce_calls == (1 if solver == "exact" else 6), (case, comm)
    if (name, mode) in COMM_CASES:
        assert comm.all_reduce_bytes < comm.gather_bytes, (case, comm)
    if dist.get_rank() == 0:
        print(f"OK tp={tp} {case} comm_ratio={comm.ratio:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, nargs="+", required=True, help="TP sizes to run")
    args = parser.parse_args()

    for tp in args.tp:
        initialize_runtime(ParallelConfig(tensor_model_parallel_size=tp), seed=1234)
        group = parallel_state.get_tensor_model_parallel_group()
        assert dist.get_world_size(group) == tp
        for name in ("gaussian", "decaying", "low_rank", "tall", "wide"):
            for mode in ("column", "gated", "row", "replicated"):
                for solver in ("exact", "randomized"):
                    if solver == "randomized" and name == "gaussian":
                        continue  # a flat spectrum: subspace iteration is not within 1e-2
                    check_case(tp, group, name, mode, solver)
    destroy_runtime()


if __name__ == "__main__":
    main()
