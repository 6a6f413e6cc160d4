"""HF Llama / Qwen2 (safetensors + ``config.json``) -> a Megatron base checkpoint at any layout.

Collective: run on every rank of the target layout (``torchrun --nproc_per_node TPxPP ...``);
each rank reads only the HF tensors of its pipeline stage and slices its tensor-parallel block
(:func:`~megatron_hybrid.convert.fill.fill_from_full`). The checkpoint is layout-independent
(``torch_dist``): it loads at any other TP/PP too. Vocabulary rows are padded with zeros to
Megatron's padded size; the exact HF vocabulary size is recorded in the checkpoint's model config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_hybrid.checkpoint.io import save_model
from megatron_hybrid.convert.arch import ArchSpec, arch_for
from megatron_hybrid.convert.fill import fill_from_full
from megatron_hybrid.convert.hf_io import HFCheckpoint, read_hf_config
from megatron_hybrid.convert.llama import IGNORED_HF
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.runtime.distributed import ParallelConfig

__all__ = ["convert_hf_to_mcore", "hf_model_config", "load_hf_into_model"]


def hf_model_config(
    hf_dir: str | Path, params_dtype: str | None = None
) -> tuple[ArchSpec, ModelConfig]:
    """The architecture spec and :class:`ModelConfig` of an HF model directory."""
    config = read_hf_config(hf_dir)
    spec = arch_for(config)
    try:
        return spec, spec.model_config(config, params_dtype)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{Path(hf_dir) / 'config.json'}: {e}") from None


def load_hf_into_model(chunks, hf: HFCheckpoint, spec: ArchSpec, model: ModelConfig) -> None:
    """Copy the HF weights into this rank's (unwrapped or wrapped) model chunks."""
    mapping = spec.tensor_mapping(model)
    used = mapping.hf_names_used()
    missing = sorted(n for n in used if n not in hf)
    tied_head = "lm_head.weight" if not model.untie_embeddings_and_output_weights else None
    unexpected = sorted(
        n for n in hf.keys() if n not in used and n != tied_head and not IGNORED_HF.match(n)
    )
    if missing or unexpected:
        raise ValueError(
            f"{hf.dir} does not match {spec.architecture} with this config: "
            f"missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}"
        )
    fill_from_full(chunks, lambda key: mapping.mcore_tensor(key, hf.get))


def convert_hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    parallel: ParallelConfig,
    *,
    params_dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert and save; the runtime must be initialised with ``parallel``. Returns ``out_dir``."""
    spec, model = hf_model_config(hf_dir, params_dtype)
    hf = HFCheckpoint(hf_dir)
    chunks = build_model(model, parallel)
    load_hf_into_model(chunks, hf, spec, model)
    out = save_model(
        out_dir,
        chunks,
        model,
        hf={"architecture": spec.architecture, "config": hf.config},
        overwrite=overwrite,
    )
    del chunks
    torch.distributed.barrier()
    return out
