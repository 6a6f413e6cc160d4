"""Worker: Hybrid-LoRA scores at a TP/PP/DP layout vs a single-process svdvals reference.

``--make-reference`` (1 rank): builds the test model, saves its weights, accumulates the
calibration gradient G and the probe's dW for every candidate at TP=1, and scores them with
``torch.linalg.svdvals`` of the FULL matrices (the plain reference), plus the selections.
Otherwise: every rank loads its shard of the same weights and runs ``score_modules`` (distributed
spectra) and ``select_and_check``; rank 0 saves the tables and selections.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_hybrid.data.arith import ArithTask
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.runtime.distributed import ParallelConfig, destroy_runtime, initialize_runtime
from megatron_hybrid.scoring.calibration import (
    ProbeConfig,
    accumulate_gradients,
    probe_weight_deltas,
)
from megatron_hybrid.scoring.job import task_batch_source
from megatron_hybrid.scoring.run import (
    ScoreConfig,
    local_candidates,
    score_modules,
    select_and_check,
)
from megatron_hybrid.scoring.selection import SelectionConfig
from megatron_hybrid.train.quickstart import RunConfig
from tests.sharding import load_full_state_dict
from tests.workers.hybrid_model import MODEL_CFG

RANK = 4
RUN = RunConfig(global_batch_size=8, micro_batch_size=2, seq_length=16, seed=3)
TASK = ArithTask(max_digits=3)
# eps=1e-3: Adam's first steps are ~sign(g) with the default eps, which turns float rounding in
# tiny gradients into lr-sized differences between layouts; a large eps keeps the probe smooth.
PROBE = ProbeConfig(steps=3, lr=1e-2, eps=1e-3)
SELECT = SelectionConfig(budget=0.2)


def svd_scores(mat: torch.Tensor, r: int) -> dict[str, float]:
    s = torch.linalg.svdvals(mat.double())
    fro = float((mat.double() ** 2).sum())
    top = float((s[:r] ** 2).sum())
    return {
        "residual": max(fro - top, 0.0),
        "residual_frac": max(fro - top, 0.0) / fro,
        "grad_norm": fro**0.5,
        "stable_rank": fro / float(s[0] ** 2),
    }


def make_reference(path: Path) -> None:
    initialize_runtime(ParallelConfig(), seed=1234)
    chunks = build_model(MODEL_CFG, ParallelConfig())
    weights = {
        k: v.clone() for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")
    }
    refs = local_candidates(chunks)
    batches = task_batch_source(TASK, RUN)
    grads = accumulate_gradients(chunks, refs, batches, 3)
    probe = probe_weight_deltas(chunks, refs, batches, PROBE)
    after = {k: v for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}
    restored = all(torch.equal(after[k], weights[k]) for k in weights)
    scores = {}
    for ref in refs:
        g = svd_scores(grads[ref.name], RANK)
        d = svd_scores(probe.delta[ref.name], RANK)
        scores[ref.name] = g | {
            "probe_residual": d["residual"],
            "probe_residual_frac": d["residual_frac"],
            "epd": probe.epd_local[ref.name],
        }
    torch.save({"weights": weights, "scores": scores, "probe_restored_bitwise": restored}, path)
    destroy_runtime()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--make-reference", action="store_true")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--solver", default="exact")
    args = parser.parse_args()
    if args.make_reference:
        make_reference(args.reference)
        return
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp
    )
    initialize_runtime(parallel, seed=1234)
    ref = torch.load(args.reference, weights_only=True)
    chunks = build_model(MODEL_CFG, parallel)
    load_full_state_dict(chunks, ref["weights"], MODEL_CFG)
    batches = task_batch_source(TASK, RUN)
    out = {}
    for method in ("residual", "probe_residual"):
        cfg = ScoreConfig(method=method, solver=args.solver, num_batches=3, probe=PROBE)
        table = score_modules(chunks, batches, cfg, RANK)
        out[method] = {
            "scores": {m.name: m.scores for m in table},
            "selection": select_and_check(table, method, SELECT),
            "shapes": {m.name: (tuple(m.shape), m.params) for m in table},
        }
    if dist.get_rank() == 0:
        torch.save(out, args.out)
        print("scored", flush=True)
    destroy_runtime()


if __name__ == "__main__":
    main()
