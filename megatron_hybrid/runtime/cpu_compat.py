"""Runtime compatibility patches that let Megatron-Core run on a machine without CUDA.

Megatron-Core assumes CUDA in a handful of places that are pure *device plumbing*: buffers
allocated on ``torch.cuda.current_device()``, literal ``device="cuda"`` scalars in the pipeline
schedules and the optimizer, ``torch.cuda.synchronize()`` around p2p communication, and a CUDA
RNG-state tracker used by dropout and activation recompute. None of these spots changes math.

This module is the project's one documented exception to "never monkeypatch Megatron": every
patch below is listed in :data:`PATCHES` with the reason it exists, is applied only when
``torch.cuda.is_available()`` is False, and is covered by ``tests/runtime/test_cpu_compat.py``.

Three mechanisms are used:

* **Device proxy** (:class:`_TorchDeviceProxy`): the module-global name ``torch`` inside a few
  Megatron modules is replaced by a proxy that forwards every attribute to the real ``torch`` except
  that tensor factories map ``device="cuda"`` to CPU and ``torch.cuda.current_device`` /
  ``torch.cuda.synchronize`` / ``torch.cuda.Stream`` become CPU no-ops. Nothing outside the listed
  modules sees the proxy.
* **Function replacement** (:data:`FUNCTION_PATCHES`): where Megatron *asserts* a CUDA tensor
  type rather than allocating on CUDA, the proxy cannot help; the function is replaced, in the
  modules that bound it, by one with the same math and no device assertion.
* **RNG tracker** (:class:`CPURNGStatesTracker`): a tracker with the same interface as Megatron's
  ``CudaRNGStatesTracker`` that forks the CPU generator instead of a CUDA one; it is installed as
  Megatron's global tracker.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "FUNCTION_PATCHES",
    "PATCHES",
    "CPURNGStatesTracker",
    "apply_cpu_compat_patches",
    "cpu_patches_active",
    "missing_patch_targets",
]


@dataclass(frozen=True)
class PatchInfo:
    """One compatibility patch: the Megatron module it touches and why."""

    module: str
    reason: str


#: Megatron modules whose global ``torch`` is replaced by the device proxy, and why.
PATCHES: tuple[PatchInfo, ...] = (
    PatchInfo(
        "megatron.core.pipeline_parallel.schedules",
        'total_num_tokens = torch.zeros(..., device="cuda") in every forward_backward_* schedule',
    ),
    PatchInfo(
        "megatron.core.pipeline_parallel.p2p_communication",
        "shape/recv buffers on torch.cuda.current_device(); torch.cuda.synchronize() after p2p",
    ),
    PatchInfo(
        "megatron.core.tensor_parallel.layers",
        "sequence-parallel all-gather buffer in the linear backward on torch.cuda.current_device()",
    ),
    PatchInfo(
        "megatron.core.tensor_parallel.mappings",
        "sequence-parallel gather / reduce-scatter outputs allocated on torch.cuda.current_device()",
    ),
    PatchInfo(
        "megatron.core.transformer.attention",
        "inference KV-cache buffers allocated on torch.cuda.current_device() (inference only)",
    ),
    PatchInfo(
        "megatron.core.transformer.dot_product_attention",
        "softmax_offset buffer (softmax_type off-by-one / learnable) on torch.cuda.current_device()",
    ),
    PatchInfo(
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "RoPE inverse frequencies moved to torch.cuda.current_device()",
    ),
    PatchInfo(
        "megatron.core.transformer.utils",
        'default causal and sliding-window masks built with torch.ones(..., device="cuda")',
    ),
    PatchInfo(
        "megatron.core.utils",
        "GlobalMemoryBuffer allocates on torch.cuda.current_device() (attention scores buffer)",
    ),
    PatchInfo(
        "megatron.core.distributed.param_and_grad_buffer",
        "DDP param/grad buffers allocated on torch.cuda.current_device()",
    ),
    PatchInfo(
        "megatron.core.distributed.distributed_data_parallel",
        "torch.cuda.synchronize()/Stream in offload_grad_buffers / restore_grad_buffers",
    ),
    PatchInfo(
        "megatron.core.optimizer.optimizer",
        "found_inf / scale tensors created with device='cuda'",
    ),
    PatchInfo(
        "megatron.core.optimizer.clip_grads",
        "grad-norm and zero-count accumulators created with device='cuda'",
    ),
    PatchInfo(
        "megatron.core.optimizer.grad_scaler",
        "loss-scale tensors created with device='cuda' (fp16 only; resuming fp16 on CPU is unsupported)",
    ),
    PatchInfo(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "torch.cuda.synchronize() / current_device() in the async checkpoint writer",
    ),
    PatchInfo(
        "megatron.core.dist_checkpointing.strategies.state_dict_saver",
        "save finalisation all-reduces a failure flag created on torch.cuda.current_device()",
    ),
)


def clip_grad_by_total_norm_cpu(
    parameters: Any,
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """Megatron's ``clip_grad_by_total_norm_fp32`` for CPU gradients (same math, in place).

    Scales every fp32 gradient by ``max_norm / (total_norm + 1e-6)`` when that is below 1.
    ``total_norm`` is the global norm Megatron already reduced over the model-parallel group
    (``get_grad_norm_fp32``), so every rank applies the same coefficient; nothing is communicated.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = []
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is None:
            continue
        if grad.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"gradient clipping expects fp32/bf16 main grads, got {grad.dtype}")
        grads.append(grad.to_local() if hasattr(grad, "to_local") else grad)
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


@dataclass(frozen=True)
class FunctionPatch:
    """A Megatron function replaced (in each module that bound its name) on CPU, and why."""

    modules: tuple[str, ...]
    name: str
    replacement: Any
    reason: str


#: Functions replaced without CUDA (the device proxy cannot fix a type assertion).
FUNCTION_PATCHES: tuple[FunctionPatch, ...] = (
    FunctionPatch(
        ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"),
        "clip_grad_by_total_norm_fp32",
        clip_grad_by_total_norm_cpu,
        "asserts param.grad.type() == 'torch.cuda.FloatTensor' before scaling the grads "
        "(optimizer clip_grad > 0)",
    ),
)


_FACTORIES = frozenset(
    {
        "zeros",
        "ones",
        "empty",
        "full",
        "tensor",
        "arange",
        "randn",
        "rand",
        "zeros_like",
        "empty_like",
        "ones_like",
        "full_like",
    }
)


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


class _CudaNamespaceProxy(types.SimpleNamespace):
    """Stands in for ``torch.cuda`` inside a patched module; unknown names go to ``torch.cuda``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args: Any, **_kwargs: Any) -> None:
        return None

    @staticmethod
    def Stream(*_args: Any, **_kwargs: Any) -> None:
        return None

    @staticmethod
    def stream(*_args: Any, **_kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def current_stream(*_args: Any, **_kwargs: Any) -> None:
        return None


class _TorchDeviceProxy(types.ModuleType):
    """Forwards to ``torch``; maps CUDA devices in tensor factories to CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaNamespaceProxy()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(torch, name)
        if name in _FACTORIES:

            def factory(*args: Any, **kwargs: Any) -> Any:
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)
                return attr(*args, **kwargs)

            return factory
        return attr


class CPURNGStatesTracker:
    """Megatron's RNG-state tracker interface over the CPU generator.

    Megatron keeps named CUDA RNG states (``model-parallel-rng`` differs across tensor-parallel
    ranks so that dropout on sharded activations draws independent masks) and forks them around
    dropout. This tracker does the same with ``torch.get_rng_state`` / ``torch.set_rng_state``.
    """

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


_APPLIED = False


def cpu_patches_active() -> bool:
    """True once :func:`apply_cpu_compat_patches` has patched this process."""
    return _APPLIED


#: Module attributes replaced below besides :data:`FUNCTION_PATCHES`.
_RNG_TARGETS = (
    "_CUDA_RNG_STATE_TRACKER",
    "_CUDA_RNG_STATE_TRACKER_INITIALIZED",
    "_get_cuda_rng_state",
    "_set_cuda_rng_state",
)


def missing_patch_targets() -> list[str]:
    """``module.name`` of every attribute the patches replace that this Megatron-Core lacks (a
    renamed function would otherwise be "patched" by adding a new, unused attribute)."""
    wanted = [(m, f.name) for f in FUNCTION_PATCHES for m in f.modules]
    wanted += [("megatron.core.tensor_parallel.random", n) for n in _RNG_TARGETS]
    wanted += [(p.module, "torch") for p in PATCHES]
    return [
        f"{module}.{name}"
        for module, name in wanted
        if not hasattr(importlib.import_module(module), name)
    ]


def apply_cpu_compat_patches() -> bool:
    """Apply every patch in :data:`PATCHES` (idempotent). Returns whether patches are active.

    Does nothing when CUDA is available: the patches exist only for CPU-only machines.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available():
        return False
    missing = missing_patch_targets()
    if missing:
        from importlib.metadata import version

        raise RuntimeError(
            f"megatron-core {version('megatron-core')} lacks what the CPU patches replace: "
            f"{', '.join(missing)} (supported: >=0.16.1,<0.20); runtime/cpu_compat.py needs "
            "updating for this version"
        )
    proxy = _TorchDeviceProxy()
    for patch in PATCHES:
        mod = importlib.import_module(patch.module)
        mod.torch = proxy
    for fpatch in FUNCTION_PATCHES:
        for module in fpatch.modules:
            setattr(importlib.import_module(module), fpatch.name, fpatch.replacement)
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute saves/restores the CUDA generator beside the CPU one; there is none here.
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *a, **k: None
    _APPLIED = True
    return True
