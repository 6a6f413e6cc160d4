"""Batch-size limits the quickstart checks from its config, before any model is built."""

from __future__ import annotations

import pytest

from megatron_hybrid.config import load_config
from megatron_hybrid.train.quickstart import QuickstartConfig, check_micro_batches

VPP = [
    "parallel.pipeline_model_parallel_size=2",
    "parallel.virtual_pipeline_model_parallel_size=2",
]


def test_an_interleaved_pipeline_with_fewer_micro_batches_than_stages_is_named():
    """Before, Megatron asserted inside step 1 ("contiguous micro-batches ... should range in
    [PP=2, M=1]") without naming a key."""
    cfg = load_config(
        QuickstartConfig, overrides=[*VPP, "run.global_batch_size=8", "run.micro_batch_size=8"]
    )
    with pytest.raises(ValueError, match=r"at least PP=2 micro-batches .* 8 / \(8 x 1\) = 1"):
        check_micro_batches(cfg, dp_size=1)
    ok = load_config(
        QuickstartConfig, overrides=[*VPP, "run.global_batch_size=8", "run.micro_batch_size=4"]
    )
    check_micro_batches(ok, dp_size=1)  # two micro-batches: enough
    with pytest.raises(ValueError, match=r"run.global_batch_size \(8\) must be a multiple"):
        check_micro_batches(ok, dp_size=3)
