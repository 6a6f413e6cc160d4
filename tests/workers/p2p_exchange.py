"""Pipeline p2p on CPU: send activations forward and gradients back between 2 stages.

Run under torchrun with 2 ranks by ``tests/runtime/test_cpu_compat.py``. Exercises Megatron's
``P2PCommunicator`` (receive buffers on ``torch.cuda.current_device()``, shape exchange with
``variable_seq_lengths``, ``torch.cuda.synchronize()`` after batched ops) in every mode that the
schedules use, and checks the received values. Exits nonzero on any mismatch.
"""

from __future__ import annotations

import torch

MODES = {
    "p2p": {"batch_p2p_comm": False, "batch_p2p_sync": False},
    "p2p-variable-shapes": {
        "batch_p2p_comm": False,
        "batch_p2p_sync": False,
        "variable_seq_lengths": True,
    },
    "batched-synced": {"batch_p2p_comm": True, "batch_p2p_sync": True},
}


def main() -> None:
    import torch.distributed as dist
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    from megatron_hybrid.runtime.distributed import (
        ParallelConfig,
        destroy_runtime,
        initialize_runtime,
    )

    initialize_runtime(ParallelConfig(pipeline_model_parallel_size=2), seed=1234)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    shape = (4, 2, 8)
    activation = torch.arange(32 * 2, dtype=torch.float32).reshape(shape)
    for name, flags in MODES.items():
        config = ModelParallelConfig(
            pipeline_model_parallel_size=2, pipeline_dtype=torch.float32, **flags
        )
        comm = P2PCommunicator(parallel_state.get_pipeline_model_parallel_group(), config)
        if rank == 0:
            comm.send_forward(activation, is_last_stage=False)
            grad = comm.recv_backward(shape, is_last_stage=False)
            torch.testing.assert_close(grad, -2 * activation, msg=f"{name}: backward")
        else:
            received = comm.recv_forward(shape, is_first_stage=False)
            torch.testing.assert_close(received, activation, msg=f"{name}: forward")
            comm.send_backward(-2 * received.detach(), is_first_stage=False)
        dist.barrier()
        print(f"rank {rank}: {name} ok", flush=True)
    destroy_runtime()


if __name__ == "__main__":
    main()
