"""Apply a :class:`HybridPlan` to Megatron model chunks: freeze, wrap LoRA, unfreeze FFT modules.

Call after building the model and before Megatron's DDP / optimizer see it, so that DDP's gradient
buffers and the optimizer hold only trainable parameters::

    chunks = build_model(model_cfg, parallel_cfg)
    plan = spec.resolve(candidate_names(chunks))           # or HybridPlan.from_dict(json)
    summary = apply_hybrid_plan(chunks, plan)
    ddp_chunks = [DistributedDataParallel(config, ddp_config, c) for c in chunks]

The whole plan is validated (names, module types, ranks) on every rank before anything is changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_hybrid.peft.lora import (
    COLUMN_TYPES,
    ROW_TYPES,
    LoRAColumnParallelLinear,
    LoRAParallelLinear,
    LoRARowParallelLinear,
    parallel_mode_of,
    validate_rank,
)
from megatron_hybrid.peft.naming import ModuleRef, walk_modules
from megatron_hybrid.peft.plan import HybridPlan, closest_names

__all__ = [
    "FFT_PARAM_NAMES",
    "PlanSummary",
    "all_linear_names",
    "apply_hybrid_plan",
    "candidate_names",
]

#: The parameters of a linear module that full fine-tuning trains.
FFT_PARAM_NAMES = ("weight", "bias")


@dataclass
class PlanSummary:
    """Trainable parameters after applying a plan, counted over the whole model (all TP/PP ranks;
    replicated tensors counted once)."""

    total_params: int
    fft_params: int
    lora_params: int
    fft_modules: list[str] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)

    @property
    def trainable_params(self) -> int:
        return self.fft_params + self.lora_params

    def table(self) -> str:
        """A small plain-text table for logs."""
        rows = [
            ("kind", "modules", "parameters", "% of model"),
            (
                "fft",
                str(len(self.fft_modules)),
                f"{self.fft_params:,}",
                _pct(self.fft_params, self.total_params),
            ),
            (
                "lora",
                str(len(self.lora_modules)),
                f"{self.lora_params:,}",
                _pct(self.lora_params, self.total_params),
            ),
            (
                "trainable",
                "",
                f"{self.trainable_params:,}",
                _pct(self.trainable_params, self.total_params),
            ),
            ("total", "", f"{self.total_params:,}", "100.00%"),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        return "\n".join(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
            for r in rows
        )


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / max(b, 1):.2f}%"


def _linear_refs(chunks: Sequence[torch.nn.Module]) -> dict[str, ModuleRef]:
    return {
        r.name: r for r in walk_modules(chunks) if parallel_mode_of(_unwrap(r.module)) is not None
    }


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.base_layer if isinstance(module, LoRAParallelLinear) else module


def _gather_names(local: list[str], group: dist.ProcessGroup | None) -> list[str]:
    if group is None or not dist.is_initialized() or group.size() == 1:
        return sorted(local)
    out: list[list[str] | None] = [None] * group.size()
    dist.all_gather_object(out, local, group=group)
    return sorted({n for part in out for n in (part or [])})


def all_linear_names(
    chunks: Sequence[torch.nn.Module], pp_group: dist.ProcessGroup | None = None
) -> list[str]:
    """Global names of every supported parallel linear in the whole model (all pipeline stages)."""
    return _gather_names(list(_linear_refs(chunks)), pp_group)


def candidate_names(
    chunks: Sequence[torch.nn.Module], pp_group: dist.ProcessGroup | None = None
) -> list[str]:
    """Global names of the Hybrid-LoRA candidates (qkv, proj, fc1, fc2 of every layer, all stages)."""
    from megatron_hybrid.peft.naming import CANDIDATE_KINDS, module_kind

    return [n for n in all_linear_names(chunks, pp_group) if module_kind(n) in CANDIDATE_KINDS]


def _default_groups(tp_group, pp_group, mp_group):
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        tp_group = tp_group or ps.get_tensor_model_parallel_group()
        pp_group = pp_group or ps.get_pipeline_model_parallel_group()
        mp_group = mp_group or ps.get_model_parallel_group()
    return tp_group, pp_group, mp_group


def _validate(
    plan: HybridPlan,
    local: dict[str, ModuleRef],
    global_names: list[str],
    local_modules: dict[str, torch.nn.Module],
    mp_group: dist.ProcessGroup | None = None,
) -> None:
    """Raise on every rank of ``mp_group`` when any of them finds a problem with its modules (a
    pipeline stage checks only the modules it holds), so no rank changes its modules and then
    waits in a collective for a stage that raised."""
    known = set(global_names)
    problems: list[str] = [
        f"{name}: already wrapped with LoRA (a plan can be applied only once)"
        for name, ref in sorted(local.items())
        if isinstance(ref.module, LoRAParallelLinear) and name not in plan.modules
    ]
    for name, decision in sorted(plan.modules.items()):
        if name not in known and name in local_modules:
            problems.append(
                f"{name}: is a {type(local_modules[name]).__name__}, not a parallel linear; hybrid "
                "plans adapt or fully fine-tune only column/row-parallel linear modules"
            )
            continue
        if name not in known:
            problems.append(
                f"{name}: the model has no such parallel linear module; closest: {closest_names(name, known)}"
            )
            continue
        ref = local.get(name)
        if ref is None:  # lives on another pipeline stage; that stage validates it
            continue
        module = ref.module
        if isinstance(module, LoRAParallelLinear):
            problems.append(f"{name}: already wrapped with LoRA (a plan can be applied only once)")
            continue
        if decision.mode in ("lora", "fft") and getattr(module, "weight", None) is None:
            # Megatron builds a tied output layer without a weight of its own: its forward
            # takes the word embedding's weight as an argument.
            problems.append(
                f"{name}: has no weight of its own (an output layer tied to the word embedding, "
                "untie_embeddings_and_output_weights=false); untie them or leave it out of the plan"
            )
            continue
        if decision.mode == "lora":
            if not isinstance(module, (*COLUMN_TYPES, *ROW_TYPES)):
                problems.append(
                    f"{name}: LoRA does not support module type {type(module).__name__}"
                )
                continue
            if getattr(module, "is_expert", False):
                problems.append(f"{name}: LoRA on MoE expert layers is not supported")
                continue
            mode = parallel_mode_of(module)
            out_local, in_local = module.weight.shape
            tp = module.tp_group.size() if getattr(module, "tp_group", None) is not None else 1
            full_in, full_out = (
                (in_local, out_local * tp) if mode == "column" else (in_local * tp, out_local)
            )
            rank = plan.lora.rank if decision.rank is None else decision.rank
            try:
                validate_rank(name, rank, full_in, full_out)
            except ValueError as e:
                problems.append(str(e))
    problems = _gather_names(problems, mp_group)
    if problems:
        raise ValueError("invalid hybrid plan:\n  " + "\n  ".join(problems))


def _count(params: list[tuple[torch.nn.Parameter, bool]], tp_rank: int) -> int:
    """Parameters counted once model-wide: TP-replicated tensors only on TP rank 0."""
    return sum(p.numel() for p, sharded in params if sharded or tp_rank == 0)


def apply_hybrid_plan(
    chunks: Sequence[torch.nn.Module],
    plan: HybridPlan,
    *,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    mp_group: dist.ProcessGroup | None = None,
) -> PlanSummary:
    """Freeze everything, wrap the plan's LoRA modules, unfreeze its FFT modules; in place.

    Args:
        chunks: this rank's model chunks (one per virtual pipeline stage), not yet DDP-wrapped.
        plan: decisions by GLOBAL module name; modules it does not name stay frozen.
        tp_group / pp_group / mp_group: tensor-, pipeline- and model-parallel groups (default:
            Megatron's ``parallel_state`` groups). ``pp_group`` is used to check names against all
            stages; ``mp_group`` to count parameters model-wide.

    Returns:
        A :class:`PlanSummary` with model-wide parameter counts.

    Raises:
        ValueError: naming every offending module, before any module is changed.
    """
    from megatron.core.distributed import DistributedDataParallel

    for i, chunk in enumerate(chunks):
        if isinstance(chunk, DistributedDataParallel):
            raise ValueError(
                f"model chunk {i} is already wrapped in DistributedDataParallel; apply the hybrid "
                "plan before DDP wraps the model so DDP allocates gradient buffers only for trainables"
            )
    tp_group, pp_group, mp_group = _default_groups(tp_group, pp_group, mp_group)
    local = _linear_refs(chunks)
    local_modules = {r.name: r.module for r in walk_modules(chunks)}
    _validate(plan, local, _gather_names(list(local), pp_group), local_modules, mp_group)

    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)

    fft_params: list[tuple[torch.nn.Parameter, bool]] = []
    lora_params: list[tuple[torch.nn.Parameter, bool]] = []
    for name, decision in sorted(plan.modules.items()):
        ref = local.get(name)
        if ref is None or decision.mode == "frozen":
            continue
        module = ref.module
        if decision.mode == "fft":
            # The linear's own weight and bias only: TE's fused LayerNorm + linear
            # (linear_qkv / linear_fc1 in the TE spec) also holds the preceding norm's
            # layer_norm_weight/bias, which stays frozen as the norms of the local spec do.
            for pname, p in module.named_parameters(recurse=False):
                if pname not in FFT_PARAM_NAMES:
                    continue
                p.requires_grad_(True)
                fft_params.append((p, bool(getattr(p, "tensor_model_parallel", False))))
            continue
        mode = parallel_mode_of(module)
        cls = LoRAColumnParallelLinear if mode == "column" else LoRARowParallelLinear
        gated = name.endswith("linear_fc1") and bool(
            getattr(module.config, "gated_linear_unit", False)
        )
        wrapper = cls(
            module,
            plan.lora_config_for(name),
            name=name,
            tp_group=getattr(module, "tp_group", None) or tp_group,
            gated=gated,
            seed=plan.seed,
        )
        parent_name, _, attr = ref.local_name.rpartition(".")
        parent = chunks[ref.chunk].get_submodule(parent_name) if parent_name else chunks[ref.chunk]
        setattr(parent, attr, wrapper)
        lora_params += [(wrapper.lora_A, mode == "row"), (wrapper.lora_B, mode == "column")]

    tp_rank = tp_group.rank() if tp_group is not None else 0
    all_params = [
        (p, bool(getattr(p, "tensor_model_parallel", False)))
        for c in chunks
        for p in c.parameters()
        # A tied output layer on the last stage is a copy of the first stage's embedding.
        if not (getattr(p, "shared_embedding", False) and not getattr(c, "pre_process", True))
    ]
    counts = torch.tensor(
        [_count(all_params, tp_rank), _count(fft_params, tp_rank), _count(lora_params, tp_rank)],
        dtype=torch.int64,
    )
    if mp_group is not None and dist.is_initialized() and mp_group.size() > 1:
        dist.all_reduce(counts, group=mp_group)
    return PlanSummary(
        total_params=int(counts[0]),
        fft_params=int(counts[1]),
        lora_params=int(counts[2]),
        fft_modules=plan.names("fft"),
        lora_modules=plan.names("lora"),
    )
