"""Each CPU compatibility patch makes its Megatron code path run on a machine without CUDA.

``CHECKS`` maps every module listed in ``cpu_compat.PATCHES`` to a function that drives the
CUDA-assuming code of that module (device plumbing only) and checks the result; a patch without a
check fails :func:`test_every_patch_has_a_check`. These tests only mean something without CUDA:
on a GPU machine they are skipped, because the patches are not applied there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

import pytest
import torch

from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.runtime import cpu_compat
from megatron_hybrid.runtime.cpu_compat import FUNCTION_PATCHES, PATCHES, CPURNGStatesTracker
from tests.multirank import REPO_ROOT, launch, worker_path

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU compatibility patches apply only without CUDA"
)

TINY = ModelConfig(
    num_layers=1,
    hidden_size=32,
    num_attention_heads=2,
    ffn_hidden_size=64,
    vocab_size=32,
    max_sequence_length=16,
)


def _tiny_model():
    from megatron_hybrid.models.provider import build_model
    from megatron_hybrid.runtime.distributed import ParallelConfig

    return build_model(TINY, ParallelConfig())[0]


def _loss(model, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(
        0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed)
    )
    position_ids = torch.arange(8).expand(2, 8)
    return model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).float().mean()


def _ddp(model):
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)
    return DistributedDataParallel(model.config, ddp_config, model)


def check_schedules() -> None:
    """``forward_backward_no_pipelining`` allocates ``total_num_tokens`` on "cuda"."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining

    model = _tiny_model()
    assert get_forward_backward_func() is forward_backward_no_pipelining

    def forward_step(data_iterator, model):
        seed = next(data_iterator)
        loss = _loss(model, seed)
        return loss, lambda out: (out, {"loss": out.detach()})

    losses = forward_backward_no_pipelining(
        forward_step_func=forward_step,
        data_iterator=iter([0, 1]),
        model=[model],
        num_microbatches=2,
        seq_length=8,
        micro_batch_size=2,
        forward_only=False,
    )
    assert len(losses) == 2
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def check_p2p_communication() -> None:
    """Receive buffers on ``current_device()`` and ``synchronize()``: needs two pipeline ranks."""
    proc = launch(worker_path("p2p_exchange"), 2, timeout=180)
    for mode in ("p2p", "p2p-variable-shapes", "batched-synced"):
        assert proc.stdout.count(f": {mode} ok") == 2, proc.stdout


def check_tensor_parallel_layers() -> None:
    """Parameters on ``current_device()`` without CPU init; SP backward buffers (2 TP ranks)."""
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    config = ModelParallelConfig(use_cpu_initialization=False, params_dtype=torch.float32)
    init = torch.nn.init.ones_
    layers = [
        ColumnParallelLinear(4, 6, config=config, init_method=init, bias=True),
        RowParallelLinear(
            6,
            4,
            config=config,
            init_method=init,
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
        ),
        VocabParallelEmbedding(16, 4, config=config, init_method=init),
    ]
    for layer in layers:
        assert all(p.device.type == "cpu" for p in layer.parameters())
        assert torch.equal(layer.weight, torch.ones_like(layer.weight))
    proc = launch(worker_path("tensor_parallel_sp"), 2, "--part", "layers", timeout=180)
    assert proc.stdout.count(": layers ok") == 2, proc.stdout


def check_tensor_parallel_mappings() -> None:
    """Sequence-parallel gather / reduce-scatter outputs on ``current_device()`` (2 TP ranks)."""
    proc = launch(worker_path("tensor_parallel_sp"), 2, "--part", "mappings", timeout=180)
    assert proc.stdout.count(": mappings ok") == 2, proc.stdout


def check_attention() -> None:
    """The inference KV-cache buffer of ``Attention`` is allocated on ``current_device()``."""
    attention = _tiny_model().decoder.layers[0].self_attention
    buffer = attention._allocate_memory(8, 2, TINY.head_dim, torch.float32)
    assert buffer.device.type == "cpu"
    assert buffer.shape == (8, 2, attention.num_query_groups_per_partition, TINY.head_dim)


def check_dot_product_attention() -> None:
    """``softmax_offset`` of the off-by-one / learnable softmax is created on ``current_device()``."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_hybrid.models.provider import transformer_config
    from megatron_hybrid.runtime.distributed import ParallelConfig

    config = transformer_config(TINY, ParallelConfig())
    q = torch.randn(8, 2, 2, TINY.head_dim)
    for softmax_type in ("off-by-one", "learnable"):
        config.softmax_type = softmax_type
        attention = DotProductAttention(
            config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
        )
        assert attention.softmax_offset.device.type == "cpu"
        out = attention(q, q, q, attention_mask=None)
        assert out.shape == (8, 2, TINY.hidden_size)
        assert torch.isfinite(out).all()


def check_rotary_pos_embedding() -> None:
    """RoPE moves its inverse frequencies to ``current_device()`` on first use."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    for cpu_init in (True, False):
        rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=cpu_init)
        emb = rope(6)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
        freqs = torch.outer(torch.arange(6, dtype=torch.float32), inv_freq)
        expected = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
        torch.testing.assert_close(emb, expected)


def check_transformer_utils() -> None:
    """The default causal and sliding-window masks are built on "cuda"."""
    from megatron.core.transformer.utils import (
        get_default_causal_mask,
        get_sliding_window_causal_mask,
    )

    mask = get_default_causal_mask(4)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(diagonal=1))
    window = get_sliding_window_causal_mask(4, 4, (1, 0))
    assert window.device.type == "cpu"
    assert window.sum() == 16 - 7  # the diagonal and one sub-diagonal are visible


def check_utils() -> None:
    """``GlobalMemoryBuffer.get_tensor`` (attention scores) allocates on ``current_device()``."""
    from megatron.core.utils import GlobalMemoryBuffer

    buffers = GlobalMemoryBuffer()
    first = buffers.get_tensor((2, 3), torch.float32, "scores")
    second = buffers.get_tensor((3, 2), torch.float32, "scores")
    assert first.device.type == "cpu" and second.shape == (3, 2)
    assert first.data_ptr() == second.data_ptr()  # reused, not reallocated


def check_param_and_grad_buffer() -> None:
    """DDP's contiguous grad buffer is allocated on ``current_device()``."""
    model = _tiny_model()
    ddp = _ddp(model)
    grad_data = ddp.buffers[0].grad_data
    assert grad_data.device.type == "cpu"
    assert grad_data.numel() >= sum(p.numel() for p in model.parameters())
    _loss(ddp).backward()
    ddp.finish_grad_sync()
    assert all(p.main_grad.abs().sum() > 0 for p in model.parameters())


def check_distributed_data_parallel() -> None:
    """Grad-buffer offload/restore calls ``torch.cuda.synchronize()``."""
    ddp = _ddp(_tiny_model())
    buffer = ddp.buffers[0]
    size = buffer.grad_data.untyped_storage().size()
    ddp.offload_grad_buffers(synchronize=True, empty_cache=True)
    assert buffer.grad_data.untyped_storage().size() == 0
    ddp.restore_grad_buffers(synchronize=True)
    assert buffer.grad_data.untyped_storage().size() == size


def check_optimizer() -> None:
    """Megatron's optimizer wrappers create their scale tensors with ``device='cuda'``."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = _tiny_model()
    ddp = _ddp(model)
    config = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0)  # see the clipping test
    optimizer = get_megatron_optimizer(config, [ddp])
    assert optimizer.get_loss_scale().device.type == "cpu"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    _loss(ddp).backward()
    ddp.finish_grad_sync()
    success, grad_norm, _ = optimizer.step()
    assert success and grad_norm > 0  # the norm is still computed (clip_grads patch)
    for name, param in model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not move"


def check_clip_grads() -> None:
    """Grad-norm and zero-count accumulators are created with ``device='cuda'``."""
    from megatron.core import parallel_state
    from megatron.core.optimizer.clip_grads import count_zeros_fp32, get_grad_norm_fp32

    grads = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0, 4.0]]), torch.tensor([-12.0])]
    group = parallel_state.get_model_parallel_group()
    assert get_grad_norm_fp32(grads, 2, group) == pytest.approx(13.0)
    assert get_grad_norm_fp32(grads, float("inf"), group) == pytest.approx(12.0)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    assert count_zeros_fp32(params, group) == 2


def check_grad_scaler() -> None:
    """Loss-scale tensors are created with ``device='cuda'`` (fp16 training)."""
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

    assert ConstantGradScaler(4.0).scale.device.type == "cpu"
    scaler = DynamicGradScaler(
        initial_scale=8.0,
        min_scale=1.0,
        growth_factor=2.0,
        backoff_factor=0.5,
        growth_interval=1,
        hysteresis=1,
    )
    scaler.update(found_inf=True)
    assert scaler.scale.item() == 4.0 and scaler.scale.device.type == "cpu"
    scaler.update(found_inf=False)
    assert scaler.scale.item() == 8.0
    assert scaler.inv_scale.item() == 0.125


def check_filesystem_async() -> None:
    """The async checkpoint writer synchronizes CUDA after preloading tensors to host memory."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync,
    )

    tensor = torch.arange(6.0)
    buckets = [("file_0.distcp", "key", ([], [("item", tensor)]))]
    loaded = FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True)
    ((_, _, (_, [(_, copy)])),) = loaded
    assert copy.device.type == "cpu" and torch.equal(copy, tensor)


def check_state_dict_saver() -> None:
    """Save finalisation broadcasts a failure flag created on ``current_device()``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies import state_dict_saver

    model = _tiny_model()
    # The synchronous save always finalises through state_dict_saver (the patched module); a
    # spy on it is not reliable once other tests have cached a save strategy, so the check is the
    # round trip itself.
    assert state_dict_saver.torch is not torch, "state_dict_saver is not patched"
    with tempfile.TemporaryDirectory() as directory:
        dist_checkpointing.save(model.sharded_state_dict(), directory)
        restored = _tiny_model()
        for param in restored.parameters():
            param.data.zero_()
        restored.load_state_dict(dist_checkpointing.load(restored.sharded_state_dict(), directory))
    for name, param in model.named_parameters():
        assert torch.equal(restored.get_parameter(name), param), name


CHECKS: dict[str, Callable[[], None]] = {
    "megatron.core.pipeline_parallel.schedules": check_schedules,
    "megatron.core.pipeline_parallel.p2p_communication": check_p2p_communication,
    "megatron.core.tensor_parallel.layers": check_tensor_parallel_layers,
    "megatron.core.tensor_parallel.mappings": check_tensor_parallel_mappings,
    "megatron.core.transformer.attention": check_attention,
    "megatron.core.transformer.dot_product_attention": check_dot_product_attention,
    "megatron.core.models.common.embeddings.rotary_pos_embedding": check_rotary_pos_embedding,
    "megatron.core.transformer.utils": check_transformer_utils,
    "megatron.core.utils": check_utils,
    "megatron.core.distributed.param_and_grad_buffer": check_param_and_grad_buffer,
    "megatron.core.distributed.distributed_data_parallel": check_distributed_data_parallel,
    "megatron.core.optimizer.optimizer": check_optimizer,
    "megatron.core.optimizer.clip_grads": check_clip_grads,
    "megatron.core.optimizer.grad_scaler": check_grad_scaler,
    "megatron.core.dist_checkpointing.strategies.filesystem_async": check_filesystem_async,
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": check_state_dict_saver,
}
MULTIRANK_CHECKS = {
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
}


def test_every_patch_has_a_check() -> None:
    assert {p.module for p in PATCHES} == set(CHECKS)


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(
            p.module,
            id=p.module.removeprefix("megatron.core."),
            marks=[pytest.mark.multirank] if p.module in MULTIRANK_CHECKS else [],
        )
        for p in PATCHES
    ],
)
def test_patch_makes_cpu_path_work(single_rank_runtime, module: str) -> None:
    assert cpu_compat.cpu_patches_active()
    CHECKS[module]()


def test_function_patches_are_installed(single_rank_runtime) -> None:
    import importlib

    for fpatch in FUNCTION_PATCHES:
        for module in fpatch.modules:
            assert getattr(importlib.import_module(module), fpatch.name) is fpatch.replacement


def test_optimizer_clips_grads_on_cpu(single_rank_runtime) -> None:
    """``clip_grad > 0`` through Megatron's optimizer (its CUDA-type assert replaced): the step
    reports the pre-clip norm and leaves exactly ``torch.nn.utils.clip_grad_norm_``'s grads."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = _tiny_model()
    ddp = _ddp(model)
    clip = 1e-3
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=clip), [ddp]
    )
    optimizer.zero_grad()
    _loss(ddp).backward()
    ddp.finish_grad_sync()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    reference = [torch.nn.Parameter(model.get_parameter(n).detach().clone()) for n in names]
    for ref, name in zip(reference, names, strict=True):
        ref.grad = model.get_parameter(name).main_grad.detach().clone()
    want_norm = float(torch.nn.utils.clip_grad_norm_(reference, clip))
    assert want_norm > 10 * clip  # clipping binds

    success, grad_norm, _ = optimizer.step()
    assert success
    assert grad_norm == pytest.approx(want_norm, rel=1e-5)
    for ref, name in zip(reference, names, strict=True):
        torch.testing.assert_close(model.get_parameter(name).grad, ref.grad, msg=name)


def test_rng_tracker_forks_continue_their_stream(single_rank_runtime) -> None:
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, CPURNGStatesTracker)
    assert set(tracker.get_states()) == {
        "data-parallel-rng",
        "model-parallel-rng",
        "expert-parallel-rng",
    }
    default_state = torch.get_rng_state()
    expected_default = torch.rand(4)
    torch.set_rng_state(default_state)

    with tracker.fork("model-parallel-rng"):
        first = torch.rand(4)
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(4)

    # seed 1234 + 2718 + tp_rank: Megatron's model-parallel seed for TP rank 0
    stream = torch.Generator().manual_seed(1234 + 2718)
    torch.testing.assert_close(first, torch.rand(4, generator=stream), rtol=0, atol=0)
    torch.testing.assert_close(second, torch.rand(4, generator=stream), rtol=0, atol=0)
    assert not torch.equal(first, second)
    torch.testing.assert_close(torch.rand(4), expected_default, rtol=0, atol=0)


def test_rng_tracker_states_round_trip_and_reject_duplicates() -> None:
    tracker = CPURNGStatesTracker()
    assert not tracker.is_initialized()
    tracker.add("a", 1)
    with pytest.raises(ValueError):
        tracker.add("b", 1)
    with pytest.raises(ValueError):
        tracker.add("a", 2)
    with pytest.raises(KeyError), tracker.fork("missing"):
        pass
    saved = tracker.get_states()
    with tracker.fork("a"):
        draw = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), draw)


def test_activation_recompute_runs(single_rank_runtime) -> None:
    import dataclasses

    from megatron_hybrid.models.provider import build_model
    from megatron_hybrid.runtime.distributed import ParallelConfig

    model = build_model(dataclasses.replace(TINY, recompute_granularity="full"), ParallelConfig())[
        0
    ]
    _loss(model).backward()


def test_no_patches_when_cuda_is_available() -> None:
    code = """
import importlib
import torch
torch.cuda.is_available = lambda: True
from megatron_hybrid.runtime import cpu_compat
from megatron.core.tensor_parallel import random as mcore_random
assert cpu_compat.apply_cpu_compat_patches() is False
assert not cpu_compat.cpu_patches_active()
for patch in cpu_compat.PATCHES:
    module = importlib.import_module(patch.module)
    assert module.torch is torch, patch.module
assert not isinstance(mcore_random._CUDA_RNG_STATE_TRACKER, cpu_compat.CPURNGStatesTracker)
print("untouched")
"""
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "untouched" in proc.stdout


def test_every_patch_target_exists_in_this_megatron_core(monkeypatch) -> None:
    """A Megatron-Core that renamed a patched function would get a new, unused attribute
    instead; the check names it (and apply_cpu_compat_patches refuses before patching)."""
    from megatron.core.optimizer import clip_grads

    from megatron_hybrid.runtime.cpu_compat import missing_patch_targets

    assert missing_patch_targets() == []
    monkeypatch.delattr(clip_grads, "clip_grad_by_total_norm_fp32")
    assert missing_patch_targets() == [
        "megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32"
    ]
