"""apply_hybrid_plan on a tiny GPTModel in one process: trainable set, one real optimizer step,
merge / unmerge / disable, parameter counts, all-or-nothing validation and checkpoint keys.

The step goes through the project's own machinery (Megatron DDP, schedule and optimizer via
``megatron_hybrid.train.step``); references are the model's own outputs before training and hand
counts from the architecture.
"""

from __future__ import annotations

import re

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_hybrid.data.arith import ArithTask, CharTokenizer, make_sft_batch
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import PlanSummary, apply_hybrid_plan, candidate_names
from megatron_hybrid.peft.config import LoRAConfig
from megatron_hybrid.peft.lora import (
    LoRAColumnParallelLinear,
    LoRAParallelLinear,
    LoRARowParallelLinear,
    adapters_disabled,
    iter_lora_modules,
)
from megatron_hybrid.peft.plan import HybridPlan, ModuleDecision, PeftSpec
from megatron_hybrid.train.step import OptimConfig, build_optimizer, lm_forward_backward, wrap_ddp

MODEL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=32,
    max_sequence_length=16,
)
LORA = LoRAConfig(rank=4, alpha=8.0, b_init="gaussian")
FFT = "decoder.layers.1.mlp.linear_fc1"
SEQ = 16

pytestmark = pytest.mark.usefixtures("single_rank_runtime")


# -- helpers ----------------------------------------------------------------------------------
def build(model: ModelConfig = MODEL) -> list[torch.nn.Module]:
    from megatron_hybrid.runtime.distributed import ParallelConfig

    return build_model(model, ParallelConfig())


def hybrid_plan(chunks, lora: LoRAConfig = LORA) -> HybridPlan:
    return PeftSpec(fft_modules=[FFT], lora=lora).resolve(candidate_names(chunks))


def lora_only_plan(chunks) -> HybridPlan:
    return PeftSpec(lora=LORA).resolve(candidate_names(chunks))


def shapes(model: ModelConfig = MODEL) -> dict[str, tuple[int, int]]:
    """``kind -> (out, in)`` of the full weights, from the architecture alone."""
    h, d = model.hidden_size, model.head_dim
    ffn = model.ffn_hidden_size * (2 if model.swiglu else 1)
    return {
        "linear_qkv": ((model.num_attention_heads + 2 * model.kv_heads) * d, h),
        "linear_proj": (h, model.num_attention_heads * d),
        "linear_fc1": (ffn, h),
        "linear_fc2": (h, model.ffn_hidden_size),
    }


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def batch():
    pairs = ArithTask().sample(4, torch.Generator().manual_seed(0))
    return make_sft_batch(pairs, CharTokenizer(), SEQ)


@torch.no_grad()
def logits(chunks) -> torch.Tensor:
    b = batch()
    return chunks[0](b.tokens, b.position_ids, None).detach().clone()


def train_one_step(chunks, lr: float = 1e-2) -> float:
    ddp = wrap_ddp(chunks)
    optimizer = build_optimizer(ddp, OptimConfig(lr=lr))
    loss = lm_forward_backward(ddp, [batch()])
    ok, _, _ = optimizer.step()
    assert ok
    return loss


def trainable_names(chunks) -> set[str]:
    return {n for n, p in chunks[0].named_parameters() if p.requires_grad}


def expected_trainable(plan: HybridPlan, chunks) -> set[str]:
    out = {f"{n}.{p}" for n in plan.names("lora") for p in ("lora_A", "lora_B")}
    for n in plan.names("fft"):
        out |= {f"{n}.{p}" for p, _ in chunks[0].get_submodule(n).named_parameters()}
    return out


def state(chunks) -> dict:
    """What a failed apply must not change: requires_grad flags and module identities."""
    return {
        "requires_grad": {n: p.requires_grad for n, p in chunks[0].named_parameters()},
        "modules": {n: id(m) for n, m in chunks[0].named_modules()},
    }


# -- which parameters train -------------------------------------------------------------------
def test_exactly_the_plans_parameters_require_grad():
    chunks = build()
    plan = hybrid_plan(chunks)
    apply_hybrid_plan(chunks, plan)
    assert trainable_names(chunks) == expected_trainable(plan, chunks)
    assert f"{FFT}.weight" in trainable_names(chunks)
    assert "decoder.layers.0.self_attention.linear_qkv.lora_A" in trainable_names(chunks)
    wrapped = {m.name: type(m) for m in iter_lora_modules(chunks)}
    assert set(wrapped) == set(plan.names("lora"))
    for n, cls in wrapped.items():
        expected = (
            LoRAColumnParallelLinear
            if kind(n) in ("linear_qkv", "linear_fc1")
            else (LoRARowParallelLinear)
        )
        assert cls is expected
        assert getattr(chunks[0].get_submodule(n), "gated", False) == (kind(n) == "linear_fc1")


def test_global_names_are_unchanged_by_wrapping():
    chunks = build()
    before = candidate_names(chunks)
    apply_hybrid_plan(chunks, hybrid_plan(chunks))
    assert candidate_names(chunks) == before


def test_fft_trains_weight_and_bias_while_lora_leaves_the_base_bias_frozen():
    chunks = build(ModelConfig(**{**vars(MODEL), "add_qkv_bias": True}))
    plan = HybridPlan(
        modules={
            "decoder.layers.0.self_attention.linear_qkv": ModuleDecision("fft"),
            "decoder.layers.1.self_attention.linear_qkv": ModuleDecision("lora"),
        },
        lora=LORA,
    )
    apply_hybrid_plan(chunks, plan)
    assert trainable_names(chunks) == {
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.self_attention.linear_qkv.bias",
        "decoder.layers.1.self_attention.linear_qkv.lora_A",
        "decoder.layers.1.self_attention.linear_qkv.lora_B",
    }


def test_fft_leaves_a_fused_norm_frozen():
    """TE's fused LayerNorm + linear holds the preceding norm's ``layer_norm_weight``; full
    fine-tuning of the linear trained it too (and export dropped it). A local module given that
    extra parameter stands in for the TE module here."""
    chunks = build()
    name = "decoder.layers.0.self_attention.linear_qkv"
    module = chunks[0].get_submodule(name)
    module.register_parameter(
        "layer_norm_weight", torch.nn.Parameter(torch.ones(MODEL.hidden_size))
    )
    plan = HybridPlan(modules={name: ModuleDecision("fft")}, lora=LORA)
    summary = apply_hybrid_plan(chunks, plan)
    assert trainable_names(chunks) == {f"{name}.weight"}
    assert summary.fft_params == module.weight.numel()


def test_summary_counts_equal_hand_counts():
    chunks = build()
    plan = HybridPlan(
        modules={
            FFT: ModuleDecision("fft"),
            "decoder.layers.0.self_attention.linear_qkv": ModuleDecision("lora"),
            "decoder.layers.0.mlp.linear_fc2": ModuleDecision("lora", rank=2),
            "decoder.layers.1.self_attention.linear_proj": ModuleDecision("lora"),
            "decoder.layers.0.mlp.linear_fc1": ModuleDecision("frozen"),
        },
        lora=LORA,
    )
    summary = apply_hybrid_plan(chunks, plan)
    s, h, r = shapes(), MODEL.hidden_size, LORA.rank
    vocab = MODEL.padded_vocab_size()
    base = 2 * vocab * h + h + MODEL.num_layers * (2 * h + sum(o * i for o, i in s.values()))
    fft = s["linear_fc1"][0] * s["linear_fc1"][1]
    lora = r * sum(s["linear_qkv"]) + 2 * sum(s["linear_fc2"]) + r * sum(s["linear_proj"])
    assert (summary.fft_params, summary.lora_params) == (fft, lora)
    assert summary.total_params == base + lora
    assert summary.trainable_params == fft + lora
    assert summary.total_params == sum(p.numel() for p in chunks[0].parameters())
    assert summary.trainable_params == sum(
        p.numel() for p in chunks[0].parameters() if p.requires_grad
    )
    assert summary.fft_modules == [FFT]
    assert summary.lora_modules == plan.names("lora")
    table = summary.table()
    assert f"{fft:,}" in table and f"{lora:,}" in table and f"{base + lora:,}" in table


# -- one optimizer step -----------------------------------------------------------------------
def test_one_step_changes_only_the_trainables_and_merge_matches_unmerged():
    chunks = build()
    base_logits = logits(chunks)
    plan = hybrid_plan(chunks)
    apply_hybrid_plan(chunks, plan)
    trainable = expected_trainable(plan, chunks)
    before = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}

    loss = train_one_step(chunks)
    assert loss is not None and torch.isfinite(torch.tensor(loss))

    after = dict(chunks[0].named_parameters())
    for n, p in before.items():
        if n in trainable:
            assert not torch.equal(after[n], p), f"{n} did not change"
        else:
            assert torch.equal(after[n], p), f"frozen {n} changed"

    unmerged = logits(chunks)
    assert not torch.allclose(unmerged, base_logits, atol=1e-4)  # the step did something
    weights = {m.name: m.base_layer.weight.detach().clone() for m in iter_lora_modules(chunks)}
    for m in iter_lora_modules(chunks):
        m.merge()
    torch.testing.assert_close(logits(chunks), unmerged, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        next(iter_lora_modules(chunks)).merge()
    for m in iter_lora_modules(chunks):
        m.unmerge()
        torch.testing.assert_close(m.base_layer.weight, weights[m.name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(chunks), unmerged, rtol=1e-5, atol=1e-5)


def test_full_activation_recompute_trains_the_plan_like_plain_backprop():
    """Frozen embeddings + Megatron's reentrant full recompute gave no gradient to any layer (the
    decoder input did not require grad); the provider's hook fixes it. Same weights and plan, one
    step each (no weight decay): the same trained weights, all of them changed."""
    import dataclasses

    plain = build()
    recompute = build(dataclasses.replace(MODEL, recompute_granularity="full"))
    recompute[0].load_state_dict(plain[0].state_dict())
    for chunks in (plain, recompute):
        apply_hybrid_plan(chunks, hybrid_plan(chunks))
    trainable = expected_trainable(hybrid_plan(plain), plain)
    before = {n: p.detach().clone() for n, p in plain[0].named_parameters() if n in trainable}
    for chunks in (plain, recompute):
        train_one_step(chunks)
    got = dict(recompute[0].named_parameters())
    for n, p in plain[0].named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), f"{n} did not change"
            torch.testing.assert_close(got[n], p, rtol=1e-5, atol=1e-6, msg=n)


def test_disabled_adapters_give_the_base_model_after_a_lora_only_step():
    chunks = build()
    base_logits = logits(chunks)
    apply_hybrid_plan(chunks, lora_only_plan(chunks))
    train_one_step(chunks)
    adapted = logits(chunks)
    assert not torch.allclose(adapted, base_logits, atol=1e-4)
    with adapters_disabled(chunks):
        torch.testing.assert_close(logits(chunks), base_logits, rtol=0, atol=0)
    assert all(m.adapters_enabled for m in iter_lora_modules(chunks))  # restored on exit
    torch.testing.assert_close(logits(chunks), adapted, rtol=0, atol=0)


def test_disabled_adapters_keep_the_trained_fft_weights():
    chunks = build()
    base_logits = logits(chunks)
    apply_hybrid_plan(chunks, hybrid_plan(chunks))
    train_one_step(chunks)
    with adapters_disabled(chunks):
        assert not torch.allclose(logits(chunks), base_logits, atol=1e-4)


def test_disabling_merged_adapters_is_refused():
    chunks = build()
    apply_hybrid_plan(chunks, lora_only_plan(chunks))
    for m in iter_lora_modules(chunks):
        m.merge()
    with pytest.raises(RuntimeError, match="merged"), adapters_disabled(chunks):
        pass


# -- validation before any change -------------------------------------------------------------
def _plan(*entries: tuple[str, ModuleDecision]) -> HybridPlan:
    return HybridPlan(modules=dict(entries), lora=LORA)


_GOOD = ("decoder.layers.0.self_attention.linear_qkv", ModuleDecision("lora"))
_GOOD_FFT = (FFT, ModuleDecision("fft"))

BAD_PLANS = {
    "rank > min(in, out)": (
        _plan(_GOOD, _GOOD_FFT, ("decoder.layers.0.mlp.linear_fc2", ModuleDecision("lora", 65))),
        [
            r"decoder\.layers\.0\.mlp\.linear_fc2: LoRA rank 65 exceeds min\(in, out\) = min\(128, 64\)"
        ],
    ),
    "unknown module": (
        _plan(_GOOD, ("decoder.layers.0.mlp.linear_fc3", ModuleDecision("fft"))),
        [
            r"decoder\.layers\.0\.mlp\.linear_fc3: the model has no such parallel linear module",
            r"linear_fc3: .*closest: \[.*'decoder\.layers\.0\.mlp\.linear_fc[12]'",
        ],
    ),
    "unknown layer": (
        _plan(("decoder.layers.2.mlp.linear_fc1", ModuleDecision("lora"))),
        [r"decoder\.layers\.2\.mlp\.linear_fc1: the model has no such parallel linear module"],
    ),
    "LoRA on a norm": (
        _plan(_GOOD, ("decoder.layers.0.input_layernorm", ModuleDecision("lora"))),
        # names the module and says LoRA/FFT need a parallel linear
        [r"decoder\.layers\.0\.input_layernorm: .*parallel linear"],
    ),
    "every problem at once": (
        _plan(
            ("decoder.layers.0.mlp.linear_fc2", ModuleDecision("lora", 65)),
            ("decoder.layers.0.mlp.linear_fc3", ModuleDecision("lora")),
            ("output_layer.weight", ModuleDecision("fft")),
        ),
        [
            r"linear_fc2: LoRA rank 65",
            r"linear_fc3: the model has no such",
            r"output_layer\.weight",
        ],
    ),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plan_raises_before_anything_changes(case):
    chunks = build()
    plan, patterns = BAD_PLANS[case]
    before = state(chunks)
    with pytest.raises(ValueError, match=r"^invalid hybrid plan:") as info:
        apply_hybrid_plan(chunks, plan)
    for pattern in patterns:
        assert any(re.search(pattern, line) for line in str(info.value).splitlines()), (
            pattern,
            str(info.value),
        )
    assert state(chunks) == before
    assert not list(iter_lora_modules(chunks))


def test_rank_zero_raises_naming_the_module_before_anything_changes():
    chunks = build()
    before = state(chunks)
    plan = _plan(_GOOD_FFT, ("decoder.layers.0.mlp.linear_fc2", ModuleDecision("lora", 0)))
    with pytest.raises(ValueError, match=r"decoder\.layers\.0\.mlp\.linear_fc2: .*rank.*0"):
        apply_hybrid_plan(chunks, plan)
    assert state(chunks) == before


def test_rank_zero_raises_before_anything_changes():
    chunks = build()
    before = state(chunks)
    plan = _plan(_GOOD_FFT, ("decoder.layers.0.mlp.linear_fc2", ModuleDecision("lora", 0)))
    with pytest.raises(ValueError, match=r"rank must be a positive integer, got 0"):
        apply_hybrid_plan(chunks, plan)
    assert state(chunks) == before


def test_applying_a_plan_twice_raises_and_changes_nothing():
    chunks = build()
    plan = hybrid_plan(chunks)
    apply_hybrid_plan(chunks, plan)
    before = state(chunks)
    with pytest.raises(ValueError, match=r"already wrapped with LoRA \(a plan can be applied only"):
        apply_hybrid_plan(chunks, plan)
    assert state(chunks) == before


def test_applying_another_plan_after_a_lora_plan_raises():
    chunks = build()
    apply_hybrid_plan(chunks, _plan(_GOOD))
    before = state(chunks)
    with pytest.raises(ValueError, match="applied only once"):
        apply_hybrid_plan(chunks, _plan(_GOOD_FFT))
    assert state(chunks) == before


def test_applying_after_ddp_wrapping_raises_and_changes_nothing():
    chunks = build()
    ddp = wrap_ddp(chunks)
    before = state(chunks)
    with pytest.raises(ValueError, match=r"chunk 0 is already wrapped in DistributedDataParallel"):
        apply_hybrid_plan(ddp, hybrid_plan(chunks))
    assert state(chunks) == before
    assert not list(iter_lora_modules(chunks))


# -- checkpoint keys --------------------------------------------------------------------------
class _FakeGroup:
    """Stands in for rank ``rank`` of a ``size``-rank TP group (only rank()/size() are read)."""

    def __init__(self, rank: int, size: int) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_sharded_state_dict_keeps_base_keys_and_adds_adapter_keys():
    chunks = build()
    base_keys = set(chunks[0].sharded_state_dict())
    plan = hybrid_plan(chunks)
    apply_hybrid_plan(chunks, plan)
    sd = chunks[0].sharded_state_dict()
    adapter_keys = {f"{n}.{p}" for n in plan.names("lora") for p in ("lora_A", "lora_B")}
    assert set(sd) == base_keys | adapter_keys
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in sd
    assert not any("base_layer" in k for k in sd)
    for key in adapter_keys:
        owner = chunks[0].get_submodule(key.rsplit(".", 1)[0])
        param = getattr(owner, key.rsplit(".", 1)[1])
        entry = sd[key]
        if key.endswith("linear_fc1.lora_B"):
            assert isinstance(entry, ShardedTensorFactory)  # gate/up rows reshard separately
        else:
            assert isinstance(entry, ShardedTensor)
        assert entry.data is param


@pytest.mark.parametrize(
    ("module", "sharded", "axis"),
    [
        ("decoder.layers.0.self_attention.linear_proj", "lora_A", 1),
        ("decoder.layers.0.mlp.linear_fc2", "lora_A", 1),
        ("decoder.layers.0.self_attention.linear_qkv", "lora_B", 0),
    ],
)
def test_adapter_checkpoint_layout_at_a_simulated_tp2_rank1(module, sharded, axis):
    """The TP group of the wrapper is faked as rank 1 of 2 to read off the sharding metadata."""
    chunks = build()
    apply_hybrid_plan(chunks, lora_only_plan(chunks))
    wrapper = chunks[0].get_submodule(module)
    wrapper.tp_group = _FakeGroup(rank=1, size=2)
    sd = chunks[0].sharded_state_dict()
    replicated = "lora_B" if sharded == "lora_A" else "lora_A"

    sh = sd[f"{module}.{sharded}"]
    local = getattr(wrapper, sharded).shape
    global_shape = list(local)
    global_shape[axis] *= 2
    offset = [0, 0]
    offset[axis] = local[axis]
    # The decoder prepends a layer axis: (layer 0 of 2, *matrix axes).
    assert sh.global_shape == (2, *global_shape) and sh.global_offset == (0, *offset)
    assert sh.axis_fragmentations == (2, *(2 if a == axis else 1 for a in range(2)))
    assert sh.replica_id == (0, 0, 0)

    rep = sd[f"{module}.{replicated}"]
    assert rep.global_shape == (2, *getattr(wrapper, replicated).shape)
    assert rep.axis_fragmentations == (2, 1, 1)
    assert rep.replica_id == (0, 1, 0)  # a replica of TP rank 0's copy: not saved twice


def test_gated_fc1_lora_b_factory_splits_gate_and_up_rows_at_a_simulated_tp2_rank1():
    chunks = build()
    apply_hybrid_plan(chunks, lora_only_plan(chunks))
    name = "decoder.layers.0.mlp.linear_fc1"
    wrapper = chunks[0].get_submodule(name)
    wrapper.tp_group = _FakeGroup(rank=1, size=2)
    factory = chunks[0].sharded_state_dict()[f"{name}.lora_B"]
    assert isinstance(factory, ShardedTensorFactory)
    gate, up = factory.build()
    rows = wrapper.lora_B.shape[0] // 2  # this rank's gate rows, then its up rows
    # After the decoder's layer axis: gate rows are fragment 1 of 4, up rows fragment 3 of 4.
    assert gate.global_shape == up.global_shape == (2, 4 * rows, LORA.rank)
    assert (gate.global_offset, up.global_offset) == ((0, rows, 0), (0, 3 * rows, 0))
    assert torch.equal(gate.data, wrapper.lora_B[:rows])
    assert torch.equal(up.data, wrapper.lora_B[rows:])


def test_sharded_state_dict_refuses_a_merged_model():
    chunks = build()
    apply_hybrid_plan(chunks, lora_only_plan(chunks))
    next(iter_lora_modules(chunks)).merge()
    with pytest.raises(RuntimeError, match="unmerge before saving"):
        chunks[0].sharded_state_dict()


def test_wrapper_sharded_state_dict_works_without_metadata():
    chunks = build()
    apply_hybrid_plan(chunks, lora_only_plan(chunks))
    wrapper = chunks[0].get_submodule("decoder.layers.0.mlp.linear_fc2")
    assert isinstance(wrapper, LoRAParallelLinear)
    assert set(wrapper.sharded_state_dict("p.")) >= {"p.weight", "p.lora_A", "p.lora_B"}


def test_summary_is_a_plan_summary():
    chunks = build()
    assert isinstance(apply_hybrid_plan(chunks, hybrid_plan(chunks)), PlanSummary)


@pytest.mark.multirank
def test_a_plan_invalid_on_one_pipeline_stage_fails_on_every_stage_unapplied():
    from tests.multirank import launch, worker_path

    out = launch(worker_path("plan_validation_pp"), 2, timeout=180).stdout
    assert "OK rank 0" in out and "OK rank 1" in out, out


# -- Megatron call contracts the wrappers must keep --------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "fft"])
def test_a_tied_output_layer_is_refused_naming_it(mode):
    """Megatron builds a tied output layer without a weight (it borrows the embedding's)."""
    from dataclasses import replace

    chunks = build(replace(MODEL, untie_embeddings_and_output_weights=False))
    before = state(chunks)
    with pytest.raises(ValueError, match=r"output_layer: has no weight of its own .*untie"):
        apply_hybrid_plan(chunks, _plan(_GOOD, ("output_layer", ModuleDecision(mode))))
    assert state(chunks) == before


def test_lora_b_keeps_the_base_weights_partition_stride():
    """The gated fc1's local rows are [gate_i; up_i] like its weight (stride 2); qkv's stride 1."""
    chunks = build()
    apply_hybrid_plan(chunks, lora_only_plan(chunks))
    for kind_, stride in (("mlp.linear_fc1", 2), ("self_attention.linear_qkv", 1)):
        wrapper = chunks[0].get_submodule(f"decoder.layers.0.{kind_}")
        assert wrapper.base_layer.weight.partition_stride == stride
        assert wrapper.lora_B.partition_stride == stride


def test_delayed_weight_gradient_calls_reach_the_base_layers(monkeypatch):
    """Attention and MLP call backward_dw() on their linears (delay_wgrad_compute)."""
    chunks = build()
    apply_hybrid_plan(chunks, lora_only_plan(chunks))
    layer = chunks[0].decoder.layers[0]
    called = []
    for wrapper in iter_lora_modules([layer]):
        monkeypatch.setattr(
            # (0.16.1's local RowParallelLinear has no backward_dw of its own; TE's layers do)
            wrapper.base_layer,
            "backward_dw",
            lambda n=wrapper.name: called.append(n),
            raising=False,
        )
    layer.self_attention.backward_dw()
    layer.mlp.backward_dw()
    assert sorted(called) == sorted(w.name for w in iter_lora_modules([layer]))


@pytest.mark.parametrize(
    ("gather_output", "args", "kwargs", "gathers"),
    [
        (False, (), {}, False),
        (True, (), {}, True),
        (True, (), {"runtime_gather_output": False}, False),
        (False, (), {"runtime_gather_output": True}, True),
        (True, (None, False), {}, False),  # positional, after weight
        (False, (None, True), {}, True),
    ],
)
def test_the_adapter_gathers_its_output_exactly_when_the_base_does(
    monkeypatch, gather_output, args, kwargs, gathers
):
    """Megatron's rule: an explicit runtime_gather_output overrides the layer's gather_output."""
    import megatron.core.tensor_parallel.layers as layers

    import megatron_hybrid.peft.lora as lora_mod

    chunks = build()
    apply_hybrid_plan(chunks, lora_only_plan(chunks))
    wrapper = chunks[0].get_submodule("decoder.layers.0.self_attention.linear_qkv")
    wrapper.base_layer.gather_output = gather_output
    calls = {"base": 0, "adapter": 0}

    def counting(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(
        layers,
        "gather_from_tensor_model_parallel_region",
        counting("base", layers.gather_from_tensor_model_parallel_region),
    )
    monkeypatch.setattr(
        lora_mod,
        "gather_from_tensor_model_parallel_region",
        counting("adapter", lora_mod.gather_from_tensor_model_parallel_region),
    )
    x = torch.randn(3, 2, MODEL.hidden_size)
    wrapper(x, *args, **kwargs)
    assert calls == {"base": int(gathers), "adapter": int(gathers)}
