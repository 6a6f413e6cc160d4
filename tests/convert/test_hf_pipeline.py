"""Tiny random HF Llama and Qwen2 end to end.

HF -> Megatron at TP=2 (torchrun) and TP=1 (the CLI, one process) gives HF's logits; the hybrid
model trained a few steps at TP=2 and merged at TP=2, exported to HF, reloads in transformers with
the hybrid model's logits; the PEFT export loaded with peft on the HF base gives them too (FFT
weights as ``modules_to_save`` or as a companion file).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("safetensors")

from megatron_hybrid.checkpoint import load_model, read_meta  # noqa: E402
from megatron_hybrid.convert.cli import main  # noqa: E402
from megatron_hybrid.convert.export_peft import export_peft  # noqa: E402
from megatron_hybrid.convert.hf_to_mcore import hf_model_config  # noqa: E402
from megatron_hybrid.convert.logits import model_logits  # noqa: E402
from megatron_hybrid.convert.mcore_to_hf import convert_mcore_to_hf  # noqa: E402
from megatron_hybrid.models.provider import build_model  # noqa: E402
from megatron_hybrid.runtime.distributed import ParallelConfig, initialize_runtime  # noqa: E402
from tests.convert.hf_models import hf_logits, load_hf_model, make_hf_model  # noqa: E402
from tests.multirank import launch, worker_path  # noqa: E402

pytestmark = pytest.mark.multirank

ARCHS = ("llama", "qwen2")
HF_TOL = 1e-4  # Megatron vs transformers, fp32


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    for i, arch in enumerate(ARCHS):
        make_hf_model(arch, tmp / arch / "hf", seed=i)
    launch(worker_path("ckpt_hf"), 2, "--dir", str(tmp), "--arch", *ARCHS, "--tp", "2", timeout=600)
    return tmp, {arch: torch.load(tmp / arch / "tp2.pt", weights_only=False) for arch in ARCHS}


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_conversion_matches_hf(pipeline, arch):
    _, res = pipeline
    assert _max_diff(res[arch]["converted"], res[arch]["hf"]) < HF_TOL
    # the trained hybrid model is not the base: later comparisons are not trivially satisfied
    assert _max_diff(res[arch]["hybrid"], res[arch]["hf"]) > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_tp2_checkpoint_loads_at_tp1_with_another_vocab_padding(
    single_rank_runtime, pipeline, arch
):
    tmp, res = pipeline
    _, model_cfg = hf_model_config(tmp / arch / "hf")
    assert model_cfg.padded_vocab_size(2) != model_cfg.padded_vocab_size(1)
    chunks = build_model(model_cfg, ParallelConfig())
    load_model(tmp / arch / "base", chunks, model_cfg)
    logits = model_logits(chunks, res[arch]["tokens"], model_cfg.vocab_size)
    assert _max_diff(logits, res[arch]["hf"]) < HF_TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_at_tp2_exports_to_hf_with_the_hybrid_logits(single_rank_runtime, pipeline, arch):
    tmp, res = pipeline
    meta = read_meta(tmp / arch / "merged")
    assert meta.kind == "merged" and meta.details["merged"] == ["fft", "lora"]
    out = convert_mcore_to_hf(tmp / arch / "merged", tmp / arch / "merged_hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [
        {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    ]
    model = load_hf_model(arch, out)
    assert model.config.vocab_size == res[arch]["hf"].shape[-1]  # padding rows stripped
    assert _max_diff(hf_logits(model, res[arch]["tokens"]), res[arch]["hybrid"]) < HF_TOL


@pytest.mark.parametrize("fft_mode", ["modules_to_save", "companion"])
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_export_on_the_hf_base_gives_the_hybrid_logits(
    single_rank_runtime, pipeline, arch, fft_mode
):
    from peft import PeftModel
    from safetensors.torch import load_file

    tmp, res = pipeline
    out = export_peft(tmp / arch / "run", tmp / arch / f"peft_{fft_mode}", fft_mode=fft_mode)
    config = json.loads((out / "adapter_config.json").read_text())
    # linear_qkv / linear_fc1 adapters are split into q/k/v and gate/up with their shared A
    assert "model.layers.0.self_attn.k_proj" in config["target_modules"]
    assert config["rank_pattern"] == {
        "model.layers.0.mlp.gate_proj": 2,
        "model.layers.0.mlp.up_proj": 2,
    }
    base = load_hf_model(arch, tmp / arch / "hf")
    if fft_mode == "companion":
        assert config["modules_to_save"] is None
        missing = base.load_state_dict(load_file(out / "fft_weights.safetensors"), strict=False)
        assert not missing.unexpected_keys
    else:
        assert "model.layers.1.mlp.gate_proj" in config["modules_to_save"]
    model = PeftModel.from_pretrained(base, out).eval()
    assert _max_diff(hf_logits(model, res[arch]["tokens"]), res[arch]["hybrid"]) < HF_TOL


def test_tp1_conversion_through_the_cli_matches_hf(single_rank_runtime, pipeline, capsys):
    tmp, res = pipeline
    arch = "qwen2"
    out = tmp / arch / "base_tp1"
    assert main(["convert-hf", "--hf", str(tmp / arch / "hf"), "--out", str(out)]) == 0
    assert "Megatron base checkpoint written to" in capsys.readouterr().out
    initialize_runtime(ParallelConfig())  # the subcommand tore its runtime down
    _, model_cfg = hf_model_config(tmp / arch / "hf")
    chunks = build_model(model_cfg, ParallelConfig())
    load_model(out, chunks, model_cfg)
    logits = model_logits(chunks, res[arch]["tokens"], model_cfg.vocab_size)
    assert _max_diff(logits, res[arch]["hf"]) < HF_TOL


def test_vllm_path_fft_merged_base_plus_lora_only_adapter(single_rank_runtime, pipeline):
    """``merge --fft-only`` -> HF base, plus a LoRA-only adapter, gives the hybrid logits."""
    from peft import PeftModel

    from megatron_hybrid.convert.merge import merge_checkpoint

    tmp, res = pipeline
    d = tmp / "llama"
    merge_checkpoint(d / "run", d / "fft_merged", ParallelConfig(), fft_only=True)
    assert read_meta(d / "fft_merged").details["merged"] == ["fft"]
    base = load_hf_model("llama", convert_mcore_to_hf(d / "fft_merged", d / "fft_merged_hf"))
    adapter = export_peft(d / "run", d / "peft_lora_only", fft_mode="none")
    assert not (adapter / "fft_weights.safetensors").exists()
    assert "vllm serve" in (adapter / "README.md").read_text()
    model = PeftModel.from_pretrained(base, adapter).eval()
    assert _max_diff(hf_logits(model, res["llama"]["tokens"]), res["llama"]["hybrid"]) < HF_TOL


def test_outputs_are_refused_when_they_exist_and_replaced_whole_with_overwrite(
    single_rank_runtime, pipeline, capsys
):
    """Writing into an existing output mixed old and new files (a stale fft_weights.safetensors,
    or a stale single-file model next to a new sharded one); now an existing output is refused,
    naming it, and ``--overwrite`` replaces the directory whole."""
    tmp, _ = pipeline
    d = tmp / "llama"
    adapter = d / "peft_again"
    export_peft(d / "run", adapter, fft_mode="companion")
    assert (adapter / "fft_weights.safetensors").is_file()
    argv = ["export-peft", "--trainables", str(d / "run"), "--out", str(adapter)]
    assert main([*argv, "--fft-mode", "none"]) == 2
    err = capsys.readouterr().err
    assert "peft_again already exists and is not empty" in err and "--overwrite" in err
    assert (adapter / "fft_weights.safetensors").is_file()  # untouched
    assert main([*argv, "--fft-mode", "none", "--overwrite"]) == 0
    assert sorted(p.name for p in adapter.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    initialize_runtime(ParallelConfig())  # the subcommand tore its runtime down

    hf_out = d / "merged_hf_again"
    convert_mcore_to_hf(d / "merged", hf_out)
    (hf_out / "model.safetensors.index.json").write_text("{}")  # a stale file of another export
    with pytest.raises(FileExistsError, match="merged_hf_again"):
        convert_mcore_to_hf(d / "merged", hf_out)
    convert_mcore_to_hf(d / "merged", hf_out, overwrite=True)
    assert not (hf_out / "model.safetensors.index.json").exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no staging left behind

    # merge / convert-hf refuse an existing --out before building the model.
    assert main(["merge", "--trainables", str(d / "run"), "--out", str(d / "merged")]) == 2
    err = capsys.readouterr().err
    assert "merged already exists" in err and "--overwrite" in err
