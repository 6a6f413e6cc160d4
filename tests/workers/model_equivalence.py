"""One training step of the test GPT at a given TP/PP layout, from given full weights.

Run under torchrun by ``tests/models/test_provider.py``::

    torchrun --nproc_per_node 2 model_equivalence.py --reference ref.pt --out out.pt --tp 2

Every rank builds its shard of the model, loads the full TP=1 weights of ``ref.pt`` (key
``weights``) into it, wraps it in Megatron DDP and runs one forward+backward of the batches in
``ref.pt`` (key ``batches``) through Megatron's schedule. Rank 0 writes ``out.pt`` with the mean
loss and the gathered full-shape weights and gradients.

The functions here are also what the single-process TP=1 reference runs, so both sides share one
code path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.models.provider import build_model
from megatron_hybrid.runtime.distributed import ParallelConfig

MODEL_CFG = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    vocab_size=64,
    max_sequence_length=32,
)
NUM_MICROBATCHES = 2
MICRO_BATCH_SIZE = 2
SEQ_LENGTH = 16


def make_batches(seed: int = 0) -> torch.Tensor:
    """Token ids ``[microbatches, micro_batch, seq + 1]`` (inputs and shifted labels)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_MICROBATCHES, MICRO_BATCH_SIZE, SEQ_LENGTH + 1)
    return torch.randint(0, MODEL_CFG.vocab_size, shape, generator=gen)


def _loss_func(per_token_loss: torch.Tensor):
    loss = per_token_loss.float().mean()
    return loss, {"loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    tokens = next(data_iterator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
    output = model(inputs, position_ids, None, labels=labels)
    return output, _loss_func


def build_ddp_model(
    model_cfg: ModelConfig, parallel: ParallelConfig, full_weights: dict | None = None
) -> list:
    """This rank's chunks, optionally loaded from full weights, wrapped in Megatron DDP."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from tests.sharding import load_full_state_dict

    chunks = build_model(model_cfg, parallel)
    if full_weights is not None:
        load_full_state_dict(chunks, full_weights, model_cfg)
    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
    )
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    # Reduces sequence-parallel norm grads over TP and tied-embedding grads over PP.
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def train_step(chunks: list, batches: torch.Tensor) -> tuple[float | None, list[dict]]:
    """One forward+backward through ``get_forward_backward_func()``.

    Returns the mean loss over the microbatches (None off the last pipeline stage) and, per chunk,
    the gradients ``{local name: main_grad}`` of the unwrapped model.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
        model=chunks,
        num_microbatches=batches.shape[0],
        seq_length=batches.shape[2] - 1,
        micro_batch_size=batches.shape[1],
        forward_only=False,
    )
    loss = torch.stack([x["loss"] for x in losses]).mean().item() if losses else None
    grads = [
        {name: p.main_grad.detach().clone() for name, p in chunk.module.named_parameters()}
        for chunk in chunks
    ]
    return loss, grads


def main() -> None:
    import torch.distributed as dist

    from megatron_hybrid.runtime.distributed import destroy_runtime, initialize_runtime
    from tests.sharding import gather_full_state_dict

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()

    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        sequence_parallel=args.sequence_parallel,
    )
    initialize_runtime(parallel, seed=1234)
    reference = torch.load(args.reference, weights_only=True)
    chunks = build_ddp_model(MODEL_CFG, parallel, reference["weights"])
    loss, grads = train_step(chunks, reference["batches"])

    weights = gather_full_state_dict([c.module.state_dict() for c in chunks], MODEL_CFG)
    full_grads = gather_full_state_dict(grads, MODEL_CFG, replica_atol=1e-6)
    losses: list[float | None] = [None] * dist.get_world_size()
    dist.all_gather_object(losses, loss)
    last_stage_losses = [x for x in losses if x is not None]
    if dist.get_rank() == 0:
        result = {"losses": last_stage_losses, "weights": weights, "grads": full_grads}
        torch.save(result, args.out)
        print(f"losses of the last-stage ranks: {last_stage_losses}", flush=True)
    destroy_runtime()


if __name__ == "__main__":
    main()
