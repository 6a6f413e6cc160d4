"""HF configs -> ModelConfig, and errors on bad input: unknown architectures list the supported
ones; unsupported features, missing and truncated files are named."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_hybrid.convert.arch import arch_by_name, arch_for, supported_architectures
from megatron_hybrid.convert.hf_io import HFCheckpoint, write_hf_model
from megatron_hybrid.convert.hf_to_mcore import hf_model_config
from megatron_hybrid.convert.llama import LlamaMapping

LLAMA_CFG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "dtype": "bfloat16",
}


def _dir(tmp_path, **changes):
    cfg = {**LLAMA_CFG, **changes}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_llama_and_qwen2_configs_translate(tmp_path):
    spec, model = hf_model_config(_dir(tmp_path))
    assert spec.architecture == "LlamaForCausalLM"
    assert (model.num_layers, model.hidden_size, model.kv_heads, model.ffn_hidden_size) == (
        2,
        64,
        2,
        128,
    )
    assert (
        model.rotary_base == 5000
        and model.norm_epsilon == 1e-5
        and model.params_dtype == "bfloat16"
    )
    assert model.untie_embeddings_and_output_weights and not model.add_qkv_bias
    qwen = dict(
        LLAMA_CFG, architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True
    )
    qwen.pop("rope_parameters")
    qwen["rope_theta"] = 1000000.0  # transformers v4 spelling
    model = arch_for(qwen).model_config(qwen)
    assert model.add_qkv_bias and not model.untie_embeddings_and_output_weights
    assert model.rotary_base == 1000000
    # export writes the config back (both RoPE spellings for transformers v4 and v5)
    back = arch_by_name("qwen2").hf_config(model, None, "float32")
    assert back["rope_theta"] == 1000000 and back["rope_parameters"]["rope_theta"] == 1000000
    assert back["tie_word_embeddings"] is True and back["num_key_value_heads"] == 2


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fields_missing_from_config_json_take_the_defaults_of_transformers(arch):
    transformers = pytest.importorskip("transformers")
    spec = arch_by_name(arch)
    hf_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    defaults = hf_cls()
    theta = getattr(defaults, "rope_theta", None) or defaults.rope_parameters["rope_theta"]
    cfg = {
        k: v
        for k, v in LLAMA_CFG.items()
        if k not in ("rope_parameters", "max_position_embeddings", "rms_norm_eps")
    }
    cfg.update(architectures=[spec.architecture], model_type=spec.model_type)
    model = spec.model_config(cfg)
    assert model.rotary_base == theta
    assert model.max_sequence_length == defaults.max_position_embeddings
    assert model.norm_epsilon == defaults.rms_norm_eps


def test_unknown_architecture_lists_the_supported(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"unsupported HF architecture 'MistralForCausalLM'; supported: LlamaForCausalLM, Qwen2ForCausalLM",
    ):
        hf_model_config(_dir(tmp_path, architectures=["MistralForCausalLM"]))
    assert supported_architectures() == ["LlamaForCausalLM", "Qwen2ForCausalLM"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling"),
        ({"attention_bias": True}, "attention_bias: true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"head_dim": 32}, "head_dim 32 x num_attention_heads 4 != hidden_size 64"),
        ({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_unsupported_features_are_named(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message) as err:
        hf_model_config(_dir(tmp_path, **changes))
    assert "config.json" in str(err.value)


def test_missing_and_truncated_weight_files_are_named(tmp_path):
    pytest.importorskip("safetensors")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HFCheckpoint(tmp_path)
    _dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        HFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(
        FileNotFoundError, match=r"names missing files \['model-00001-of-00002.safetensors'\]"
    ):
        HFCheckpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    write_hf_model(tmp_path / "w", {"x": torch.ones(1000)}, LLAMA_CFG)
    data = (tmp_path / "w" / "model.safetensors").read_bytes()
    (tmp_path / "w" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors.*(damaged or truncated|truncated)"):
        HFCheckpoint(tmp_path / "w").get("x")


def test_sharded_hf_writing_round_trips(tmp_path):
    pytest.importorskip("safetensors")
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(4)}
    write_hf_model(tmp_path, tensors, LLAMA_CFG, max_shard_bytes=2048)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    ckpt = HFCheckpoint(tmp_path)
    assert ckpt.keys() == sorted(tensors)
    assert all(torch.equal(ckpt.get(k), v) for k, v in tensors.items())


def test_mapping_names_every_hf_tensor_once():
    model = arch_for(LLAMA_CFG).model_config(LLAMA_CFG)
    mapping = LlamaMapping(model)
    used = mapping.hf_names_used()
    assert len(used) == 2 + 1 + model.num_layers * 9  # embed, norm, lm_head + 9 per layer
    assert mapping.hf_modules("decoder.layers.1.mlp.linear_fc1") == [
        "model.layers.1.mlp.gate_proj",
        "model.layers.1.mlp.up_proj",
    ]
    with pytest.raises(ValueError, match="has no HF counterpart"):
        mapping.hf_modules("decoder.layers.1.mlp")


def test_architecture_names_are_matched_without_case():
    assert arch_by_name("Llama") is arch_by_name("LlamaForCausalLM") is arch_by_name("llama")


def test_tokenizer_from_must_name_a_directory_with_tokenizer_files(tmp_path):
    """Before, a wrong --tokenizer-from copied nothing and the export went on without a word."""
    from megatron_hybrid.convert.mcore_to_hf import _tokenizer_files

    with pytest.raises(FileNotFoundError, match=r"--tokenizer-from .*nowhere is not a directory"):
        _tokenizer_files(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"holds none of the tokenizer files"):
        _tokenizer_files(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert _tokenizer_files(tmp_path) == [tmp_path / "tokenizer.json"]
    assert _tokenizer_files(None) == []


def test_export_peft_names_a_base_that_moved(tmp_path):
    """Before, an unreadable recorded base was reported as "its base records no HF origin"."""
    from types import SimpleNamespace

    from megatron_hybrid.convert.export_peft import _spec

    meta = SimpleNamespace(base=str(tmp_path / "moved_base"))
    with pytest.raises(ValueError, match=r"its base .*moved_base cannot be read"):
        _spec(meta, None, tmp_path / "run")
