"""Base + trainables (+ optimizer) saved at TP=2 x PP=1 load at TP=1 x PP=2 and TP=2 x PP=2 with the
same logits, the same trainable tensors and Adam moments, and the same next optimizer step; the
checkpoint holds every TP shard of every adapter."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from tests.multirank import launch, worker_path
from tests.workers.ckpt_reshard import PLAN

pytestmark = pytest.mark.multirank

LAYOUTS = {
    "tp1_pp2": (2, ["--pp", "2"]),
    "tp2_pp2": (4, ["--tp", "2", "--pp", "2"]),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reshard")
    out = tmp / "ref.pt"
    launch(
        worker_path("ckpt_reshard"),
        2,
        "--dir",
        str(tmp),
        "--out",
        str(out),
        "--tp",
        "2",
        "--save",
        timeout=300,
    )
    return tmp, torch.load(out, weights_only=False)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_load_at_another_layout_matches(saved, layout):
    tmp, ref = saved
    nproc, args = LAYOUTS[layout]
    out = tmp / f"{layout}.pt"
    launch(
        worker_path("ckpt_reshard"), nproc, "--dir", str(tmp), "--out", str(out), *args, timeout=300
    )
    got = torch.load(out, weights_only=False)
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=1e-6)
    assert set(got["trainables"]) == set(ref["trainables"])
    for key, want in ref["trainables"].items():
        assert torch.equal(got["trainables"][key], want), key
    for which, tensors in ref["moments"].items():
        for key, want in tensors.items():
            assert torch.equal(got["moments"][which][key], want), f"{which} of {key}"
    assert got["adam_steps"] == ref["adam_steps"] == {2.0}
    assert got["loss_next"] == pytest.approx(ref["loss_next"], rel=1e-5)


def _tp_sharded(key: str) -> bool:
    """Adapters sharded over TP: column-parallel B (qkv, fc1), row-parallel A (proj, fc2)."""
    module, leaf = key.rsplit(".", 2)[-2:]
    return (module in ("linear_qkv", "linear_fc1")) == (leaf == "lora_B")


def test_every_tp_shard_of_every_adapter_was_saved(saved):
    tmp, ref = saved
    metadata = FileSystemReader(str(tmp / "run" / "iter_0000002")).read_metadata()
    stored = metadata.state_dict_metadata
    adapters = [f"{n}.{x}" for n in PLAN.names("lora") for x in ("lora_A", "lora_B")]
    assert adapters and set(adapters) <= set(ref["trainables"])
    for key in adapters:
        for name in (key, f"optimizer.state.exp_avg.{key}", f"optimizer.state.exp_avg_sq.{key}"):
            assert name in stored, f"{name} is not in the checkpoint"
            md = stored[name]
            assert tuple(md.size) == tuple(ref["trainables"][key].shape), name
            coverage = torch.zeros(tuple(md.size), dtype=torch.int32)
            for chunk in md.chunks:
                coverage[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))] += 1
            assert torch.all(coverage == 1), (
                f"{name}: elements saved {coverage.unique().tolist()} times"
            )
            gated = key.endswith("linear_fc1.lora_B")
            want_chunks = (4 if gated else 2) if _tp_sharded(key) else 1
            assert len(md.chunks) == want_chunks, (
                f"{name}: {len(md.chunks)} chunks, want {want_chunks}"
            )
    fft = [k for k in ref["trainables"] if not k.endswith(("lora_A", "lora_B"))]
    assert fft and all(k in stored for k in fft)
    frozen = "decoder.layers.0.self_attention.linear_qkv.weight"
    assert frozen not in stored, "the trainables checkpoint must not hold frozen base weights"
