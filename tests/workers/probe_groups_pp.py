"""Worker: probe groups smaller than all candidates are refused at PP=2, on both stages.

Run on 2 ranks at PP=2. Every pipeline schedule runs through both stages at once, so stage 0's
group k and stage 1's group k would train together and the scores would depend on the layout
(before, ``group_size=4`` changed ``probe_residual`` by up to 24% against PP=1). Both ranks must
raise a ``ValueError`` naming ``score.probe.group_size``, with the base weights untouched; a group
holding every candidate (16 here) runs. Prints ``OK rank <r>`` per rank.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from megatron_hybrid.models.provider import build_model
from megatron_hybrid.runtime.distributed import ParallelConfig, initialize_runtime
from megatron_hybrid.scoring.calibration import ProbeConfig, probe_weight_deltas
from megatron_hybrid.scoring.job import task_batch_source
from megatron_hybrid.scoring.run import local_candidates
from tests.workers.hybrid_model import MODEL_CFG
from tests.workers.score_layouts import RUN, TASK


def main() -> int:
    parallel = ParallelConfig(pipeline_model_parallel_size=2)
    initialize_runtime(parallel, seed=0)
    chunks = build_model(MODEL_CFG, parallel)
    refs = local_candidates(chunks)
    before = [p.detach().clone() for c in chunks for p in c.parameters()]
    source = task_batch_source(TASK, RUN)
    try:
        probe_weight_deltas(chunks, refs, source, ProbeConfig(steps=1, group_size=4))
    except ValueError as e:
        if "score.probe.group_size=4" not in str(e):
            raise AssertionError(f"the error does not name the key: {e}") from e
    else:
        raise AssertionError("probe groups ran at PP=2")
    after = [p.detach() for c in chunks for p in c.parameters()]
    if not all(torch.equal(a, b) for a, b in zip(after, before)):
        raise AssertionError("weights changed before the error")
    total = 2 * len(refs)
    result = probe_weight_deltas(chunks, refs, source, ProbeConfig(steps=1, group_size=total))
    if sorted(result.delta) != sorted(r.name for r in refs):
        raise AssertionError("a group of every candidate must probe every local module")
    dist.barrier()
    print(f"OK rank {dist.get_rank()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
