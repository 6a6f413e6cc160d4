"""Pure tensor layout conversions between HF and Megatron-Core (no process groups).

* **QKV**: HF keeps ``q_proj`` ``[heads x d, ...]``, ``k_proj`` and ``v_proj`` ``[groups x d, ...]``.
  Megatron fuses them into ``linear_qkv`` interleaved per query group::

      [q_0 (heads/groups x d rows); k_0 (d); v_0 (d); q_1; k_1; v_1; ...]

  so that a tensor-parallel rank owning whole groups holds a contiguous block. The same row
  layout applies to the weight ``[rows, h]``, Qwen2's bias ``[rows]`` and a LoRA ``B`` ``[rows, r]``.
* **Gate/up**: Megatron's SwiGLU ``linear_fc1`` is ``[gate; up]`` (``[2 x ffn, h]``) in the full
  (TP=1) layout; HF keeps ``gate_proj`` and ``up_proj``.
* **Vocabulary**: Megatron pads the vocabulary rows to a multiple of ``8 x TP``; HF keeps the exact
  vocabulary. :func:`pad_rows` / ``tensor[:vocab]`` convert.
"""

from __future__ import annotations

import torch

__all__ = ["fuse_gate_up", "fuse_qkv", "pad_rows", "split_gate_up", "split_qkv"]


def _check(name: str, tensor: torch.Tensor, rows: int) -> None:
    if tensor.shape[0] != rows:
        raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {rows}")


def fuse_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    num_groups: int,
    head_dim: int,
) -> torch.Tensor:
    """Megatron's ``linear_qkv`` rows from HF's q/k/v rows (dim 0; other dims are kept)."""
    if num_heads % num_groups:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_groups ({num_groups})")
    _check("q", q, num_heads * head_dim)
    _check("k", k, num_groups * head_dim)
    _check("v", v, num_groups * head_dim)
    per = num_heads // num_groups
    qs = q.reshape(num_groups, per * head_dim, *q.shape[1:])
    ks = k.reshape(num_groups, head_dim, *k.shape[1:])
    vs = v.reshape(num_groups, head_dim, *v.shape[1:])
    return torch.cat([qs, ks, vs], dim=1).reshape(-1, *q.shape[1:]).contiguous()


def split_qkv(
    qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: HF's (q, k, v) rows from Megatron's ``linear_qkv`` rows."""
    per = num_heads // num_groups
    _check("linear_qkv", qkv, (num_heads + 2 * num_groups) * head_dim)
    grouped = qkv.reshape(num_groups, (per + 2) * head_dim, *qkv.shape[1:])
    q, k, v = torch.split(grouped, [per * head_dim, head_dim, head_dim], dim=1)
    rest = qkv.shape[1:]
    return (
        q.reshape(-1, *rest).contiguous(),
        k.reshape(-1, *rest).contiguous(),
        v.reshape(-1, *rest).contiguous(),
    )


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Megatron's SwiGLU ``linear_fc1`` rows ``[gate; up]``."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0).contiguous()


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_gate_up`."""
    if fc1.shape[0] % 2:
        raise ValueError(f"linear_fc1 has an odd number of rows ({fc1.shape[0]})")
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with zero rows appended up to ``rows`` (vocabulary padding)."""
    if tensor.shape[0] > rows:
        raise ValueError(f"cannot pad {tensor.shape[0]} rows down to {rows}")
    if tensor.shape[0] == rows:
        return tensor
    pad = tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, pad], dim=0)
