"""The provider's model gives the same loss and gradients at every TP/PP layout.

Reference: the test GPT at TP=1, PP=1 in this process, one forward+backward through Megatron's
schedule (2 microbatches). Each multi-rank layout loads the same full weights into its shards
(``tests/sharding.py``), runs the same step in ``tests/workers/model_equivalence.py`` and hands back
loss and gradients gathered to full shape.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.multirank import run_against_reference
from tests.sharding import (
    RankShard,
    layer_offset,
    merge_shards,
    shard_full_state_dict,
    tp_layout,
)
from tests.workers.model_equivalence import (
    MODEL_CFG,
    build_ddp_model,
    make_batches,
    train_step,
)

TOL = {"atol": 1e-5, "rtol": 1e-5}


@dataclass
class Reference:
    path: Path
    loss: float
    weights: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    from megatron.core import parallel_state

    from megatron_hybrid.runtime.distributed import ParallelConfig, initialize_runtime

    initialize_runtime(ParallelConfig(), seed=1234)
    try:
        chunks = build_ddp_model(MODEL_CFG, ParallelConfig())
        weights = {
            k: v.detach().clone()
            for k, v in chunks[0].module.state_dict().items()
            if isinstance(v, torch.Tensor)
        }
        batches = make_batches()
        loss, grads = train_step(chunks, batches)
    finally:
        parallel_state.destroy_model_parallel()
    path = tmp_path_factory.mktemp("reference") / "reference.pt"
    torch.save({"weights": weights, "batches": batches}, path)
    return Reference(path, loss, weights, grads[0])


def test_reference_is_not_trivial(reference: Reference) -> None:
    assert set(reference.grads) == set(reference.weights)
    assert 3.0 < reference.loss < 5.0  # about log(64) for a freshly initialised model
    for name, grad in reference.grads.items():
        assert grad.abs().max() > 1e-4, f"{name} has a vanishing gradient"


@pytest.mark.parametrize(
    ("tp", "pp", "vp_size"), [(1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, 2)]
)
def test_shard_then_merge_round_trips(reference: Reference, tp: int, pp: int, vp_size) -> None:
    shards = [
        RankShard(
            shard_full_state_dict(
                reference.weights,
                t,
                tp,
                MODEL_CFG,
                pp_rank=p,
                pp_size=pp,
                vp_stage=v,
                vp_size=vp_size,
            ),
            t,
            tp,
            p,
            pp,
            v,
            vp_size,
        )
        for t in range(tp)
        for p in range(pp)
        for v in (range(vp_size) if vp_size else [None])
    ]
    merged = merge_shards(shards, MODEL_CFG)
    assert set(merged) == set(reference.weights)
    for key, full in reference.weights.items():
        assert torch.equal(merged[key], full), key


def test_tied_output_layer_is_the_embedding_on_the_last_stage(reference: Reference) -> None:
    tied_cfg = dataclasses.replace(MODEL_CFG, untie_embeddings_and_output_weights=False)
    full = {k: v for k, v in reference.weights.items() if k != "output_layer.weight"}
    last = shard_full_state_dict(full, 1, 2, tied_cfg, pp_rank=1, pp_size=2)
    embedding = full["embedding.word_embeddings.weight"]
    assert torch.equal(last["output_layer.weight"], embedding[32:])
    first = shard_full_state_dict(full, 1, 2, tied_cfg, pp_rank=0, pp_size=2)
    assert "output_layer.weight" not in first
    shards = [RankShard(first, 1, 2, 0, 2), RankShard(last, 1, 2, 1, 2)]
    shards += [
        RankShard(shard_full_state_dict(full, 0, 2, tied_cfg, pp_rank=p, pp_size=2), 0, 2, p, 2)
        for p in (0, 1)
    ]
    merged = merge_shards(shards, tied_cfg)
    assert set(merged) == set(full)
    assert all(torch.equal(merged[k], v) for k, v in full.items())


def test_shards_follow_megatron_layouts(reference: Reference) -> None:
    w = reference.weights
    groups, head_dim = MODEL_CFG.kv_heads, MODEL_CFG.head_dim
    per_group = (MODEL_CFG.num_attention_heads // groups + 2) * head_dim
    ffn = MODEL_CFG.ffn_hidden_size
    shard = shard_full_state_dict(w, 1, 2, MODEL_CFG, pp_rank=1, pp_size=2)
    # Stage 1 of 2 holds global layers 2 and 3 as local 0 and 1, plus the final norm and head.
    assert layer_offset(MODEL_CFG, pp_rank=1, pp_size=2) == 2
    assert "embedding.word_embeddings.weight" not in shard
    assert "decoder.layers.2.mlp.linear_fc1.weight" not in shard
    qkv = shard["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(qkv, w["decoder.layers.2.self_attention.linear_qkv.weight"][per_group:])
    fc1 = shard["decoder.layers.1.mlp.linear_fc1.weight"]
    full_fc1 = w["decoder.layers.3.mlp.linear_fc1.weight"]
    half = ffn // 2
    assert torch.equal(fc1[:half], full_fc1[half:ffn])  # gate, second half
    assert torch.equal(fc1[half:], full_fc1[ffn + half :])  # up, second half
    proj = shard["decoder.layers.1.self_attention.linear_proj.weight"]
    assert torch.equal(proj, w["decoder.layers.3.self_attention.linear_proj.weight"][:, 32:])
    assert torch.equal(shard["output_layer.weight"], w["output_layer.weight"][32:])
    assert torch.equal(shard["decoder.final_layernorm.weight"], w["decoder.final_layernorm.weight"])


def test_unknown_sharded_key_needs_a_layout_fn() -> None:
    with pytest.raises(ValueError, match="layout_fn"):
        tp_layout("decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight", MODEL_CFG)


@pytest.mark.multirank
@pytest.mark.parametrize(
    ("nproc", "args"),
    [
        pytest.param(2, ["--tp", "2"], id="tp2"),
        pytest.param(2, ["--tp", "2", "--sequence-parallel"], id="tp2-sp"),
        pytest.param(2, ["--pp", "2"], id="pp2"),
        pytest.param(4, ["--tp", "2", "--pp", "2"], id="tp2-pp2"),
    ],
)
def test_layout_matches_tp1_reference(
    reference: Reference, tmp_path: Path, nproc: int, args: list[str]
) -> None:
    result = run_against_reference(
        "model_equivalence", nproc, reference.path, tmp_path / "result.pt", *args
    )
    # Every last-stage rank (one per TP rank) reports the loss.
    assert result["losses"], "no rank reported a loss"
    for loss in result["losses"]:
        assert loss == pytest.approx(reference.loss, abs=1e-5, rel=1e-5)
    assert set(result["weights"]) == set(reference.weights)
    for key, full in reference.weights.items():
        assert torch.equal(result["weights"][key], full), f"weight {key} did not round-trip"
    assert set(result["grads"]) == set(reference.grads)
    for key, grad in reference.grads.items():
        torch.testing.assert_close(
            result["grads"][key], grad, **TOL, msg=lambda m, k=key: f"{k}: {m}"
        )
