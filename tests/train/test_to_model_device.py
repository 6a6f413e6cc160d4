"""Training forward steps move their micro-batches to the model's device (a GPU model is fed
CPU-built batches): the batch comes back on the parameters' device, untouched when already there."""

from __future__ import annotations

import torch

from megatron_hybrid.rl.grpo import RLBatch
from megatron_hybrid.train.step import Batch, to_model_device


def _batch() -> Batch:
    t = torch.ones(2, 3, dtype=torch.long)
    return Batch(tokens=t, labels=t, loss_mask=torch.ones(2, 3))


def test_a_batch_on_the_models_device_is_returned_as_is():
    b = _batch()
    assert to_model_device(b, torch.nn.Linear(2, 2)) is b


def test_every_tensor_moves_to_the_models_device():
    model = torch.nn.Linear(2, 2, device="meta")  # any device other than the batch's
    moved = to_model_device(_batch(), model)
    assert {t.device.type for t in (moved.tokens, moved.labels, moved.loss_mask)} == {"meta"}
    rl = RLBatch(
        tokens=torch.ones(2, 3, dtype=torch.long),
        labels=torch.ones(2, 3, dtype=torch.long),
        loss_mask=torch.ones(2, 3),
        old_logprobs=torch.zeros(2, 3),
        advantages=torch.zeros(2),
        ref_logprobs=None,
    )
    out = to_model_device(rl, model)
    assert out.old_logprobs.device.type == out.advantages.device.type == "meta"
    assert out.ref_logprobs is None
