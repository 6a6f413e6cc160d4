"""QKV interleaving per query group, gate/up fusion and vocabulary padding against loop references."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.convert.layouts import (
    fuse_gate_up,
    fuse_qkv,
    pad_rows,
    split_gate_up,
    split_qkv,
)


def _reference_fuse(q, k, v, heads, groups, d):
    rows = []
    per = heads // groups
    for g in range(groups):
        for h in range(g * per, (g + 1) * per):
            rows.append(q[h * d : (h + 1) * d])
        rows.append(k[g * d : (g + 1) * d])
        rows.append(v[g * d : (g + 1) * d])
    return torch.cat(rows)


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (4, 2), (8, 2), (6, 1)])
@pytest.mark.parametrize("trailing", [(5,), (), (3,)])
def test_qkv_interleaving_per_query_group(heads, groups, trailing):
    d = 4
    gen = torch.Generator().manual_seed(heads * 10 + groups)
    q = torch.randn(heads * d, *trailing, generator=gen)
    k = torch.randn(groups * d, *trailing, generator=gen)
    v = torch.randn(groups * d, *trailing, generator=gen)
    fused = fuse_qkv(q, k, v, heads, groups, d)
    assert torch.equal(fused, _reference_fuse(q, k, v, heads, groups, d))
    q2, k2, v2 = split_qkv(fused, heads, groups, d)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_tp_shards_of_fused_qkv_hold_whole_groups():
    """A contiguous TP split of the fused rows gives each rank the q/k/v of its own groups."""
    heads, groups, d, tp = 8, 2, 4, 2
    q, k, v = (
        torch.arange(n * d, dtype=torch.float32) + o
        for n, o in ((heads, 0), (groups, 100), (groups, 200))
    )
    shards = fuse_qkv(q, k, v, heads, groups, d).chunk(tp)
    for rank, shard in enumerate(shards):
        qs, ks, vs = split_qkv(shard, heads // tp, groups // tp, d)
        assert torch.equal(ks, k.chunk(tp)[rank]) and torch.equal(qs, q.chunk(tp)[rank])
        assert torch.equal(vs, v.chunk(tp)[rank])


def test_gate_up_and_vocab_padding():
    gate, up = torch.randn(6, 3), torch.randn(6, 3)
    fused = fuse_gate_up(gate, up)
    assert torch.equal(fused[:6], gate) and torch.equal(fused[6:], up)
    g2, u2 = split_gate_up(fused)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    with pytest.raises(ValueError, match="differ in shape"):
        fuse_gate_up(gate, up[:5])
    padded = pad_rows(torch.ones(5, 2), 8)
    assert padded.shape == (8, 2) and padded[5:].abs().sum() == 0
    with pytest.raises(ValueError, match="cannot pad 5 rows down to 4"):
        pad_rows(torch.ones(5, 2), 4)
    with pytest.raises(ValueError, match="q has 7 rows, expected 8"):
        fuse_qkv(torch.ones(7), torch.ones(4), torch.ones(4), 2, 1, 4)
