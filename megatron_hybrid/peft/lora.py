"""Tensor- and sequence-parallel LoRA around Megatron-Core column/row-parallel linears.

::

    y = W x  +  s * B (A x)          s = alpha / r   (rsLoRA: alpha / sqrt(r))
        |          |   |
        |          |   +-- A: r x in
        |          +------ B: out x r
        +----------------- frozen base layer (ColumnParallelLinear, RowParallelLinear, TE variants)

Layout under tensor parallelism (t = TP size), chosen so that the adapter adds no communication of
width ``h``, only of width ``r``:

* **Column-parallel base** (``linear_qkv``, ``linear_fc1``; W is ``out/t x in`` per rank):
  A is replicated (``r x in``), B is sharded on ``out`` like W (``out/t x r``). ``z = A x`` is
  computed on the rank's input; without sequence parallelism ``z`` enters the TP region through
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of ``dz`` backward), with
  sequence parallelism ``z`` (``[s/t, b, r]``) is all-gathered along the sequence (reduce-scatter
  backward). A then only sees its sequence shard, so its gradient is a partial sum and A is tagged
  ``sequence_parallel`` (Megatron all-reduces such gradients over TP in ``finalize_model_grads``).
* **Row-parallel base** (``linear_proj``, ``linear_fc2``; W is ``out x in/t`` per rank):
  A is sharded on ``in`` like W (``r x in/t``), B is replicated (``out x r``). The partial
  ``A_i x_i`` is all-reduced (reduce-scattered along the sequence under sequence parallelism) and
  then multiplied by B. Under sequence parallelism B sees a sequence shard and is tagged
  ``sequence_parallel``.

For the SwiGLU ``linear_fc1`` the local rows of W are ``[gate_i; up_i]``; B's local rows follow the
same layout, one A is shared by gate and up, and the checkpoint uses Megatron's SwiGLU factory so
that resharding moves gate and up rows separately.

Adapters are initialised from full (TP=1) matrices drawn from a generator seeded by the module's
global name, then sliced, so the same seed gives the same model at every TP/PP layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)

from megatron_hybrid.config import check_int
from megatron_hybrid.peft.config import LoRAConfig

try:  # Transformer Engine is optional; a broken install raises RuntimeError.
    import transformer_engine  # noqa: F401
    from megatron.core.extensions.transformer_engine import (
        TEColumnParallelLinear,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    _TE_COLUMN: tuple[type, ...] = (TEColumnParallelLinear, TELayerNormColumnParallelLinear)
    _TE_ROW: tuple[type, ...] = (TERowParallelLinear,)
    _TE_LN: tuple[type, ...] = (TELayerNormColumnParallelLinear,)
except Exception:  # noqa: BLE001
    _TE_COLUMN, _TE_ROW, _TE_LN = (), (), ()

__all__ = [
    "COLUMN_TYPES",
    "ROW_TYPES",
    "LoRAColumnParallelLinear",
    "LoRAParallelLinear",
    "LoRARowParallelLinear",
    "adapter_dropout_disabled",
    "adapters_disabled",
    "iter_lora_modules",
    "parallel_mode_of",
]

COLUMN_TYPES: tuple[type, ...] = (ColumnParallelLinear, *_TE_COLUMN)
ROW_TYPES: tuple[type, ...] = (RowParallelLinear, *_TE_ROW)


def parallel_mode_of(module: torch.nn.Module) -> str | None:
    """``column``, ``row``, or None when the module is not a supported parallel linear."""
    if isinstance(module, COLUMN_TYPES):
        return "column"
    if isinstance(module, ROW_TYPES):
        return "row"
    return None


def _generator(name: str, seed: int, which: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}:{which}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _init_full(
    shape: tuple[int, int], method: str, cfg: LoRAConfig, gen: torch.Generator
) -> torch.Tensor:
    """A full (unsharded) fp32 adapter matrix; ``shape = (fan_out, fan_in)``."""
    t = torch.empty(shape, dtype=torch.float32)
    fan_out, fan_in = shape
    if method == "zero":
        return t.zero_()
    if method == "gaussian":
        return t.normal_(0.0, cfg.init_std or 1.0 / cfg.rank, generator=gen)
    if (
        method == "kaiming"
    ):  # nn.Linear's default: kaiming_uniform(a=sqrt(5)) -> U(+-1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(fan_in)
        return t.uniform_(-bound, bound, generator=gen)
    if method == "xavier":
        return t.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=gen)
    raise ValueError(f"unknown init {method!r}")


def _shard_rows(full: torch.Tensor, rank: int, size: int, gated: bool) -> torch.Tensor:
    """Rows of ``full`` held by TP rank ``rank``; gated layers hold ``[gate_i; up_i]``."""
    if gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)
    return full.chunk(size, dim=0)[rank]


class LoRAParallelLinear(torch.nn.Module):
    """Common part of the column/row LoRA wrappers; see the module docstring for the layout.

    Args:
        base: the Megatron linear to adapt; it is kept (frozen) as ``base_layer``.
        lora: adapter hyper-parameters.
        name: the module's global name (seeds the init; shown in errors).
        tp_group: tensor-parallel group of ``base``.
        gated: True for the SwiGLU ``linear_fc1`` (rows are ``[gate; up]``).
        seed: init seed shared by all ranks.
    """

    parallel_mode: str = ""

    def __init__(
        self,
        base: torch.nn.Module,
        lora: LoRAConfig,
        *,
        name: str,
        tp_group: torch.distributed.ProcessGroup | None,
        gated: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_config = lora
        self.name = name
        self.tp_group = tp_group
        self.tp_size = tp_group.size() if tp_group is not None else 1
        self.tp_rank = tp_group.rank() if tp_group is not None else 0
        self.gated = gated
        self.scaling = lora.scaling
        config = getattr(base, "config", None)
        self.sequence_parallel = (
            bool(getattr(config, "sequence_parallel", False)) and self.tp_size > 1
        )
        self.merged = False
        self.adapters_enabled = True
        self.is_te = isinstance(base, (*_TE_COLUMN, *_TE_ROW))
        self.in_features_full, self.out_features_full = self._full_features()
        validate_rank(name, lora.rank, self.in_features_full, self.out_features_full)
        self._make_adapters(seed)
        self.dropout = torch.nn.Dropout(lora.dropout) if lora.dropout > 0 else None

    # -- shapes and parameters -------------------------------------------------------------------
    def _full_features(self) -> tuple[int, int]:
        raise NotImplementedError

    def _make_adapters(self, seed: int) -> None:
        raise NotImplementedError

    def _new_param(self, t: torch.Tensor) -> torch.nn.Parameter:
        w = self.base_layer.weight
        return torch.nn.Parameter(t.to(device=w.device, dtype=w.dtype).contiguous())

    def _tag_adapters(self) -> None:
        # Tags for Megatron's ParamKey(attr=...): ``is_lora_adapter`` marks both matrices (for a
        # user's own optimizer overrides); build_optimizer keys on ``is_lora_a`` / ``is_lora_b``,
        # which tell them apart (LoRA+).
        self.lora_A.is_lora_adapter = self.lora_A.is_lora_a = True
        self.lora_B.is_lora_adapter = self.lora_B.is_lora_b = True

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (so code that reads ``module.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def delta_weight(self) -> torch.Tensor:
        """This rank's shard of ``s * B A`` in the base weight's local layout (fp32)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def backward_dw(self) -> None:
        """Megatron's delayed weight-gradient call (``delay_wgrad_compute``; attention and MLP call
        it on their linears): forwarded to the base layer. The adapters' gradients are ordinary
        autograd gradients, already taken in the backward pass."""
        backward_dw = getattr(self.base_layer, "backward_dw", None)
        if backward_dw is not None:
            backward_dw()

    # -- merge -----------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``s * B A`` into the local base shard: exact at any TP, no communication."""
        if self.merged:
            raise RuntimeError(f"{self.name}: adapter is already merged")
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to floating-point rounding of the add/subtract)."""
        if not self.merged:
            raise RuntimeError(f"{self.name}: adapter is not merged")
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    # -- forward ---------------------------------------------------------------------------------
    def _active(self) -> bool:
        return self.adapters_enabled and not self.merged

    def _dropout(self, x: torch.Tensor, sharded: bool) -> torch.Tensor:
        """Dropout with Megatron's RNG convention: the TP-rank-specific stream for sharded tensors."""
        if self.dropout is None or not self.training:
            return x
        if sharded:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.dropout(x)
        return self.dropout(x)

    def extra_repr(self) -> str:
        return (
            f"{self.name}, mode={self.parallel_mode}, r={self.lora_config.rank}, "
            f"scaling={self.scaling:g}, TP={self.tp_size}, sequence_parallel={self.sequence_parallel}"
            + (", gated" if self.gated else "")
            + (", merged" if self.merged else "")
        )

    # -- checkpointing ---------------------------------------------------------------------------
    def _adapter_axis_map(self) -> dict[str, int]:
        raise NotImplementedError

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ):
        """Base tensors under the base's own keys (``<prefix>weight``), adapters as
        ``<prefix>lora_A`` / ``<prefix>lora_B`` sharded like the base's matching dimension."""
        if self.merged:
            raise RuntimeError(f"{self.name}: unmerge before saving a checkpoint")
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        sd = self.base_layer.sharded_state_dict(prefix, sharded_offsets, metadata)
        adapters = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        sharded = make_sharded_tensors_for_checkpoint(
            adapters,
            prefix,
            self._adapter_axis_map(),
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata.get("dp_cp_group"),
        )
        if self.gated:
            key = f"{prefix}lora_B"
            sharded[key] = apply_swiglu_sharded_factory(
                sharded[key], sharded_offsets, metadata.get("singleton_local_shards", False)
            )
        sd.update(sharded)
        return sd


def layernorm_linear_forward(base: torch.nn.Module, x: torch.Tensor, *args, **kwargs):
    """Run a fused LayerNorm + column-parallel linear (TE) so that it also returns ``ln(x)``.

    Returns ``(out, bias, ln_out)``; ``ln_out`` is shaped and sharded like ``x`` (``[s/t, b, in]``
    under sequence parallelism, ``[s, b, in]`` otherwise), so the adapter treats it exactly like a
    local layer's input. The sequence-gathered variant (``return_layernorm_output_gathered``) is
    not used: TE adds the gradient of a non-gathered ``ln_out`` after its own reduce-scatter /
    all-reduce, which needs the complete gradient of this rank's shard (what the adapter's
    sequence gather of its rank-``r`` activations gives), while for the gathered variant it expects
    a partial sum before the reduce-scatter with sequence parallelism and drops it without. The
    flags are set for this call only, so a merged or disabled adapter gets the base's plain
    ``(out, bias)``.

    Megatron's TE wrapper returns ``((out, ln_out), None)``, or ``(out, bias, ln_out)`` when it
    returns the bias (``te_return_bias``).
    """
    flags = ("return_layernorm_output", "return_layernorm_output_gathered")
    saved = {f: getattr(base, f) for f in flags if hasattr(base, f)}
    base.return_layernorm_output = True
    if "return_layernorm_output_gathered" in saved:
        base.return_layernorm_output_gathered = False
    try:
        result = base(x, *args, **kwargs)
    finally:
        for f, v in saved.items():
            setattr(base, f, v)
    if getattr(base, "te_return_bias", False):
        out, bias, ln_out = result
    else:
        (out, ln_out), bias = result
    return out, bias, ln_out


def validate_rank(name: str, rank: int, in_features: int, out_features: int) -> None:
    """Raise ``ValueError`` naming ``name`` when ``rank`` is not usable for an ``out x in`` weight."""
    check_int(f"{name}: LoRA rank", rank)
    limit = min(in_features, out_features)
    if rank > limit:
        raise ValueError(
            f"{name}: LoRA rank {rank} exceeds min(in, out) = min({in_features}, {out_features}) = {limit}"
        )


class LoRAColumnParallelLinear(LoRAParallelLinear):
    """LoRA around a column-parallel linear: A replicated ``[r, in]``, B sharded ``[out/t, r]``.

    Input ``[s, b, in]`` (``[s/t, b, in]`` under sequence parallelism); output as the base:
    ``([s, b, out/t], bias)`` (or gathered ``out`` when the base gathers its output).
    """

    parallel_mode = "column"

    def _full_features(self) -> tuple[int, int]:
        out_local, in_features = self.base_layer.weight.shape
        return in_features, out_local * self.tp_size

    def _make_adapters(self, seed: int) -> None:
        cfg = self.lora_config
        a = _init_full(
            (cfg.rank, self.in_features_full), cfg.a_init, cfg, _generator(self.name, seed, "A")
        )
        b = _init_full(
            (self.out_features_full, cfg.rank), cfg.b_init, cfg, _generator(self.name, seed, "B")
        )
        self.lora_A = self._new_param(a)
        self.lora_B = self._new_param(_shard_rows(b, self.tp_rank, self.tp_size, self.gated))
        # B's local rows are laid out as the base weight's ([gate_i; up_i] for a gated fc1, which
        # Megatron marks partition_stride=2); tools that regroup shards read the stride.
        stride = getattr(self.base_layer.weight, "partition_stride", 2 if self.gated else 1)
        set_tensor_model_parallel_attributes(self.lora_B, True, 0, stride)
        self.lora_A.sequence_parallel = self.sequence_parallel
        self.lora_B.sequence_parallel = False
        self._tag_adapters()

    def _adapter_axis_map(self) -> dict[str, int]:
        return {"lora_B": 0}

    def full_adapters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B_local) as held here: A is already full; B is this rank's rows."""
        return self.lora_A, self.lora_B

    def forward(self, x: torch.Tensor, *args, **kwargs):
        base = self.base_layer
        if not self._active():
            return base(x, *args, **kwargs)
        if isinstance(base, _TE_LN):  # the adapter reads the normalised input, as the base does
            out, bias, h = layernorm_linear_forward(base, x, *args, **kwargs)
        else:
            out, bias = base(x, *args, **kwargs)
            h = x
        seq_sharded = self.sequence_parallel
        if self.lora_config.dropout_position == "pre":
            h = self._dropout(h, sharded=seq_sharded)
        z = F.linear(h, self.lora_A)  # [s(/t), b, r]
        if seq_sharded:
            z = gather_from_sequence_parallel_region(
                z, tensor_parallel_output_grad=True, group=self.tp_group
            )
        else:
            z = copy_to_tensor_model_parallel_region(z, group=self.tp_group)
        y = F.linear(z, self.lora_B) * self.scaling  # [s, b, out/t]
        if self.lora_config.dropout_position == "post":
            y = self._dropout(y, sharded=True)
        # Megatron's rule: an explicit runtime_gather_output (keyword, or the positional after
        # weight) overrides the layer's gather_output.
        runtime_gather = kwargs.get("runtime_gather_output", args[1] if len(args) > 1 else None)
        gather = getattr(base, "gather_output", False) if runtime_gather is None else runtime_gather
        if gather:
            y = gather_from_tensor_model_parallel_region(y, group=self.tp_group)
        return out + y, bias


class LoRARowParallelLinear(LoRAParallelLinear):
    """LoRA around a row-parallel linear: A sharded ``[r, in/t]``, B replicated ``[out, r]``.

    Input ``[s, b, in/t]`` (the base's ``input_is_parallel``); output as the base:
    ``([s, b, out], bias)``, ``[s/t, b, out]`` under sequence parallelism.
    """

    parallel_mode = "row"

    def _full_features(self) -> tuple[int, int]:
        out_features, in_local = self.base_layer.weight.shape
        return in_local * self.tp_size, out_features

    def _make_adapters(self, seed: int) -> None:
        cfg = self.lora_config
        a = _init_full(
            (cfg.rank, self.in_features_full), cfg.a_init, cfg, _generator(self.name, seed, "A")
        )
        b = _init_full(
            (self.out_features_full, cfg.rank), cfg.b_init, cfg, _generator(self.name, seed, "B")
        )
        self.lora_A = self._new_param(a.chunk(self.tp_size, dim=1)[self.tp_rank])
        self.lora_B = self._new_param(b)
        set_tensor_model_parallel_attributes(self.lora_A, True, 1, 1)
        self.lora_A.sequence_parallel = False
        self.lora_B.sequence_parallel = self.sequence_parallel
        self._tag_adapters()

    def _adapter_axis_map(self) -> dict[str, int]:
        return {"lora_A": 1}

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base_layer(x, *args, **kwargs)
        if not self._active():
            return out, bias
        h = x
        if not getattr(self.base_layer, "input_is_parallel", True):
            h = scatter_to_tensor_model_parallel_region(h, group=self.tp_group)
        if self.lora_config.dropout_position == "pre":
            h = self._dropout(h, sharded=True)
        z = F.linear(h, self.lora_A)  # partial sum over this rank's input slice: [s, b, r]
        if self.sequence_parallel:
            z = reduce_scatter_to_sequence_parallel_region(z, group=self.tp_group)  # [s/t, b, r]
        else:
            z = reduce_from_tensor_model_parallel_region(z, group=self.tp_group)
        y = F.linear(z, self.lora_B) * self.scaling
        if self.lora_config.dropout_position == "post":
            y = self._dropout(y, sharded=self.sequence_parallel)
        return out + y, bias


@contextlib.contextmanager
def _set_on_each(modules: list[LoRAParallelLinear], attr: str, value):
    """Set ``attr`` to ``value`` on every module inside the block; restore each one's own after."""
    previous = [getattr(m, attr) for m in modules]
    for m in modules:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m, v in zip(modules, previous):
            setattr(m, attr, v)


def adapter_dropout_disabled(chunks: Iterable[torch.nn.Module]):
    """Train without adapter dropout inside the block (policy-gradient updates: the update's
    log-probabilities must be those of the distribution that sampled, which had none)."""
    return _set_on_each(list(iter_lora_modules(chunks)), "dropout", None)


def iter_lora_modules(chunks: Iterable[torch.nn.Module]) -> Iterator[LoRAParallelLinear]:
    """Every LoRA wrapper in the model chunks."""
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, LoRAParallelLinear):
                yield module


@contextlib.contextmanager
def adapters_disabled(chunks: Iterable[torch.nn.Module]):
    """Run the base model: every LoRA adapter is bypassed inside the block (FFT weights stay)."""
    modules = list(iter_lora_modules(chunks))
    merged = [m.name for m in modules if m.merged]
    if merged:
        raise RuntimeError(f"cannot disable merged adapters ({', '.join(merged)}); unmerge first")
    with _set_on_each(modules, "adapters_enabled", False):
        yield
