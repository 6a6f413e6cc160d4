"""A base or merged Megatron checkpoint -> HF safetensors + ``config.json`` that transformers loads.

Runs in one process (the HF format holds full tensors anyway): the checkpoint's tensors are read at
full size with ``dist_checkpointing.load_plain_tensors`` whatever layout saved them, vocabulary
padding rows are dropped, fused QKV and gate/up are split, and the HF config is the one recorded
at conversion (``convert-hf``) updated from the model config, or built from it (``arch``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from megatron_hybrid.checkpoint.commit import CheckpointError, resolve_checkpoint, verify_checkpoint
from megatron_hybrid.checkpoint.metadata import read_meta
from megatron_hybrid.convert.arch import arch_by_name, arch_for
from megatron_hybrid.convert.hf_io import write_hf_model
from megatron_hybrid.fileio import check_writable_directory, staged_directory

__all__ = ["TOKENIZER_FILES", "convert_mcore_to_hf", "full_tensors"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def full_tensors(
    directory: Path, keep: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint at full (TP=1) shape, keyed by checkpoint key; only those
    whose key ``keep`` accepts (all when None), so that, e.g., an export of a trainables
    checkpoint does not read its optimizer moments (twice the size of the trainables)."""
    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(directory))
        if keep is not None:
            metadata = {k: v for k, v in metadata.items() if keep(k)}
        # Every process reads whole tensors: the shards overlap, so no integrity check.
        loaded = dist_checkpointing.load(metadata, str(directory), validate_access_integrity=False)
        # load() adds the checkpoint's common (non-tensor) state; ``keep`` applies to it too.
        return loaded if keep is None else {k: v for k, v in loaded.items() if keep(k)}
    except Exception as e:  # noqa: BLE001 - name the checkpoint whatever went wrong
        raise CheckpointError(f"cannot read the tensors of {directory}: {e}") from e


def convert_mcore_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    arch: str | None = None,
    tokenizer_from: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an HF model directory. ``dtype`` defaults to the original HF dtype (else the model's);
    ``arch`` (``llama`` / ``qwen2``) is needed only when the checkpoint has no HF origin.

    The directory is written whole or not at all (:func:`~megatron_hybrid.fileio.staged_directory`):
    an existing non-empty ``out_dir`` is refused unless ``overwrite``, and then replaced, so
    files of an earlier export (another shard count, say) never mix with the new ones.

    Needs ``torch.distributed`` initialised (one rank is enough).
    """
    directory = resolve_checkpoint(ckpt_dir)
    verify_checkpoint(directory)
    meta = read_meta(directory)
    if meta.kind == "trainables":
        raise CheckpointError(
            f"{directory} holds trainables only; merge them into the base first (megatron-hybrid merge)"
        )
    check_writable_directory(out_dir, overwrite=overwrite)  # before reading any tensor
    tokenizer_files = _tokenizer_files(tokenizer_from)
    model = meta.model_config()
    original = (meta.hf or {}).get("config")
    if arch is not None:
        spec = arch_by_name(arch)
    elif original is not None:
        spec = arch_for(original)
    else:
        raise ValueError(
            f"{directory} records no HF origin; pass it with --arch (LlamaForCausalLM or Qwen2ForCausalLM, or llama / qwen2)"
        )
    dtype = (
        dtype
        or (original or {}).get("dtype")
        or (original or {}).get("torch_dtype")
        or model.params_dtype
    )
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    tensors = full_tensors(directory)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in tensors:
            tensors[key] = tensors[key][: model.vocab_size]
    hf = spec.tensor_mapping(model).hf_tensors(tensors)
    hf = {k: v.to(_DTYPES[dtype]).contiguous() for k, v in hf.items()}
    with staged_directory(out_dir, overwrite=overwrite) as staging:
        write_hf_model(staging, hf, spec.hf_config(model, original, dtype))
        for src in tokenizer_files:
            shutil.copy2(src, staging / src.name)
    return Path(out_dir)


def _tokenizer_files(tokenizer_from: str | Path | None) -> list[Path]:
    """The tokenizer files to copy from ``tokenizer_from``; a missing directory, or one without
    any of :data:`TOKENIZER_FILES`, is an error naming it (before, the export went on without a
    tokenizer and without a word)."""
    if tokenizer_from is None:
        return []
    directory = Path(tokenizer_from)
    if not directory.is_dir():
        raise FileNotFoundError(f"--tokenizer-from {directory} is not a directory")
    files = [directory / n for n in TOKENIZER_FILES if (directory / n).is_file()]
    if not files:
        raise FileNotFoundError(
            f"--tokenizer-from {directory} holds none of the tokenizer files "
            f"{', '.join(TOKENIZER_FILES)}"
        )
    return files
