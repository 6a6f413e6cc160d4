"""Calibration passes on a tiny GPTModel in one process.

* ``accumulate_gradients`` against plain autograd: the sum over K steps of the gradient of each
  step's per-token-mean loss, with the model called directly (labels + loss mask), no schedule.
* ``probe_weight_deltas`` against a plain AdamW loop on the same per-token-mean loss, plus the
  bitwise restore of the base weights and the independence of probe groups.
* Both leave ``requires_grad`` flags, ``.grad`` and the model config as they found them.
"""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.data.arith import ArithTask
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.runtime.distributed import ParallelConfig
from megatron_hybrid.scoring.calibration import (
    ProbeConfig,
    accumulate_gradients,
    probe_weight_deltas,
)
from megatron_hybrid.scoring.job import task_batch_source
from megatron_hybrid.scoring.run import local_candidates
from megatron_hybrid.train.quickstart import RunConfig
from tests.tiny_hybrid import MODEL

RUN = RunConfig(global_batch_size=4, micro_batch_size=2, seq_length=16)
# A large eps keeps Adam's first steps away from sign(g), so float round-off stays small.
PROBE = ProbeConfig(steps=2, lr=1e-2, eps=1e-3)

pytestmark = pytest.mark.usefixtures("single_rank_runtime")


# -- helpers ----------------------------------------------------------------------------------
def build() -> list[torch.nn.Module]:
    return build_model(MODEL, ParallelConfig())


def batches():
    return task_batch_source(ArithTask(), RUN)


def weight(ref) -> torch.nn.Parameter:
    return getattr(ref.module, "base_layer", ref.module).weight


def mean_token_loss(model: torch.nn.Module, micro_batches) -> torch.Tensor:
    """Per-token-mean loss over all micro-batches of one step, the model called directly."""
    total = torch.zeros((), dtype=torch.float32)
    tokens = sum(b.loss_mask.sum() for b in micro_batches)
    for b in micro_batches:
        losses = model(b.tokens, b.position_ids, None, labels=b.labels)  # [b, s] per-token loss
        assert losses.shape == b.tokens.shape
        total = total + (losses.float() * b.loss_mask).sum()
    return total / tokens


def reference_gradients(model, refs, source, k: int) -> dict[str, torch.Tensor]:
    weights = [weight(r) for r in refs]
    out = {r.name: torch.zeros_like(w) for r, w in zip(refs, weights)}
    for step in range(k):
        grads = torch.autograd.grad(mean_token_loss(model, source(step)), weights)
        for r, g in zip(refs, grads):
            out[r.name] += g
    return out


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not k.endswith("_extra_state")
    }


def assert_bitwise_equal(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed, f"changed: {changed}"


def mark_flags_and_grads(model: torch.nn.Module) -> tuple[list[bool], list]:
    """Give the model a non-default trainable set and some stale .grad tensors to keep."""
    params = list(model.parameters())
    for i, p in enumerate(params):
        p.requires_grad_(i % 3 != 0)
        p.grad = torch.full_like(p, float(i)) if i % 2 == 0 else None
    return [p.requires_grad for p in params], [p.grad for p in params]


def assert_flags_and_grads(model: torch.nn.Module, flags: list[bool], grads: list) -> None:
    params = list(model.parameters())
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is g for p, g in zip(params, grads)), ".grad objects must be the saved ones"


# -- accumulate_gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_accumulated_gradients_equal_plain_autograd(k):
    chunks = build()
    refs = local_candidates(chunks)
    assert len(refs) == 8
    got = accumulate_gradients(chunks, refs, batches(), k)
    want = reference_gradients(chunks[0], refs, batches(), k)
    assert set(got) == set(want)
    for name, g in want.items():
        assert got[name].dtype == torch.float32 and got[name].shape == g.shape
        assert g.abs().max() > 0, f"{name}: zero reference gradient makes the test vacuous"
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_full_activation_recompute_gives_the_same_gradients():
    """Megatron's full recompute (a reentrant autograd Function per layer) passes gradients only
    if the decoder input requires grad; with frozen embeddings it did not, and every gradient was
    silently zero. The provider's hook makes it require grad."""
    import dataclasses

    plain = build()
    recompute = build_model(
        dataclasses.replace(MODEL, recompute_granularity="full"), ParallelConfig()
    )
    recompute[0].load_state_dict(plain[0].state_dict())
    want = accumulate_gradients(plain, local_candidates(plain), batches(), 2)
    got = accumulate_gradients(recompute, local_candidates(recompute), batches(), 2)
    for name, g in want.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_accumulated_gradients_of_a_subset_equal_those_of_all_candidates():
    chunks = build()
    refs = local_candidates(chunks)
    every = accumulate_gradients(chunks, refs, batches(), 2)
    some = accumulate_gradients(chunks, refs[1::3], batches(), 2)
    assert set(some) == {r.name for r in refs[1::3]}
    for name, g in some.items():
        torch.testing.assert_close(g, every[name], atol=1e-6, rtol=1e-5)


def test_accumulate_gradients_restores_flags_grads_config_and_weights():
    chunks = build()
    refs = local_candidates(chunks)
    config = chunks[0].config
    saved = (config.finalize_model_grads_func, config.calculate_per_token_loss, config.no_sync_func)
    flags, grads = mark_flags_and_grads(chunks[0])
    before = snapshot(chunks[0])
    progress: list[int] = []
    accumulate_gradients(chunks, refs, batches(), 3, progress=progress.append)
    assert progress == [0, 1, 2]
    assert_flags_and_grads(chunks[0], flags, grads)
    assert (
        config.finalize_model_grads_func,
        config.calculate_per_token_loss,
        config.no_sync_func,
    ) == saved
    assert_bitwise_equal(chunks[0], before)


@pytest.mark.parametrize("k", [0, -1])
def test_fewer_than_one_calibration_batch_is_an_error(k):
    chunks = build()
    with pytest.raises(ValueError, match=rf"at least one batch, got num_batches={k}"):
        accumulate_gradients(chunks, local_candidates(chunks), batches(), k)


def test_a_nan_weight_is_a_floating_point_error_naming_the_module_and_the_batch():
    chunks = build()
    ref = next(r for r in local_candidates(chunks) if r.name == "decoder.layers.1.mlp.linear_fc2")
    flags, grads = mark_flags_and_grads(chunks[0])

    def poison(k: int) -> None:  # after batch 0 succeeded, break the module for batch 1
        with torch.no_grad():
            weight(ref)[0, 0] = float("nan")

    with pytest.raises(
        FloatingPointError,
        match=r"decoder\.layers\.1\.mlp\.linear_fc2: non-finite values in the gradient of calibration batch 1",
    ):
        accumulate_gradients(chunks, [ref], batches(), 3, progress=poison)
    assert_flags_and_grads(chunks[0], flags, grads)


def test_a_batch_without_loss_tokens_is_an_error_naming_the_batch_not_a_module():
    """Before, 0 / 0 surfaced as the first module's 'non-finite values in the gradient'."""
    chunks = build()
    source = batches()

    def masked(k: int):
        micro = source(k)
        if k == 1:
            for b in micro:
                b.loss_mask.zero_()
        return micro

    with pytest.raises(ValueError, match=r"calibration batch 1 has no loss tokens"):
        accumulate_gradients(chunks, local_candidates(chunks), masked, 2)
    with pytest.raises(ValueError, match=r"probe step 1 has no loss tokens"):
        probe_weight_deltas(chunks, local_candidates(chunks), masked, PROBE)


# -- probe_weight_deltas ----------------------------------------------------------------------
def reference_probe(model, ref, source, cfg: ProbeConfig) -> tuple[torch.Tensor, float]:
    """One module trained alone by a plain AdamW loop on the per-token-mean loss."""
    w = weight(ref)
    base = w.detach().clone()
    master = base.clone().requires_grad_(True)
    opt = torch.optim.AdamW(
        [master], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    for step in range(cfg.steps):
        (master.grad,) = torch.autograd.grad(mean_token_loss(model, source(step)), [w])
        opt.step()
        with torch.no_grad():
            w.copy_(master)
    with torch.no_grad():
        w.copy_(base)
    state = opt.state[master]
    m_hat = state["exp_avg"] / (1 - cfg.betas[0] ** cfg.steps)
    v_hat = state["exp_avg_sq"] / (1 - cfg.betas[1] ** cfg.steps)
    return (master.detach() - base), float((m_hat**2 / (v_hat.sqrt() + cfg.eps)).sum())


def test_probe_of_one_module_equals_a_plain_adamw_loop():
    chunks = build()
    refs = local_candidates(chunks)
    ref = next(r for r in refs if r.name == "decoder.layers.0.self_attention.linear_qkv")
    got = probe_weight_deltas(chunks, [ref], batches(), PROBE)
    delta, epd = reference_probe(chunks[0], ref, batches(), PROBE)
    torch.testing.assert_close(got.delta[ref.name], delta, atol=1e-6, rtol=1e-4)
    assert got.epd_local[ref.name] == pytest.approx(epd, rel=1e-4)


@pytest.mark.parametrize("group_size", [None, 1, 2])
def test_probe_restores_base_weights_bitwise_and_moves_every_module(group_size):
    chunks = build()
    refs = local_candidates(chunks)
    before = snapshot(chunks[0])
    flags, grads = mark_flags_and_grads(chunks[0])
    done: list[int] = []
    cfg = ProbeConfig(steps=2, lr=1e-2, eps=1e-3, group_size=group_size)
    result = probe_weight_deltas(chunks, refs, batches(), cfg, progress=done.append)
    assert_bitwise_equal(chunks[0], before)
    assert_flags_and_grads(chunks[0], flags, grads)
    groups = -(-len(refs) // (group_size or len(refs)))
    assert done == list(range(1, groups * cfg.steps + 1))
    assert set(result.delta) == set(result.epd_local) == {r.name for r in refs}
    for r in refs:
        d = result.delta[r.name]
        assert d.dtype == torch.float32 and d.shape == weight(r).shape
        assert d.abs().max() > 0, f"{r.name}: the probe did not move the weight"
        assert result.epd_local[r.name] > 0


def test_probe_takes_every_steps_data_from_the_base():
    """A source that samples from the model (policy gradient) must see the base weights for all
    P steps, whatever the group; before, step k >= 1 was drawn after the first group's updates."""
    chunks = build()
    refs = local_candidates(chunks)
    base = [weight(r).detach().clone() for r in refs]
    source, seen = batches(), []

    def recording(k):
        seen.append(all(torch.equal(weight(r), b) for r, b in zip(refs, base)))
        return source(k)

    probe_weight_deltas(chunks, refs, recording, ProbeConfig(steps=3, lr=1e-2, group_size=3))
    assert seen and all(seen)


def test_probe_hands_each_change_over_as_its_group_finishes():
    """With ``on_delta`` the probe keeps no change itself (memory: one group's fp32 changes at a
    time, not 4 bytes per candidate parameter); the changes are the ones it would return."""
    chunks = build()
    refs = local_candidates(chunks)
    cfg = ProbeConfig(steps=2, lr=1e-2, group_size=3)
    want = probe_weight_deltas(chunks, refs, batches(), cfg).delta
    got: dict[str, torch.Tensor] = {}

    def take(name, delta):
        got[name] = delta

    result = probe_weight_deltas(chunks, refs, batches(), cfg, on_delta=take)
    assert result.delta == {} and set(result.epd_local) == set(want)
    assert list(got) == [r.name for r in refs]
    for name, delta in want.items():
        torch.testing.assert_close(got[name], delta, rtol=0, atol=0, msg=name)


def test_probe_groups_train_alone():
    chunks = build()
    refs = local_candidates(chunks)
    one = probe_weight_deltas(
        chunks, refs, batches(), ProbeConfig(steps=2, lr=1e-2, eps=1e-3, group_size=1)
    )
    two = probe_weight_deltas(
        chunks, refs, batches(), ProbeConfig(steps=2, lr=1e-2, eps=1e-3, group_size=2)
    )
    together = probe_weight_deltas(chunks, refs, batches(), PROBE)
    for i, r in enumerate(refs):
        alone = probe_weight_deltas(chunks, [r], batches(), PROBE)
        assert torch.equal(one.delta[r.name], alone.delta[r.name]), r.name
        assert one.epd_local[r.name] == alone.epd_local[r.name]
        if i % 2 == 0:
            pair = probe_weight_deltas(chunks, refs[i : i + 2], batches(), PROBE)
            for n, d in pair.delta.items():
                assert torch.equal(two.delta[n], d), n
    # Training modules together changes what each one learns after the first step.
    assert any(not torch.allclose(one.delta[r.name], together.delta[r.name]) for r in refs)


def test_probe_restores_base_weights_when_it_fails():
    chunks = build()
    refs = local_candidates(chunks)
    before = snapshot(chunks[0])
    source = batches()

    def failing(step: int):
        if step == 1:
            raise RuntimeError("data loader died")
        return source(step)

    with pytest.raises(RuntimeError, match="data loader died"):
        probe_weight_deltas(chunks, refs, failing, PROBE)
    assert_bitwise_equal(chunks[0], before)
    assert all(p.requires_grad for p in chunks[0].parameters())


# -- ProbeConfig ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"group_size": 0}, "group_size"),
        ({"group_size": 1.5}, "group_size"),
    ],
)
def test_probe_config_rejects_bad_values_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"score\.probe\.{key} must be"):
        ProbeConfig(**kw)


def test_probe_config_betas_become_a_tuple():
    assert ProbeConfig(betas=[0.8, 0.99]).betas == (0.8, 0.99)


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9,)}, "betas"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
    ],
)
def test_probe_config_rejects_bad_adam_settings_naming_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"score\.probe\.{key}"):
        ProbeConfig(**kw)
