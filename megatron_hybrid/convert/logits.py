"""Full-vocabulary logits of Megatron model chunks at any TP/PP layout (for verification).

Runs one forward-only pass of Megatron's pipeline schedule, gathers the tensor-parallel vocabulary
shards on the last stage, and hands the result to every rank. Meant for checking conversions and
checkpoints on small inputs: the logits travel through ``all_gather_object``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

__all__ = ["model_logits"]


@torch.no_grad()
def model_logits(
    chunks: Sequence[torch.nn.Module], tokens: torch.Tensor, vocab_size: int | None = None
) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` (fp32, CPU) of ``tokens`` ``[b, s]``, on every rank.

    Collective over the whole job. ``vocab_size`` drops the vocabulary padding columns.
    """
    collected: list[torch.Tensor] = []
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    device = next(p for c in chunks for p in c.parameters()).device
    tokens, position_ids = tokens.to(device), position_ids.to(device)
    config = chunks[0].config

    def loss_func(output: torch.Tensor):
        full = gather_from_tensor_model_parallel_region(output)
        collected.append(full.float().cpu())
        zero = output.sum() * 0
        if getattr(config, "calculate_per_token_loss", False):
            return zero, torch.tensor(1, dtype=torch.int, device=output.device), {}
        return zero, {}

    def forward_step(data_iterator, model):
        toks = next(data_iterator)
        return model(toks, position_ids, None), loss_func

    vpp = len(chunks)
    iterators = [iter([tokens]) for _ in range(vpp)] if vpp > 1 else iter([tokens])
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators,
        model=list(chunks) if vpp > 1 else chunks[0],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
    )
    for c, mode in zip(chunks, modes):
        c.train(mode)
    mine = collected[0] if collected else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[torch.Tensor | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        mine = next(x for x in everyone if x is not None)
    return mine if vocab_size is None else mine[..., :vocab_size]
