"""Hybrid trainables -> an HF PEFT LoRA adapter (+ the FFT modules' full weights).

Output directory::

    adapter_config.json          PEFT LoraConfig (peft_type LORA, target_modules = full HF module names)
    adapter_model.safetensors    base_model.model.<module>.lora_{A,B}.weight
                                 (+ base_model.model.<module>.weight / .bias of FFT modules when
                                 fft_mode = "modules_to_save")
    fft_weights.safetensors      fft_mode = "companion": FFT modules under their plain HF names
    README.md                    how to load it (transformers/peft and vLLM)

Fused Megatron modules are split: ``linear_qkv``'s B rows go to ``q_proj`` / ``k_proj`` /
``v_proj`` (de-interleaved per query group) and ``linear_fc1``'s to ``gate_proj`` / ``up_proj``;
each keeps the module's shared A (``B_q A x`` is exactly the q rows of ``B A x``).

Scaling: PEFT and vLLM compute ``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); vLLM uses the
adapter's single ``r`` and ``lora_alpha`` for every module. Modules whose rank differs from the
plan's default therefore get B rescaled by ``s_module / s_default`` and an ``alpha_pattern`` entry
that makes PEFT's per-module scaling ``s_default``: both loaders compute the trained update.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from megatron_hybrid.checkpoint.commit import CheckpointError, resolve_checkpoint
from megatron_hybrid.checkpoint.metadata import read_meta
from megatron_hybrid.convert.arch import ArchSpec, arch_by_name, arch_for
from megatron_hybrid.convert.hf_io import _safetensors, write_json
from megatron_hybrid.convert.mcore_to_hf import full_tensors
from megatron_hybrid.convert.merge import read_trainables_meta
from megatron_hybrid.fileio import check_writable_directory, staged_directory
from megatron_hybrid.peft.plan import HybridPlan

__all__ = ["FFT_MODES", "export_peft"]

FFT_MODES = ("modules_to_save", "companion", "none")
PREFIX = "base_model.model."
COMPANION = "fft_weights.safetensors"


def _spec(meta, arch: str | None, directory: Path) -> tuple[ArchSpec, dict | None]:
    original = None
    if meta.base:
        try:
            original = (read_meta(resolve_checkpoint(meta.base)).hf or {}).get("config")
        except (CheckpointError, FileNotFoundError) as e:
            if arch is None:  # the real cause, not "records no HF origin"
                raise ValueError(
                    f"{directory}: its base {meta.base} cannot be read ({e}); restore it, or pass "
                    "--arch (llama / qwen2) and --base-model"
                ) from e
    if arch is not None:
        return arch_by_name(arch), original
    if original is not None:
        return arch_for(original), original
    raise ValueError(
        f"{directory}: its base records no HF origin; pass it with --arch (LlamaForCausalLM or Qwen2ForCausalLM, or llama / qwen2)"
    )


def _denominator(rank: int, rslora: bool) -> float:
    return math.sqrt(rank) if rslora else float(rank)


def _lora_tensors(plan: HybridPlan, tensors: dict, mapping) -> tuple[dict, list, dict]:
    out, targets, alpha_pattern = {}, [], {}
    default = plan.lora.scaling
    for name in plan.names("lora"):
        cfg = plan.lora_config_for(name)
        a, b = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
        if cfg.rank != plan.lora.rank:
            b = b * (cfg.scaling / default)
        for hf, b_part in zip(mapping.hf_modules(name), mapping.split_rows(name, b)):
            out[f"{PREFIX}{hf}.lora_A.weight"] = a.clone()
            out[f"{PREFIX}{hf}.lora_B.weight"] = b_part
            targets.append(hf)
            if cfg.rank != plan.lora.rank:
                alpha_pattern[hf] = default * _denominator(cfg.rank, plan.lora.use_rslora)
    return out, targets, alpha_pattern


def _fft_tensors(plan: HybridPlan, tensors: dict, mapping) -> tuple[dict, list]:
    out, modules = {}, []
    for name in plan.names("fft"):
        for leaf in ("weight", "bias"):
            key = f"{name}.{leaf}"
            if key in tensors:
                for hf, part in zip(
                    mapping.hf_modules(name), mapping.split_rows(name, tensors[key])
                ):
                    out[f"{hf}.{leaf}"] = part
        modules += mapping.hf_modules(name)
    return out, modules


def _readme(fft_mode: str, fft_modules: list[str], base: str | None) -> str:
    base = base or "<the HF base model>"
    lines = [
        "# Hybrid-LoRA adapter (exported by megatron-hybrid)",
        "",
        f"LoRA on {'some' if fft_modules else 'all trained'} modules; "
        f"{len(fft_modules)} module(s) fully fine-tuned: {', '.join(fft_modules) or 'none'}.",
        "",
        "## transformers + peft",
        "```python",
        "from transformers import AutoModelForCausalLM",
        "from peft import PeftModel",
        f'model = AutoModelForCausalLM.from_pretrained("{base}")',
    ]
    if fft_mode == "companion" and fft_modules:
        lines += [
            "from safetensors.torch import load_file",
            f'model.load_state_dict(load_file("{COMPANION}"), strict=False)  # FFT modules',
        ]
    lines += ['model = PeftModel.from_pretrained(model, "<this directory>")', "```", ""]
    lines += ["## vLLM", ""]
    if fft_modules:
        lines += [
            "vLLM's LoRA does not load full-weight modules (`modules_to_save`). Serve a base with the",
            "FFT weights in it and this adapter's LoRA part:",
            "",
            "```bash",
            "megatron-hybrid merge --trainables RUN --out FFT_BASE --fft-only",
            "megatron-hybrid convert-to-hf --checkpoint FFT_BASE --out FFT_BASE_HF",
            "megatron-hybrid export-peft --trainables RUN --out ADAPTER --fft-mode none",
            "vllm serve FFT_BASE_HF --enable-lora --lora-modules hybrid=ADAPTER --max-lora-rank R",
            "```",
            "",
            f"(or write `{COMPANION}` of `--fft-mode companion` into a copy of the HF base).",
        ]
    else:
        lines += ["`vllm serve BASE --enable-lora --lora-modules hybrid=<this directory>`"]
    lines += [
        "",
        "Per-module ranks: B is pre-scaled so that the adapter's single `r` / `lora_alpha` scaling",
        "(all vLLM uses) gives each module's trained update; PEFT reads `alpha_pattern` for the same.",
    ]
    return "\n".join(lines) + "\n"


def export_peft(
    trainables: str | Path,
    out_dir: str | Path,
    *,
    fft_mode: str = "modules_to_save",
    arch: str | None = None,
    base_model_name_or_path: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapter directory (one process; needs ``torch.distributed`` initialised).

    Written whole or not at all: an existing non-empty ``out_dir`` is refused unless
    ``overwrite``, and then replaced (a stale ``fft_weights.safetensors`` of an earlier
    ``companion`` export never survives next to a new adapter).
    """
    if fft_mode not in FFT_MODES:
        raise ValueError(f"fft_mode must be one of {FFT_MODES}, got {fft_mode!r}")
    check_writable_directory(out_dir, overwrite=overwrite)
    directory, meta = read_trainables_meta(trainables)
    plan, model = meta.hybrid_plan(), meta.model_config()
    spec, original = _spec(meta, arch, directory)
    spec.check_model(model)
    mapping = spec.tensor_mapping(model)
    wanted = {f"{n}.{leaf}" for n in plan.names("lora") for leaf in ("lora_A", "lora_B")}
    wanted |= {f"{n}.{leaf}" for n in plan.names("fft") for leaf in ("weight", "bias")}
    tensors = full_tensors(directory, keep=wanted.__contains__)  # no optimizer moments
    adapter, targets, alpha_pattern = _lora_tensors(plan, tensors, mapping)
    fft, fft_modules = _fft_tensors(plan, tensors, mapping)
    base = base_model_name_or_path or (original or {}).get("_name_or_path") or None
    cast = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    to = cast[dtype] if dtype else torch.float32
    if fft_mode == "modules_to_save":
        adapter.update({PREFIX + k: v for k, v in fft.items()})
    config = _adapter_config(plan, mapping, targets, alpha_pattern, fft_modules, fft_mode, base)
    st = _safetensors()
    with staged_directory(out_dir, overwrite=overwrite) as out:
        if fft_mode == "companion" and fft:
            st.torch.save_file(
                {k: v.to(to).contiguous() for k, v in fft.items()}, str(out / COMPANION)
            )
        st.torch.save_file(
            {k: v.to(to).contiguous() for k, v in adapter.items()},
            str(out / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        write_json(out / "adapter_config.json", config)
        (out / "README.md").write_text(_readme(fft_mode, fft_modules, base))
    return Path(out_dir)


def _adapter_config(
    plan: HybridPlan, mapping, targets, alpha_pattern: dict, fft_modules, fft_mode: str, base
) -> dict:
    """``adapter_config.json`` (PEFT's ``LoraConfig`` fields)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": plan.lora.rank,
        "lora_alpha": plan.lora.alpha,
        "lora_dropout": plan.lora.dropout,
        "use_rslora": plan.lora.use_rslora,
        "target_modules": sorted(targets),
        "rank_pattern": {
            hf: plan.lora_config_for(n).rank
            for n in plan.names("lora")
            for hf in mapping.hf_modules(n)
            if plan.lora_config_for(n).rank != plan.lora.rank
        },
        "alpha_pattern": alpha_pattern,
        "modules_to_save": sorted(fft_modules)
        if fft_mode == "modules_to_save" and fft_modules
        else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
