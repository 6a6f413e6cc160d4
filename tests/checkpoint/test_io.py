"""One-rank save/load of base and trainables checkpoints; what they hold; errors on bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_hybrid.checkpoint import (
    CheckpointError,
    load_model,
    load_trainables,
    read_meta,
    save_model,
    save_trainables,
)
from megatron_hybrid.checkpoint.state import model_sharded_state_dict, sharded_leaves
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan
from megatron_hybrid.peft.plan import HybridPlan
from megatron_hybrid.runtime.distributed import ParallelConfig
from tests.workers.ckpt_kill import TINY, TINY_PLAN


def _model(plan: HybridPlan | None = TINY_PLAN, model_cfg=TINY):
    chunks = build_model(model_cfg, ParallelConfig())
    if plan is not None:
        apply_hybrid_plan(chunks, plan)
    return chunks


def _keys(sd) -> set[str]:
    out = set()
    for _, leaf in sharded_leaves(sd):
        out.add(leaf.key)
    return out


@pytest.fixture
def saved(single_rank_runtime, tmp_path):
    chunks = _model(plan=None)
    save_model(tmp_path / "base", chunks, TINY)
    apply_hybrid_plan(chunks, TINY_PLAN)
    with torch.no_grad():
        for p in chunks[0].parameters():
            if p.requires_grad:
                p.add_(0.5)  # trained trainables differ from the init
    save_trainables(
        tmp_path / "run", 7, chunks, plan=TINY_PLAN, model_cfg=TINY, base=tmp_path / "base"
    )
    return tmp_path, chunks


def test_trainables_selection_holds_adapters_and_fft_weights_only(single_rank_runtime):
    chunks = _model()
    keys = _keys(model_sharded_state_dict(chunks, "trainables"))
    assert keys == {
        "decoder.layers.0.self_attention.linear_qkv.lora_A",
        "decoder.layers.0.self_attention.linear_qkv.lora_B",
        "decoder.layers.0.mlp.linear_fc2.lora_A",
        "decoder.layers.0.mlp.linear_fc2.lora_B",
        "decoder.layers.1.mlp.linear_fc1.weight",
    }
    base = _keys(model_sharded_state_dict(chunks, "base", include_objects=False))
    assert not any("lora" in k for k in base)
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in base  # under the base's own key
    assert base | keys == _keys(model_sharded_state_dict(chunks, "all", include_objects=False))


def test_round_trip_restores_base_and_trainables(saved):
    tmp, chunks = saved
    fresh = _model()
    torch.nn.init.normal_(fresh[0].embedding.word_embeddings.weight)
    load_model(tmp / "base", fresh, TINY)
    state = load_trainables(tmp / "run", fresh, plan=TINY_PLAN, model_cfg=TINY)
    assert state.step == 7 and not state.optimizer_restored and state.rng_restored
    want = dict(chunks[0].named_parameters())
    for name, param in fresh[0].named_parameters():
        assert torch.equal(param, want[name]), name
    meta = read_meta(tmp / "run" / "iter_0000007")
    assert meta.kind == "trainables" and meta.base == str((tmp / "base").absolute())
    assert meta.contents == ["model", "rng"] and meta.layout["tp"] == 1


def test_resume_with_a_fresh_optimizer_reloads_its_main_weights(saved, monkeypatch):
    """With ``load_optimizer: false`` the optimizer's fp32 main copies (bf16 runs on GPU) still
    hold the pre-resume trainables; the run must tell it to copy the loaded weights (Megatron's
    ``reload_model_params``), or its first step reverts them. (bf16 cannot train on CPU, so a
    spy stands in for the mixed-precision optimizer's method.)"""
    from megatron_hybrid.checkpoint.config import CheckpointConfig
    from megatron_hybrid.checkpoint.run import RunCheckpointer
    from megatron_hybrid.train.step import OptimConfig, build_optimizer, wrap_ddp

    tmp, _ = saved
    fresh = _model()
    load_model(tmp / "base", fresh, TINY)
    optimizer = build_optimizer(wrap_ddp(fresh), OptimConfig(lr=1e-3))
    calls = []
    monkeypatch.setattr(optimizer, "reload_model_params", lambda: calls.append("reload"))
    cfg = CheckpointConfig(load_dir=str(tmp / "run"), load_optimizer=False)
    assert RunCheckpointer(cfg, TINY).restore(fresh, optimizer, TINY_PLAN, {}) == 7
    assert calls == ["reload"]


def test_trainables_on_a_base_rewritten_since_are_refused(saved):
    """A fresh run in a reused save_dir rewrites save_dir/base; older trainables recorded only
    its path, so merge and resume combined them with a base they were not trained on."""
    from megatron_hybrid.checkpoint.config import CheckpointConfig
    from megatron_hybrid.checkpoint.run import RunCheckpointer
    from megatron_hybrid.convert.merge import merge_checkpoint

    tmp, _ = saved
    merge_checkpoint(tmp / "run", tmp / "merged_ok", ParallelConfig())  # the same base: fine
    other = _model(plan=None)
    save_model(tmp / "base", other, TINY, overwrite=True)  # a new base under the same path
    with pytest.raises(CheckpointError, match=r"was trained on another base than .*base"):
        merge_checkpoint(tmp / "run", tmp / "merged", ParallelConfig())
    assert not (tmp / "merged").exists()
    run = RunCheckpointer(CheckpointConfig(load_dir=str(tmp / "run")), TINY)
    with pytest.raises(CheckpointError, match="rewritten or replaced since"):
        run.restore(_model(), None, TINY_PLAN, {})
    # A base named explicitly is the user's choice: accepted.
    merge_checkpoint(tmp / "run", tmp / "merged", ParallelConfig(), base=tmp / "base")
    cfg = CheckpointConfig(load_dir=str(tmp / "run"), base_dir=str(tmp / "base"))
    assert RunCheckpointer(cfg, TINY).restore(_model(), None, TINY_PLAN, {}) == 7


def test_full_tensors_reads_only_the_keys_asked_for(single_rank_runtime, tmp_path):
    """export-peft reads a trainables checkpoint's adapters and FFT weights, not the optimizer
    moments saved beside them (twice their size)."""
    from megatron_hybrid.convert.mcore_to_hf import full_tensors
    from megatron_hybrid.train.step import OptimConfig, build_optimizer, wrap_ddp

    chunks = _model()
    ddp = wrap_ddp(chunks)
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-3))
    path = save_trainables(tmp_path, 1, ddp, plan=TINY_PLAN, model_cfg=TINY, optimizer=optimizer)
    everything = full_tensors(path)
    model_keys = _keys(model_sharded_state_dict(chunks, "trainables"))
    assert model_keys < set(everything)  # the optimizer's tensors are there too
    some = full_tensors(path, keep=model_keys.__contains__)
    assert set(some) == model_keys
    for key in model_keys:
        assert torch.equal(some[key], everything[key]), key


def test_another_plan_is_named(saved):
    tmp, _ = saved
    other = HybridPlan.from_dict(
        {
            "lora": {"rank": 2},
            "modules": {
                "decoder.layers.0.self_attention.linear_qkv": {"mode": "lora", "rank": 1},
                "decoder.layers.0.mlp.linear_fc2": "fft",
                "decoder.layers.1.mlp.linear_fc1": "fft",
            },
        }
    )
    with pytest.raises(CheckpointError) as err:
        load_trainables(tmp / "run", _model(other), plan=other, model_cfg=TINY)
    msg = str(err.value)
    assert "another hybrid plan" in msg
    assert (
        "decoder.layers.0.self_attention.linear_qkv: checkpoint lora (rank 2), current plan lora (rank 1)"
        in msg
    )
    assert "decoder.layers.0.mlp.linear_fc2: checkpoint lora (rank 2), current plan fft" in msg


def test_another_architecture_is_named(saved):
    tmp, _ = saved
    wider = dataclasses.replace(TINY, ffn_hidden_size=96, add_qkv_bias=True)
    with pytest.raises(CheckpointError, match="another architecture") as err:
        load_model(tmp / "base", _model(None, wider), wider)
    assert "ffn_hidden_size: checkpoint has 64, model has 96" in str(err.value)
    assert "add_qkv_bias: checkpoint has False, model has True" in str(err.value)


def test_wrong_kind_and_damaged_files_are_named(saved):
    tmp, _ = saved
    with pytest.raises(
        CheckpointError, match="is a trainables checkpoint, not a model .its base is"
    ):
        load_model(tmp / "run", _model(), TINY)
    with pytest.raises(CheckpointError, match="is a base checkpoint, not a trainables checkpoint"):
        load_trainables(tmp / "base", _model(), plan=TINY_PLAN, model_cfg=TINY)
    shard = next(p for p in sorted((tmp / "base").iterdir()) if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"file {shard.name} is truncated \\(100 of"):
        load_model(tmp / "base", _model(), TINY)
    (tmp / "run" / "iter_0000007" / "common.pt").unlink()
    with pytest.raises(CheckpointError, match="file common.pt is missing"):
        load_trainables(tmp / "run", _model(), plan=TINY_PLAN, model_cfg=TINY)
    meta = tmp / "run" / "iter_0000007" / "hybrid_meta.json"
    meta.write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        read_meta(meta.parent)


def test_a_save_dir_holding_a_run_is_refused_without_resume(saved):
    """Starting over in a save_dir that holds a run would rewrite its base and iter_*: refused
    naming resume; with resume (or another save_dir) it goes ahead."""
    from megatron_hybrid.checkpoint.config import CheckpointConfig
    from megatron_hybrid.checkpoint.run import RunCheckpointer

    tmp, _ = saved
    listing = sorted(p.name for p in (tmp / "run").iterdir())
    with pytest.raises(
        FileExistsError, match=r"already holds a run \(latest: iter_0000007\).*resume=true"
    ):
        RunCheckpointer(CheckpointConfig(save_dir=str(tmp / "run")), TINY)
    assert sorted(p.name for p in (tmp / "run").iterdir()) == listing
    run = RunCheckpointer(CheckpointConfig(save_dir=str(tmp / "run"), resume=True), TINY)
    assert run.resume_from == tmp / "run" / "iter_0000007"
    assert RunCheckpointer(CheckpointConfig(save_dir=str(tmp / "new")), TINY).resume_from is None


def test_loading_does_not_print_megatrons_deprecation_warning(saved):
    """Megatron's loader calls torch's deprecated ``load_state_dict``; every merge, export and
    init_checkpoint load printed the FutureWarning."""
    import warnings

    tmp, _ = saved
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_model(tmp / "base", _model(), TINY)
    assert not [w for w in caught if "load_state_dict" in str(w.message)]


def test_a_base_saved_from_the_seed_records_the_runs_details(tmp_path, single_rank_runtime):
    """train records its character alphabet, so a run started from its merged model keeps ids."""
    from megatron_hybrid.checkpoint.config import CheckpointConfig
    from megatron_hybrid.checkpoint.run import RunCheckpointer

    run = RunCheckpointer(
        CheckpointConfig(save_dir=str(tmp_path / "run")), TINY, base_details={"char_alphabet": "_$"}
    )
    run.prepare_base(_model(plan=None))
    assert read_meta(tmp_path / "run" / "base").details == {"char_alphabet": "_$"}


def test_resuming_with_an_optimizer_from_a_save_without_one_names_the_setting(saved):
    """Before: "load without an optimizer", which names no setting."""
    from megatron_hybrid.train.step import OptimConfig, build_optimizer, wrap_ddp

    tmp, _ = saved
    ddp = wrap_ddp(_model())
    optimizer = build_optimizer(ddp, OptimConfig(lr=1e-3))
    with pytest.raises(CheckpointError, match=r"checkpoint.load_optimizer: false"):
        load_trainables(tmp / "run", ddp, plan=TINY_PLAN, model_cfg=TINY, optimizer=optimizer)
    state = load_trainables(tmp / "run", _model(), plan=TINY_PLAN, model_cfg=TINY)
    assert (state.rng_restored, state.rng_note) == (True, "")
