"""Build Megatron-Core ``GPTModel`` chunks from a :class:`ModelConfig` and a parallel layout.

``build_model`` returns a list of model chunks (one per virtual pipeline stage held by this rank),
the form Megatron's schedules, DDP and optimizer expect. The local spec (Megatron-Core modules and
our sequence-parallel-capable norm) runs everywhere; the Transformer Engine spec is used when
``transformer_impl: transformer_engine`` is asked for and TE imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.norms import SequenceParallelNorm
from megatron_hybrid.runtime.distributed import ParallelConfig

try:  # TE is optional; a broken install raises RuntimeError, not ImportError.
    import transformer_engine  # noqa: F401
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    HAVE_TE = True
except Exception:  # noqa: BLE001
    HAVE_TE = False

__all__ = ["HAVE_TE", "build_model", "layer_spec", "transformer_config"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def transformer_config(model: ModelConfig, parallel: ParallelConfig) -> TransformerConfig:
    """The Megatron ``TransformerConfig`` for this architecture and layout (dropout off)."""
    if model.num_layers % parallel.pipeline_model_parallel_size:
        raise ValueError(
            f"model.num_layers ({model.num_layers}) must be divisible by "
            f"parallel.pipeline_model_parallel_size ({parallel.pipeline_model_parallel_size})"
        )
    vpp = parallel.virtual_pipeline_model_parallel_size
    if vpp and model.num_layers % (parallel.pipeline_model_parallel_size * vpp):
        raise ValueError(
            f"model.num_layers ({model.num_layers}) must be divisible by pipeline x virtual "
            f"pipeline size ({parallel.pipeline_model_parallel_size} x {vpp})"
        )
    tp = parallel.tensor_model_parallel_size
    if model.kv_heads % tp:
        raise ValueError(
            f"model.num_query_groups ({model.kv_heads}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if model.ffn_hidden_size % tp:
        raise ValueError(
            f"model.ffn_hidden_size ({model.ffn_hidden_size}) must be divisible by "
            f"parallel.tensor_model_parallel_size ({tp})"
        )
    if (
        not torch.cuda.is_available()
        and not model.untie_embeddings_and_output_weights
        and parallel.pipeline_model_parallel_size > 1
    ):
        raise ValueError(
            "tied embeddings (model.untie_embeddings_and_output_weights: false) with "
            "pipeline_model_parallel_size > 1 need CUDA (Megatron's setup_embeddings_and_output_layer "
            "calls weight.data.cuda())"
        )
    dtype = _DTYPES[model.params_dtype]
    use_te = model.transformer_impl == "transformer_engine"
    if use_te and not HAVE_TE:
        raise ValueError(
            "model.transformer_impl is transformer_engine but transformer_engine does not import"
        )
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        init_method_std=model.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        batch_p2p_sync=torch.cuda.is_available(),
        batch_p2p_comm=torch.cuda.is_available(),
        recompute_granularity=model.recompute_granularity,
        recompute_method="uniform" if model.recompute_granularity == "full" else None,
        recompute_num_layers=1 if model.recompute_granularity == "full" else None,
        fp8=model.fp8,
    )


def layer_spec(model: ModelConfig, config: TransformerConfig, vp_stage: int | None = None):
    """The decoder spec of one chunk: TE fused modules, or local modules with our SP norm.

    For the local spec a ``TransformerBlockSubmodules`` is returned so that the final norm is ours
    too (Megatron's default final norm refuses sequence parallelism).
    """
    if model.transformer_impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization=model.normalization)
    spec.submodules.input_layernorm = SequenceParallelNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
    num = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num, layer_norm=SequenceParallelNorm)


def build_model(model: ModelConfig, parallel: ParallelConfig) -> list[GPTModel]:
    """Build this rank's model chunks (call after :func:`initialize_runtime`).

    Returns one ``GPTModel`` per virtual pipeline stage on this rank (a list of one without
    interleaving). Parameters live on this rank's device.
    """
    config = transformer_config(model, parallel)
    vocab = model.padded_vocab_size(parallel.tensor_model_parallel_size)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks: list[GPTModel] = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(model, config, stage),
            vocab_size=vocab,
            max_sequence_length=model.max_sequence_length,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type,
            rotary_base=model.rotary_base,
            vp_stage=stage,
        )
        # the real vocabulary: losses and sampling mask the padding rows beyond it
        gpt.unpadded_vocab_size = model.vocab_size
        if torch.cuda.is_available():
            gpt.cuda(torch.cuda.current_device())
        if config.recompute_granularity == "full":
            gpt.decoder.register_forward_pre_hook(_decoder_input_requires_grad, with_kwargs=True)
        chunks.append(gpt)
    return chunks


def _decoder_input_requires_grad(module, args, kwargs) -> None:
    """Make the decoder's input require grad when autograd is on (full activation recompute).

    Megatron's full recompute wraps each layer in a reentrant ``torch.autograd.Function`` whose
    output requires grad only if one of its *tensor inputs* does; the layer's own parameters do
    not count. With frozen embeddings (every hybrid and LoRA run, and gradient calibration) the
    first stage's decoder input does not require grad, so the whole decoder would silently get no
    gradients at all. This is the same fix as Hugging Face's ``enable_input_require_grads``; later
    pipeline stages receive an input that already requires grad.
    """
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and not hidden.requires_grad:
        hidden.requires_grad_(True)
