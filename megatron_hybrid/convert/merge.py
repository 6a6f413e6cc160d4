"""Base + hybrid trainables -> one plain Megatron checkpoint (no adapters), at any layout.

Collective (``torchrun --nproc_per_node TPxPP ...``, any layout): every rank builds its chunks,
loads its shard of the base, applies the plan recorded in the trainables checkpoint, loads the
trainables, folds ``s * B A`` into its local base shard (:meth:`LoRAParallelLinear.merge`: a
column-parallel rank holds ``B_i A``'s rows, a row-parallel rank ``B A_i``'s columns, so the merge
needs no communication and is exact at any TP), drops the wrappers, and saves every weight. FFT
modules are saved with their trained values. The result loads like any base checkpoint.

``fft_only=True`` keeps the LoRA adapters out (FFT weights only): the base to pair with an HF PEFT
adapter of the LoRA modules for servers that cannot load full-weight modules (vLLM).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_hybrid.checkpoint.commit import CheckpointError, resolve_checkpoint, verify_checkpoint
from megatron_hybrid.checkpoint.io import load_model, load_trainables, save_model
from megatron_hybrid.checkpoint.metadata import CheckpointMeta, check_base, read_meta
from megatron_hybrid.checkpoint.state import unwrap_chunks
from megatron_hybrid.data.tokenizers import CHAR_ALPHABET_KEY
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.peft.apply import apply_hybrid_plan
from megatron_hybrid.peft.lora import LoRAParallelLinear
from megatron_hybrid.runtime.distributed import ParallelConfig

__all__ = ["merge_checkpoint", "read_trainables_meta", "unwrap_lora"]


@torch.no_grad()
def unwrap_lora(chunks: Sequence[torch.nn.Module], *, merge: bool = True) -> list[str]:
    """Replace every LoRA wrapper by its base layer (after merging ``s * B A`` when ``merge``).

    Returns the global names of the unwrapped modules.
    """
    names = []
    for chunk in unwrap_chunks(chunks):
        wrappers = [(n, m) for n, m in chunk.named_modules() if isinstance(m, LoRAParallelLinear)]
        for local, wrapper in wrappers:
            if merge and not wrapper.merged:
                wrapper.merge()
            parent_name, _, attr = local.rpartition(".")
            parent = chunk.get_submodule(parent_name) if parent_name else chunk
            setattr(parent, attr, wrapper.base_layer)
            names.append(wrapper.name)
    return names


def read_trainables_meta(trainables: str | Path) -> tuple[Path, CheckpointMeta]:
    """The resolved trainables directory and its metadata (checked to be of kind ``trainables``)."""
    directory = resolve_checkpoint(trainables)
    verify_checkpoint(directory)
    meta = read_meta(directory)
    if meta.kind != "trainables":
        raise CheckpointError(
            f"{directory} is a {meta.kind} checkpoint, not a trainables checkpoint"
        )
    return directory, meta


def merge_checkpoint(
    trainables: str | Path,
    out_dir: str | Path,
    parallel: ParallelConfig,
    *,
    base: str | Path | None = None,
    fft_only: bool = False,
    overwrite: bool = False,
) -> Path:
    """Merge and save (runtime initialised with ``parallel``). ``base`` defaults to the base
    recorded in the trainables checkpoint. Returns ``out_dir``."""
    directory, meta = read_trainables_meta(trainables)
    base_path = base or meta.base
    if base_path is None:
        raise CheckpointError(f"{directory} records no base checkpoint; pass the base explicitly")
    base_dir = resolve_checkpoint(base_path)
    base_meta = read_meta(base_dir)
    if base is None:  # the recorded base must still be the one trained on; --base is a choice
        check_base(meta, base_meta, f"checkpoint {directory}", base_dir)
    model_cfg, plan = meta.model_config(), meta.hybrid_plan()
    chunks = build_model(model_cfg, parallel)
    load_model(base_path, chunks, model_cfg)
    apply_hybrid_plan(chunks, plan)
    load_trainables(directory, chunks, plan=plan, model_cfg=model_cfg)
    unwrap_lora(chunks, merge=not fft_only)
    merged = ["fft"] if fft_only else ["fft", "lora"]
    return save_model(
        out_dir,
        chunks,
        model_cfg,
        kind="merged",
        plan=plan,
        hf=base_meta.hf,
        details={
            "merged": merged,
            "trainables": str(directory),
            "step": meta.step,
            # the character alphabet the base was trained with (data/tokenizers.py)
            **{k: base_meta.details[k] for k in (CHAR_ALPHABET_KEY,) if k in base_meta.details},
        },
        overwrite=overwrite,
    )
