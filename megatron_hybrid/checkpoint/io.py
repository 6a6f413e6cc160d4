"""Save and load base-model and trainables-only checkpoints (``megatron.core.dist_checkpointing``,
``torch_dist`` format), atomically, at any TP/PP/DP layout.

Collective: every function here must be called on all ranks of the job (Megatron's
``parallel_state`` initialised). Global rank 0 creates and commits directories (see
:mod:`~megatron_hybrid.checkpoint.commit`); all ranks write their shards.

::

    save_model(out, chunks, model_cfg)                       # base: every weight, no adapters
    load_model(out, chunks, model_cfg)                       # before or after the plan is applied
    save_trainables(root, step, chunks, plan=..., optimizer=..., training_state={...})
    state = load_trainables(root, chunks, plan=..., optimizer=...)   # after the plan is applied
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingException

from megatron_hybrid.checkpoint.commit import (
    CheckpointError,
    begin_staging,
    commit_staging,
    prune_step_checkpoints,
    resolve_checkpoint,
    staging_path,
    step_dir_name,
    verify_checkpoint,
    write_latest,
)
from megatron_hybrid.checkpoint.metadata import (
    CheckpointMeta,
    check_architecture,
    check_plan,
    new_uid,
    read_meta,
    write_meta,
)
from megatron_hybrid.checkpoint.optim_state import (
    load_optimizer_state,
    optimizer_sharded_state_dict,
)
from megatron_hybrid.checkpoint.rng import (
    RNG_KEY,
    capture_rng_state,
    restore_rng_state,
    rng_sharded_object,
)
from megatron_hybrid.checkpoint.state import copy_loaded, model_sharded_state_dict
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.peft.plan import HybridPlan
from megatron_hybrid.runtime.distributed import on_rank0

__all__ = [
    "TrainingState",
    "current_layout",
    "load_model",
    "load_trainables",
    "save_model",
    "save_trainables",
]


@dataclass
class TrainingState:
    """What :func:`load_trainables` restored besides tensors."""

    step: int
    """Optimizer steps taken before the save."""
    state: dict = field(default_factory=dict)
    """The ``training_state`` passed to :func:`save_trainables` (e.g. the data position)."""
    meta: CheckpointMeta | None = None
    optimizer_restored: bool = False
    rng_restored: bool = False
    """False when the layout changed (states are per rank) or RNG states were not saved."""
    rng_note: str = ""
    """Why the RNG was not restored (empty when it was)."""


def _rng_note(restored: bool, saved: bool, same_layout: bool) -> str:
    if restored:
        return ""
    if not saved:
        return "not saved"
    return "layout changed" if not same_layout else "not requested"


def current_layout() -> dict:
    """``{"tp", "pp", "vpp", "dp"}`` of this job."""
    ps = parallel_state
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _write(final: Path, sharded: dict, meta: CheckpointMeta, *, overwrite: bool) -> Path:
    """Write ``sharded`` into the staging directory of ``final`` and commit it."""
    final = Path(final).absolute()
    on_rank0(lambda: begin_staging(final, overwrite=overwrite))
    dist_checkpointing.save(sharded, str(staging_path(final)))
    on_rank0(lambda: (write_meta(staging_path(final), meta), commit_staging(final)))
    return final


def _load(directory: Path, request: dict) -> dict:
    try:
        with warnings.catch_warnings():
            # Megatron's own loader calls torch's deprecated load_state_dict: not the user's to fix
            warnings.filterwarnings(
                "ignore", message=".*load_state_dict.*deprecated", category=FutureWarning
            )
            return dist_checkpointing.load(request, str(directory))
    except (CheckpointingException, KeyError, RuntimeError) as e:
        raise CheckpointError(f"cannot load {directory}: {e}") from e


def save_model(
    out_dir: str | Path,
    chunks: Sequence[torch.nn.Module],
    model_cfg: ModelConfig,
    *,
    kind: str = "base",
    plan: HybridPlan | None = None,
    hf: dict | None = None,
    details: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Save every model weight except LoRA adapters (a base, or a merged model) to ``out_dir``.

    FFT modules are saved with their current values. ``hf`` records the HF origin
    (``{"architecture", "config"}``) so that an export can reproduce the HF config.
    """
    sharded = {"model": model_sharded_state_dict(chunks, "base")}
    meta = CheckpointMeta(
        kind=kind,
        model=dataclasses.asdict(model_cfg),
        layout=current_layout(),
        plan=None if plan is None else plan.to_dict(),
        hf=hf,
        contents=["model"],
        details=details or {},
        uid=new_uid(),
    )
    return _write(Path(out_dir), sharded, meta, overwrite=overwrite)


def load_model(
    ckpt_dir: str | Path, chunks: Sequence[torch.nn.Module], model_cfg: ModelConfig
) -> CheckpointMeta:
    """Load a ``base`` or ``merged`` checkpoint into the (base weights of the) model chunks.

    Vocabulary rows beyond the saved size (padding for a larger TP degree) come back as zeros.
    """
    directory = resolve_checkpoint(ckpt_dir)
    verify_checkpoint(directory)
    meta = read_meta(directory)
    if meta.kind == "trainables":
        hint = f" (its base is {meta.base})" if meta.base else ""
        raise CheckpointError(f"{directory} is a trainables checkpoint, not a model{hint}")
    check_architecture(meta, model_cfg, f"checkpoint {directory}")
    request = {"model": model_sharded_state_dict(chunks, "base", include_objects=False)}
    copy_loaded(request, _load(directory, request))
    return meta


def save_trainables(
    root: str | Path,
    step: int,
    chunks: Sequence[torch.nn.Module],
    *,
    plan: HybridPlan,
    model_cfg: ModelConfig,
    optimizer=None,
    training_state: dict | None = None,
    base: str | Path | None = None,
    base_uid: str | None = None,
    keep_last: int | None = None,
    save_rng: bool = True,
) -> Path:
    """Save LoRA A/B and FFT weights (+ optimizer, RNG, step, ``training_state``) to
    ``root/iter_<step>``, then move ``root/latest`` to it and prune to ``keep_last``.

    Args:
        root: run directory (holds ``iter_*`` checkpoints and the ``latest`` marker).
        step: optimizer steps taken.
        chunks: model chunks with ``plan`` applied (DDP-wrapped or not).
        plan: the applied plan (recorded; checked on load).
        optimizer: Megatron optimizer; None saves no optimizer state.
        training_state: small picklable values saved in the common part (data position, ...);
            must be identical on all ranks.
        base: path of the base checkpoint these trainables belong to (recorded).
        base_uid: that base's ``uid`` as loaded (recorded; read from ``base`` when None).
        keep_last: keep this many newest step checkpoints (None keeps all).
    """
    root = Path(root).absolute()
    model = model_sharded_state_dict(chunks, "trainables")
    sharded: dict[str, Any] = {
        "model": model,
        "training": {"step": step, "state": training_state or {}},
    }
    contents = ["model"]
    if optimizer is not None:
        sharded["optimizer"] = optimizer_sharded_state_dict(optimizer, model, is_loading=False)
        contents.append("optimizer")
    if save_rng:
        sharded[RNG_KEY] = rng_sharded_object(capture_rng_state())
        contents.append("rng")
    meta = CheckpointMeta(
        kind="trainables",
        model=dataclasses.asdict(model_cfg),
        layout=current_layout(),
        plan=plan.to_dict(),
        step=step,
        base=None if base is None else str(Path(base).absolute()),
        contents=contents,
        uid=new_uid(),
        base_uid=base_uid
        if base_uid is not None or base is None
        else read_meta(resolve_checkpoint(base)).uid or None,
    )
    final = _write(root / step_dir_name(step), sharded, meta, overwrite=True)

    def mark() -> None:
        write_latest(root, final.name)
        if keep_last is not None:
            prune_step_checkpoints(root, keep_last)

    on_rank0(mark)
    return final


def load_trainables(
    path: str | Path,
    chunks: Sequence[torch.nn.Module],
    *,
    plan: HybridPlan,
    model_cfg: ModelConfig,
    optimizer=None,
    load_rng: bool = True,
) -> TrainingState:
    """Load a trainables checkpoint (a run root: its ``latest``; or one ``iter_*`` directory)
    into model chunks that already have ``plan`` applied, and the optimizer when given.

    Raises :class:`CheckpointError` naming the mismatch when the checkpoint was saved for another
    architecture or plan, or naming the missing or truncated file.
    """
    directory = resolve_checkpoint(path)
    verify_checkpoint(directory)
    meta = read_meta(directory)
    source = f"checkpoint {directory}"
    if meta.kind != "trainables":
        raise CheckpointError(
            f"{directory} is a {meta.kind} checkpoint, not a trainables checkpoint"
        )
    check_architecture(meta, model_cfg, source)
    check_plan(meta, plan, source)
    request: dict[str, Any] = {"model": model_sharded_state_dict(chunks, "trainables")}
    if optimizer is not None:
        if "optimizer" not in meta.contents:
            raise CheckpointError(
                f"{source} holds no optimizer state (saved with checkpoint.save_optimizer: "
                "false); resume with checkpoint.load_optimizer: false for fresh Adam moments"
            )
        request["optimizer"] = optimizer_sharded_state_dict(
            optimizer, request["model"], is_loading=True
        )
    same_layout = meta.layout == current_layout()
    restore_rng = load_rng and same_layout and "rng" in meta.contents
    if restore_rng:
        request[RNG_KEY] = rng_sharded_object()
    loaded = _load(directory, request)
    copy_loaded(request["model"], loaded["model"])
    if optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"])
    if restore_rng:
        restore_rng_state(loaded[RNG_KEY])
    training = loaded.get("training", {})
    return TrainingState(
        step=int(training.get("step", meta.step or 0)),
        state=training.get("state", {}),
        meta=meta,
        optimizer_restored=optimizer is not None,
        rng_restored=restore_rng,
        rng_note=_rng_note(restore_rng, "rng" in meta.contents, same_layout),
    )
