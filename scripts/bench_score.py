"""Benchmark of the scoring step: time relative to a training step, and communication volume.

Prints ratios measured side by side in one run (absolute times on shared machines are noise):

1. wall time of the whole scoring step (K calibration batches + spectra of every candidate) divided
   by the wall time of one hybrid training step on the same global batch, for the gradient
   ``residual`` score with the ``exact`` and ``randomized`` solvers and for the FFT probe;
2. per candidate module, the bytes this rank all-reduces to get its spectrum (exact and
   randomized) divided by the bytes an all-gather of the full gradient would move; measured with
   the real collectives of this run, plus the same ratios computed for Llama-3-8B / 70B shapes.

Run (CPU, 2 ranks at TP=2)::

    torchrun --nproc_per_node 2 scripts/bench_score.py --tp 2
    python scripts/bench_score.py            # single process: time ratios only

Options: ``--hidden``, ``--layers``, ``--batches`` (K), ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from megatron_hybrid.data.arith import ArithTask, CharTokenizer
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan, candidate_names
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.plan import PeftSpec
from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime
from megatron_hybrid.scoring.calibration import ProbeConfig
from megatron_hybrid.scoring.job import task_batch_source
from megatron_hybrid.scoring.run import ScoreConfig, local_candidates, score_modules
from megatron_hybrid.scoring.sharded import sharded_spectral_stats
from megatron_hybrid.train.quickstart import RunConfig
from megatron_hybrid.train.step import OptimConfig, build_optimizer, lm_forward_backward, wrap_ddp

RANK = 8


def _time_once(fn) -> float:
    if dist.is_initialized():
        dist.barrier()
    t = time.perf_counter()
    fn()
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - t


def _interleaved_ratios(fns: dict, reference, repeats: int) -> dict[str, float]:
    """Median over rounds of ``time(fn) / time(reference)``, each round timing every ``fn`` and the
    reference back to back, so a change of machine load hits both sides of a ratio alike."""
    ratios: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        times = {k: _time_once(fn) for k, fn in fns.items()}
        t_ref = _time_once(reference)
        for k, t in times.items():
            ratios[k].append(t / t_ref)
    return {k: statistics.median(v) for k, v in ratios.items()}


def _analytic_ratio(
    out: int,
    inp: int,
    tp: int,
    mode: str,
    solver: str,
    r: int = 16,
    q_extra: int = 8,
    iters: int = 4,
) -> float:
    """Bytes all-reduced per rank / bytes of gathering a bf16 gradient, for a full out x in matrix."""
    d = inp if mode == "column" else out
    gather = out * inp * 2
    if solver == "exact":
        reduced = 8 * d * d
    else:
        reduced = 8 * (1 + (iters + 1) * d * min(d, r + q_extra))
    return reduced / gather if tp > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4, help="K calibration batches")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    args = parser.parse_args()

    parallel = ParallelConfig(tensor_model_parallel_size=args.tp)
    model = ModelConfig(
        num_layers=args.layers,
        hidden_size=args.hidden,
        num_attention_heads=8,
        num_query_groups=4,
        ffn_hidden_size=4 * args.hidden,
        vocab_size=CharTokenizer().vocab_size,
        max_sequence_length=32,
    )
    run = RunConfig(global_batch_size=32, micro_batch_size=8, seq_length=16)
    initialize_runtime(parallel, seed=0)
    rank0 = dist.get_rank() == 0
    say = print if rank0 else (lambda *a, **k: None)
    chunks = build_model(model, parallel)  # scored as is
    train_chunks = build_model(model, parallel)  # gets the hybrid plan for the training step
    batches = task_batch_source(ArithTask(), run)
    tp_group = __import__(
        "megatron.core.parallel_state", fromlist=["x"]
    ).get_tensor_model_parallel_group()

    def score(method: str, solver: str):
        cfg = ScoreConfig(
            method=method,
            solver=solver,
            num_batches=args.batches,
            probe=ProbeConfig(steps=args.batches),
        )
        return lambda: score_modules(chunks, batches, cfg, RANK)

    # Per-module communication, measured on the real collectives (gradients as stand-in matrices).
    comm_rows = []
    for ref in local_candidates(chunks):
        base = ref.module
        mode = "column" if ref.name.endswith(("linear_qkv", "linear_fc1")) else "row"
        shard = torch.randn_like(base.weight, dtype=torch.bfloat16)
        _, exact = sharded_spectral_stats(shard, mode, tp_group, RANK, solver="exact")
        _, rand = sharded_spectral_stats(shard, mode, tp_group, RANK, solver="randomized")
        comm_rows.append(
            (
                ref.name,
                mode,
                exact.all_reduce_bytes / exact.gather_bytes,
                rand.all_reduce_bytes / rand.gather_bytes,
            )
        )

    # One hybrid training step on the same global batch (10% FFT, LoRA r=8 on the rest).
    names = candidate_names(train_chunks)
    spec = PeftSpec(fft_modules=names[: max(1, len(names) // 10)], lora=LoRAConfig(rank=RANK))
    apply_hybrid_plan(train_chunks, spec.resolve(names))
    ddp = wrap_ddp(train_chunks)
    opt = build_optimizer(ddp, OptimConfig(lr=1e-4))

    def train_step():
        lm_forward_backward(ddp, batches(0))
        opt.step()

    train_step()  # warm-up: first-call allocations are not a step's cost
    fns = {
        "residual/exact": score("residual", "exact"),
        "residual/randomized": score("residual", "randomized"),
        "probe_residual/exact": score("probe_residual", "exact"),
    }
    ratios = _interleaved_ratios(fns, train_step, args.repeats)

    say(
        f"model: {args.layers} layers, hidden {args.hidden}, TP={args.tp}, K={args.batches} calibration batches, r={RANK}"
    )
    say(
        f"\nscoring time / one training step on the same batch (median of {args.repeats} "
        "interleaved rounds)"
    )
    for k, v in ratios.items():
        say(f"  {k:22s} {v:8.2f}x")
    say(
        f"  randomized / exact       {ratios['residual/randomized'] / ratios['residual/exact']:8.2f}x"
    )
    say(
        "\nbytes all-reduced per module / bytes of all-gathering the gradient (measured, bf16 matrices)"
    )
    if args.tp == 1:
        say("  (TP=1: nothing is communicated; run under torchrun with --tp 2 to measure)")
    else:
        say(f"  {'module':46s} {'mode':6s} {'exact':>8s} {'randomized':>11s}")
        for name, mode, e, r in comm_rows:
            say(f"  {name:46s} {mode:6s} {e:8.3f} {r:11.3f}")
    say(
        "\nsame ratio computed for real shapes (TP=8, bf16 gradient, r=16, oversample 8, 4 iterations)"
    )
    for label, h, ffn in (("Llama-3-8B", 4096, 14336), ("Llama-3-70B", 8192, 28672)):
        kv = h // 4  # 8 KV heads of 128 for 32 / 64 query heads
        shapes = {
            "linear_qkv": (h + 2 * kv, h, "column"),
            "linear_proj": (h, h, "row"),
            "linear_fc1": (2 * ffn, h, "column"),
            "linear_fc2": (h, ffn, "row"),
        }
        cells = ", ".join(
            f"{k} {_analytic_ratio(o, i, 8, m, 'exact'):.2f}/{_analytic_ratio(o, i, 8, m, 'randomized'):.4f}"
            for k, (o, i, m) in shapes.items()
        )
        say(f"  {label}: exact/randomized  {cells}")
    destroy_runtime()


if __name__ == "__main__":
    main()
