"""Checkpoint and conversion subcommands: ``convert-hf``, ``convert-to-hf``, ``merge``, ``export-peft``.

Register them on a CLI with :func:`add_checkpoint_subcommands`; ``scripts/*.py`` run one each via
:func:`main`. ``convert-hf`` and ``merge`` are collective and run at any layout under torchrun::

    torchrun --nproc_per_node 2 -m megatron_hybrid.convert.cli convert-hf --hf HF_DIR --out BASE --tp 2
    torchrun --nproc_per_node 2 -m megatron_hybrid.convert.cli merge --trainables RUN --out MERGED --tp 2
    python -m megatron_hybrid.convert.cli convert-to-hf --checkpoint MERGED --out MERGED_HF
    python -m megatron_hybrid.convert.cli export-peft --trainables RUN --out ADAPTER
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = ["add_checkpoint_subcommands", "main"]

_DTYPES = ("float32", "bfloat16", "float16")


def _runtime(args: argparse.Namespace, layout: bool = True):
    """Initialise the runtime at the requested layout (``layout=False``: one process, TP=PP=1)."""
    from megatron_hybrid.runtime.distributed import ParallelConfig, initialize_runtime

    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp if layout else 1,
        pipeline_model_parallel_size=args.pp if layout else 1,
    )
    initialize_runtime(parallel)
    args.runtime_started = True
    return parallel


def _say(text: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


def _with_runtime(fn: Callable[[argparse.Namespace], str]) -> Callable[[argparse.Namespace], int]:
    """Run ``fn`` (which validates its inputs, then calls :func:`_runtime`); tear the runtime down
    afterwards only if ``fn`` started it."""

    def run(args: argparse.Namespace) -> int:
        from megatron_hybrid.runtime.distributed import destroy_runtime

        try:
            _say(fn(args))
        finally:
            if getattr(args, "runtime_started", False):
                destroy_runtime()
        return 0

    return run


def _one_process(args: argparse.Namespace) -> None:
    """convert-to-hf and export-peft read whole tensors and write one directory: one process."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ValueError(
            f"{args.command} runs as one process (it reads whole tensors from any layout); "
            f"start it with python, not torchrun (WORLD_SIZE={world})"
        )


def _check_out(args: argparse.Namespace, *inputs: tuple[str, object]) -> None:
    """Refuse ``--out`` before any model is built (the write refuses it too, but only after the
    whole model was built and filled): one that holds something (unless ``--overwrite``), is a
    file, the current directory or one above it, or a mount point; and one that is, contains or
    lies inside an input (``inputs``: (flag, path) pairs, None skipped), which ``--overwrite``
    would replace while it is being read."""
    from pathlib import Path

    from megatron_hybrid.fileio import check_writable_directory

    check_writable_directory(args.out, overwrite=args.overwrite)
    out = Path(args.out).resolve()
    for flag, path in inputs:
        if path is None:
            continue
        src = Path(path).resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ValueError(
                f"--out {args.out} overlaps the input {flag} {path}; write to another directory"
            )


@_with_runtime
def _convert_hf(args: argparse.Namespace) -> str:
    from megatron_hybrid.convert.hf_to_mcore import convert_hf_to_mcore, hf_model_config

    hf_model_config(args.hf, args.dtype)  # validate before starting anything
    _check_out(args, ("--hf", args.hf))
    parallel = _runtime(args)
    out = convert_hf_to_mcore(
        args.hf, args.out, parallel, params_dtype=args.dtype, overwrite=args.overwrite
    )
    return f"Megatron base checkpoint written to {out}"


@_with_runtime
def _merge(args: argparse.Namespace) -> str:
    from megatron_hybrid.convert.merge import merge_checkpoint, read_trainables_meta

    trainables, meta = read_trainables_meta(args.trainables)
    _check_out(args, ("--trainables", trainables), ("the base", args.base or meta.base))
    parallel = _runtime(args)
    out = merge_checkpoint(
        args.trainables,
        args.out,
        parallel,
        base=args.base,
        fft_only=args.fft_only,
        overwrite=args.overwrite,
    )
    return f"merged checkpoint written to {out}"


@_with_runtime
def _convert_to_hf(args: argparse.Namespace) -> str:
    from megatron_hybrid.checkpoint import read_meta, resolve_checkpoint, verify_checkpoint
    from megatron_hybrid.convert.mcore_to_hf import convert_mcore_to_hf

    directory = resolve_checkpoint(args.checkpoint)
    verify_checkpoint(directory)
    read_meta(directory)
    _check_out(args, ("--checkpoint", directory), ("--tokenizer-from", args.tokenizer_from))
    _one_process(args)
    _runtime(args, layout=False)
    out = convert_mcore_to_hf(
        directory,
        args.out,
        dtype=args.dtype,
        arch=args.arch,
        tokenizer_from=args.tokenizer_from,
        overwrite=args.overwrite,
    )
    return f"HF model written to {out}"


@_with_runtime
def _export_peft(args: argparse.Namespace) -> str:
    from megatron_hybrid.convert.export_peft import export_peft
    from megatron_hybrid.convert.merge import read_trainables_meta

    trainables, meta = read_trainables_meta(args.trainables)
    _check_out(args, ("--trainables", trainables), ("the base", meta.base))
    _one_process(args)
    _runtime(args, layout=False)
    out = export_peft(
        args.trainables,
        args.out,
        fft_mode=args.fft_mode,
        arch=args.arch,
        base_model_name_or_path=args.base_model,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    return f"HF PEFT adapter written to {out} (see its README.md)"


def _layout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run (default 1)")
    p.add_argument(
        "--pp", type=int, default=1, help="pipeline-parallel size of this run (default 1)"
    )


def add_checkpoint_subcommands(subparsers) -> None:
    """Add ``convert-hf``, ``convert-to-hf``, ``merge`` and ``export-peft`` to an argparse
    sub-parser set; each sets ``func(args) -> int``."""
    from megatron_hybrid.convert.export_peft import FFT_MODES

    p = subparsers.add_parser(
        "convert-hf",
        help="HF Llama/Qwen2 (safetensors) -> Megatron base checkpoint (torchrun: any TP/PP)",
    )
    p.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="parameter dtype (default: the HF config's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _layout(p)
    p.set_defaults(func=_convert_hf)

    p = subparsers.add_parser(
        "merge",
        help="base + hybrid trainables -> plain merged Megatron checkpoint (torchrun: any TP/PP)",
    )
    p.add_argument(
        "--trainables", required=True, help="run directory (uses latest) or iter_* directory"
    )
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--base", help="base checkpoint (default: the one recorded in the trainables)")
    p.add_argument(
        "--fft-only", action="store_true", help="merge FFT weights only, drop LoRA (for vLLM)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _layout(p)
    p.set_defaults(func=_merge)

    p = subparsers.add_parser(
        "convert-to-hf", help="base/merged Megatron checkpoint -> HF safetensors + config.json"
    )
    p.add_argument("--checkpoint", required=True, help="base or merged checkpoint directory")
    p.add_argument("--out", required=True, help="HF model directory to write")
    p.add_argument("--dtype", choices=_DTYPES, help="weight dtype (default: the original HF dtype)")
    p.add_argument("--arch", help="llama or qwen2, when the checkpoint did not come from HF")
    p.add_argument("--tokenizer-from", help="copy tokenizer files from this HF directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    p.set_defaults(func=_convert_to_hf)

    p = subparsers.add_parser(
        "export-peft", help="hybrid trainables -> HF PEFT adapter (LoRA + FFT module weights)"
    )
    p.add_argument(
        "--trainables", required=True, help="run directory (uses latest) or iter_* directory"
    )
    p.add_argument("--out", required=True, help="adapter directory to write")
    p.add_argument(
        "--fft-mode",
        choices=FFT_MODES,
        default="modules_to_save",
        help="FFT weights: in the adapter as PEFT modules_to_save (transformers/peft), in a "
        "companion fft_weights.safetensors, or not at all (vLLM: merge --fft-only instead)",
    )
    p.add_argument("--arch", help="llama or qwen2, when the base did not come from HF")
    p.add_argument("--base-model", help="base_model_name_or_path to record in adapter_config.json")
    p.add_argument("--dtype", choices=_DTYPES, help="tensor dtype in the adapter (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    p.set_defaults(func=_export_peft)


def main(argv: list[str] | None = None) -> int:
    """Run one checkpoint subcommand (``scripts/*.py`` and ``python -m megatron_hybrid.convert.cli``)."""
    parser = argparse.ArgumentParser(prog="megatron-hybrid", description=__doc__.splitlines()[0])
    add_checkpoint_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"megatron-hybrid {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
