"""LoRA wrappers at TP=2 against the same layer at TP=1 (outputs and every gradient, fp32 1e-5),
including a stand-in for TE's fused LayerNorm + column linear (see the worker's docstring)."""

from __future__ import annotations

import pytest

from tests.multirank import launch, worker_path

pytestmark = pytest.mark.multirank

CASES = [
    f"{kind} sp={sp} train_base={tb} bias={bias} skip_bias_add={sba}"
    for kind in ("column", "gated", "row", "layernorm_column")
    for sp, tb, bias, sba in (
        (False, False, False, False),
        (True, False, False, False),
        (False, True, True, False),
        (True, True, True, True),
    )
]


def test_every_wrapped_layer_type_matches_tp1_with_and_without_sequence_parallel():
    out = launch(worker_path("lora_layers_tp"), 2, timeout=300).stdout
    missing = [c for c in CASES if f"OK {c}" not in out]
    assert not missing, f"cases that did not report OK: {missing}\n{out}"
