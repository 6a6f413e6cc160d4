"""ParallelConfig validation and the data-parallel size check at initialisation."""

from __future__ import annotations

import pytest

from megatron_hybrid.runtime.distributed import ParallelConfig, initialize_runtime


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"tensor_model_parallel_size": 0}, "tensor_model_parallel_size"),
        ({"pipeline_model_parallel_size": -1}, "pipeline_model_parallel_size"),
        ({"data_parallel_size": 0}, "data_parallel_size"),
        ({"virtual_pipeline_model_parallel_size": 2}, "virtual_pipeline_model_parallel_size"),
        ({"sequence_parallel": True}, "sequence_parallel"),
        ({"backend": "mpi"}, "backend"),
    ],
)
def test_bad_values_name_the_key(kw, key):
    with pytest.raises(ValueError, match=rf"parallel\.{key}"):
        ParallelConfig(**kw)


def test_wrong_data_parallel_size_for_the_launch_is_an_error(single_rank_runtime):
    with pytest.raises(ValueError, match=r"data_parallel_size is 2 but world size 1"):
        initialize_runtime(ParallelConfig(data_parallel_size=2))
    initialize_runtime(ParallelConfig(data_parallel_size=1))


def test_without_launcher_env_drops_exactly_the_rendezvous_variables():
    from megatron_hybrid.runtime.distributed import LAUNCHER_ENV_VARS, without_launcher_env

    env = {k: "1" for k in LAUNCHER_ENV_VARS} | {"PATH": "/bin", "OMP_NUM_THREADS": "2"}
    assert without_launcher_env(env) == {"PATH": "/bin", "OMP_NUM_THREADS": "2"}
    assert set(env) - set(without_launcher_env(env)) == {
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    }


def test_nccl_always_comes_with_gloo_for_cpu_tensors():
    import torch.distributed as dist

    from megatron_hybrid.runtime.distributed import process_group_backend

    assert process_group_backend(None, cuda=False) == "gloo"
    assert process_group_backend("gloo", cuda=True) == "gloo"
    for requested in (None, "nccl"):
        name = process_group_backend(requested, cuda=True)
        # torch's own parser: CPU tensors go to gloo, CUDA tensors to NCCL.
        config = dist.distributed_c10d.BackendConfig(dist.Backend(name))
        assert config.get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    with pytest.raises(ValueError, match=r"parallel\.backend=nccl needs CUDA"):
        process_group_backend("nccl", cuda=False)
