"""Convert full GPT state dicts (TP=1, PP=1 layout) to and from Megatron per-rank shards.

Test helper: lets a multi-rank test load the *same* weights that a single-process reference used
and compare results (weights, gradients) at full shape. A *full* state dict is what a TP=1, PP=1
``GPTModel.state_dict()`` holds, tensors only (``_extra_state`` entries are ignored). A *local*
state dict is what one rank's model chunk holds: tensor-parallel shards, and only the layers of its
pipeline stage, numbered locally (``decoder.layers.<local>``, global index = local + offset).

Tensor-parallel layouts (:func:`tp_layout`), for tensor-parallel degree t:

* ``word_embeddings`` / ``output_layer`` weight: vocabulary rows split in t contiguous blocks. The
  vocabulary is padded per TP degree (:meth:`ModelConfig.padded_vocab_size`): sharding keeps the
  first ``vocab_size`` rows and zero-pads to the padded size of degree t; gathering drops the padding
  rows again (they come back as zeros at the TP=1 padded size).
* ``linear_qkv`` weight/bias (column parallel): rows are interleaved per query group,
  ``[q_g (heads/groups x head_dim); k_g; v_g]`` for g = 0..groups-1, and each rank owns whole groups,
  so a contiguous split of dim 0 is exactly Megatron's shard. (Interleaving only matters when
  converting from separate q/k/v projections, which this module does not do.)
* ``linear_fc1`` weight/bias with SwiGLU: ``[gate; up]`` at TP=1; rank i holds ``[gate_i; up_i]``,
  i.e. gate and up are split separately (``gated`` layout). Without SwiGLU a contiguous dim-0 split.
* ``linear_proj`` / ``linear_fc2`` weight (row parallel): dim 1 split; their biases are replicated.
* Everything else (norms, position embeddings, TE's fused ``layer_norm_*``) is replicated.

A key whose path contains a sharded module name but whose layout is not known (for example an
adapter nested under ``linear_qkv``) raises ``ValueError`` instead of being silently replicated:
pass a ``layout_fn`` that handles such keys and defers to :func:`tp_layout` for the rest::

    def lora_layout(key, model_cfg):
        if key.endswith("adapter.linear_in.weight"):
            return ...
        return tp_layout(key, model_cfg)

Pure functions (:func:`shard_full_state_dict`, :func:`merge_shards`) need no process group;
:func:`gather_full_state_dict` and :func:`load_full_state_dict` read the ranks from Megatron's
``parallel_state`` and must run on every rank of the model-parallel group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from megatron_hybrid.models.config import ModelConfig

__all__ = [
    "REPLICATED",
    "LayoutFn",
    "RankShard",
    "TPLayout",
    "gather_full_state_dict",
    "layer_offset",
    "load_full_state_dict",
    "merge_shards",
    "shard_full_state_dict",
    "shard_tensor",
    "tp_layout",
    "unshard_tensors",
]


@dataclass(frozen=True)
class TPLayout:
    """How one tensor is split over tensor-parallel ranks."""

    dim: int | None
    """Split dimension; None means every rank holds the full tensor."""
    gated: bool = False
    """SwiGLU ``[gate; up]`` along ``dim``: the two halves are split separately."""
    vocab: bool = False
    """Vocabulary rows (``dim`` 0): truncated to ``vocab_size`` and padded per TP degree."""


REPLICATED = TPLayout(dim=None)

LayoutFn = Callable[[str, ModelConfig], TPLayout]

_COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")
_ROW_PARALLEL = ("linear_proj", "linear_fc2")
_VOCAB_PARALLEL = ("word_embeddings", "output_layer")
_SHARDED_MODULES = frozenset(_COLUMN_PARALLEL + _ROW_PARALLEL + _VOCAB_PARALLEL)

_LAYER_KEY = re.compile(r"^(?P<prefix>decoder\.layers\.)(?P<index>\d+)(?P<rest>\..+)$")
_PRE_PROCESS_PREFIX = "embedding."
_POST_PROCESS_PREFIXES = ("output_layer.", "decoder.final_layernorm.")
_TIED_OUTPUT_KEY = "output_layer.weight"
_EMBEDDING_KEY = "embedding.word_embeddings.weight"


def tp_layout(key: str, model_cfg: ModelConfig) -> TPLayout:
    """The tensor-parallel layout of a GPTModel state-dict entry (local spec or TE spec)."""
    parts = key.split(".")
    if len(parts) < 2:
        return REPLICATED
    *path, module, leaf = parts
    if leaf == "_extra_state" or leaf.startswith("layer_norm_"):
        return REPLICATED
    if module in _VOCAB_PARALLEL and leaf == "weight":
        return TPLayout(dim=0, vocab=True)
    if module == "linear_qkv":
        return TPLayout(dim=0)
    if module == "linear_fc1":
        return TPLayout(dim=0, gated=model_cfg.swiglu)
    if module in _ROW_PARALLEL:
        return TPLayout(dim=1) if leaf == "weight" else REPLICATED
    if _SHARDED_MODULES.intersection(path) or module in _SHARDED_MODULES:
        raise ValueError(
            f"no tensor-parallel layout known for {key!r}; pass a layout_fn that handles it"
        )
    return REPLICATED


def _pad_vocab(full: torch.Tensor, rows: int, model_cfg: ModelConfig) -> torch.Tensor:
    logical = full[: model_cfg.vocab_size]
    if rows == logical.shape[0]:
        return logical
    pad = logical.new_zeros((rows - logical.shape[0], *logical.shape[1:]))
    return torch.cat([logical, pad], dim=0)


def shard_tensor(
    full: torch.Tensor, layout: TPLayout, tp_rank: int, tp_size: int, model_cfg: ModelConfig
) -> torch.Tensor:
    """Rank ``tp_rank``'s shard (a new contiguous tensor) of a full TP=1 tensor."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank {tp_rank} is outside [0, {tp_size})")
    if layout.dim is None:
        return full.clone()
    if layout.vocab:
        full = _pad_vocab(full, model_cfg.padded_vocab_size(tp_size), model_cfg)
    if full.shape[layout.dim] % (2 * tp_size if layout.gated else tp_size):
        raise ValueError(
            f"dim {layout.dim} of a {tuple(full.shape)} tensor does not split over {tp_size} ranks"
        )
    if layout.gated:
        halves = torch.chunk(full, 2, dim=layout.dim)
        parts = [torch.chunk(half, tp_size, dim=layout.dim)[tp_rank] for half in halves]
        return torch.cat(parts, dim=layout.dim).contiguous()
    return torch.chunk(full, tp_size, dim=layout.dim)[tp_rank].clone().contiguous()


def unshard_tensors(
    shards: Sequence[torch.Tensor], layout: TPLayout, model_cfg: ModelConfig
) -> torch.Tensor:
    """The full TP=1 tensor from the shards of all TP ranks (``shards[i]`` from rank i).

    For a replicated layout the copy of rank 0 is returned.
    """
    if layout.dim is None:
        return shards[0].clone()
    if layout.gated:
        halves = [torch.chunk(shard, 2, dim=layout.dim) for shard in shards]
        gate = torch.cat([h[0] for h in halves], dim=layout.dim)
        up = torch.cat([h[1] for h in halves], dim=layout.dim)
        return torch.cat([gate, up], dim=layout.dim)
    full = torch.cat(list(shards), dim=layout.dim)
    if layout.vocab:
        full = _pad_vocab(full, model_cfg.padded_vocab_size(1), model_cfg)
    return full


def layer_offset(
    model_cfg: ModelConfig,
    pp_rank: int = 0,
    pp_size: int = 1,
    vp_stage: int | None = None,
    vp_size: int | None = None,
) -> int:
    """Global index of local layer 0 of a chunk (Megatron's even split, optionally interleaved)."""
    vp = vp_size or 1
    if model_cfg.num_layers % (pp_size * vp):
        raise ValueError(
            f"{model_cfg.num_layers} layers do not split over {pp_size} stages x {vp} chunks"
        )
    per_chunk = model_cfg.num_layers // (pp_size * vp)
    return (vp_stage or 0) * per_chunk * pp_size + pp_rank * per_chunk


def _stage_flags(
    pp_rank: int, pp_size: int, vp_stage: int | None, vp_size: int | None
) -> tuple[bool, bool]:
    vp = vp_size or 1
    stage = vp_stage or 0
    return pp_rank == 0 and stage == 0, pp_rank == pp_size - 1 and stage == vp - 1


def _global_to_local(key: str, offset: int, num_local: int, pre: bool, post: bool) -> str | None:
    """The local key of a global key on this chunk, or None if the chunk does not hold it."""
    match = _LAYER_KEY.match(key)
    if match:
        local = int(match["index"]) - offset
        if 0 <= local < num_local:
            return f"{match['prefix']}{local}{match['rest']}"
        return None
    if key.startswith(_PRE_PROCESS_PREFIX):
        return key if pre else None
    if key.startswith(_POST_PROCESS_PREFIXES):
        return key if post else None
    raise ValueError(f"cannot place {key!r} on a pipeline stage")


def _local_to_global(key: str, offset: int) -> str:
    match = _LAYER_KEY.match(key)
    if match:
        return f"{match['prefix']}{int(match['index']) + offset}{match['rest']}"
    return key


def _tensors(state_dict: Mapping[str, object]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def shard_full_state_dict(
    full_sd: Mapping[str, torch.Tensor],
    tp_rank: int,
    tp_size: int,
    model_cfg: ModelConfig,
    *,
    pp_rank: int = 0,
    pp_size: int = 1,
    vp_stage: int | None = None,
    vp_size: int | None = None,
    layout_fn: LayoutFn = tp_layout,
) -> dict[str, torch.Tensor]:
    """The local state dict of one model chunk, cut from a full TP=1, PP=1 state dict.

    Args:
        full_sd: full state dict (global layer numbers); non-tensor entries are ignored.
        tp_rank, tp_size: tensor-parallel rank and degree of the target chunk.
        model_cfg: the architecture (vocabulary size, SwiGLU, layer count).
        pp_rank, pp_size: pipeline stage of the target chunk and the number of stages.
        vp_stage, vp_size: virtual-pipeline chunk index and count (None without interleaving).
        layout_fn: maps a key to its :class:`TPLayout` (default :func:`tp_layout`).

    Returns:
        New tensors keyed by the chunk's local names (``decoder.layers.<local>...``; embedding only
        on the first chunk, final norm and output layer only on the last). With tied embeddings and
        more than one stage, the last chunk also gets ``output_layer.weight`` = the embedding.
    """
    offset = layer_offset(model_cfg, pp_rank, pp_size, vp_stage, vp_size)
    num_local = model_cfg.num_layers // (pp_size * (vp_size or 1))
    pre, post = _stage_flags(pp_rank, pp_size, vp_stage, vp_size)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in _tensors(full_sd).items():
        local = _global_to_local(key, offset, num_local, pre, post)
        if local is not None:
            out[local] = shard_tensor(
                tensor, layout_fn(key, model_cfg), tp_rank, tp_size, model_cfg
            )
    tied = not model_cfg.untie_embeddings_and_output_weights
    if tied and post and not pre and _EMBEDDING_KEY in full_sd:
        layout = layout_fn(_TIED_OUTPUT_KEY, model_cfg)
        out[_TIED_OUTPUT_KEY] = shard_tensor(
            full_sd[_EMBEDDING_KEY], layout, tp_rank, tp_size, model_cfg
        )
    return out


class RankShard(NamedTuple):
    """One model chunk's local state dict and where it sits in the parallel layout."""

    state_dict: Mapping[str, torch.Tensor]
    tp_rank: int
    tp_size: int
    pp_rank: int = 0
    pp_size: int = 1
    vp_stage: int | None = None
    vp_size: int | None = None


def merge_shards(
    shards: Iterable[RankShard],
    model_cfg: ModelConfig,
    *,
    layout_fn: LayoutFn = tp_layout,
    replica_atol: float | None = None,
) -> dict[str, torch.Tensor]:
    """The full TP=1, PP=1 state dict from the local state dicts of all chunks of one model.

    Every (tp_rank, pp_rank, vp_stage) chunk must be present once. With ``replica_atol`` set,
    replicated tensors must agree across TP ranks within that absolute tolerance (useful for
    gradients of replicated parameters, which go wrong silently when a TP reduction is missing);
    otherwise rank 0's copy is used. The last stage's tied ``output_layer.weight`` is dropped (the
    full state dict holds the embedding only).
    """
    by_key: dict[str, dict[int, torch.Tensor]] = {}
    tp_sizes = set()
    for shard in shards:
        tp_sizes.add(shard.tp_size)
        offset = layer_offset(
            model_cfg, shard.pp_rank, shard.pp_size, shard.vp_stage, shard.vp_size
        )
        pre, post = _stage_flags(shard.pp_rank, shard.pp_size, shard.vp_stage, shard.vp_size)
        tied = not model_cfg.untie_embeddings_and_output_weights
        for key, tensor in _tensors(shard.state_dict).items():
            if tied and post and not pre and key == _TIED_OUTPUT_KEY:
                continue
            ranks = by_key.setdefault(_local_to_global(key, offset), {})
            if shard.tp_rank in ranks:
                raise ValueError(f"{key!r} of tp_rank {shard.tp_rank} given twice")
            ranks[shard.tp_rank] = tensor
    if len(tp_sizes) > 1:
        raise ValueError(f"shards disagree on tp_size: {sorted(tp_sizes)}")
    tp_size = tp_sizes.pop() if tp_sizes else 1
    full: dict[str, torch.Tensor] = {}
    for key, ranks in by_key.items():
        if sorted(ranks) != list(range(tp_size)):
            raise ValueError(f"{key!r}: have tp ranks {sorted(ranks)}, need 0..{tp_size - 1}")
        layout = layout_fn(key, model_cfg)
        ordered = [ranks[i] for i in range(tp_size)]
        if layout.dim is None and replica_atol is not None:
            for i, other in enumerate(ordered[1:], start=1):
                diff = (other - ordered[0]).abs().max().item() if other.numel() else 0.0
                if diff > replica_atol:
                    raise ValueError(
                        f"replicated {key!r} differs between tp ranks 0 and {i} by {diff:.3g}"
                    )
        full[key] = unshard_tensors(ordered, layout, model_cfg)
    return dict(sorted(full.items(), key=lambda item: _sort_key(item[0])))


def _sort_key(key: str) -> tuple:
    match = _LAYER_KEY.match(key)
    if match:
        return (1, int(match["index"]), match["rest"])
    if key.startswith(_PRE_PROCESS_PREFIX):
        return (0, 0, key)
    return (2, 0, key)


def _local_layout() -> tuple[int, int, int, int, int | None]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_virtual_pipeline_model_parallel_world_size(),
    )


def gather_full_state_dict(
    local_sds: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    model_cfg: ModelConfig,
    *,
    layout_fn: LayoutFn = tp_layout,
    replica_atol: float | None = None,
) -> dict[str, torch.Tensor]:
    """All-gather this model's chunks over the model-parallel group; every rank gets the full dict.

    Collective over ``parallel_state.get_model_parallel_group()`` (TP x PP ranks of one
    data-parallel replica). ``local_sds`` is this rank's local state dict, or one per virtual
    pipeline chunk. Tensors travel through ``all_gather_object`` on the CPU: meant for tests with
    small models. See :func:`merge_shards` for ``replica_atol``.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    chunks = [local_sds] if isinstance(local_sds, Mapping) else list(local_sds)
    tp_rank, tp_size, pp_rank, pp_size, vp_size = _local_layout()
    if vp_size is not None and vp_size != len(chunks):
        raise ValueError(f"got {len(chunks)} chunks, virtual pipeline size is {vp_size}")
    mine = [
        RankShard(
            {k: v.detach().cpu() for k, v in _tensors(sd).items()},
            tp_rank,
            tp_size,
            pp_rank,
            pp_size,
            i if vp_size else None,
            vp_size,
        )
        for i, sd in enumerate(chunks)
    ]
    group = ps.get_model_parallel_group()
    gathered: list[list[RankShard] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    shards = [shard for rank_shards in gathered for shard in rank_shards or ()]
    return merge_shards(shards, model_cfg, layout_fn=layout_fn, replica_atol=replica_atol)


def load_full_state_dict(
    chunks: Sequence[torch.nn.Module],
    full_sd: Mapping[str, torch.Tensor],
    model_cfg: ModelConfig,
    *,
    layout_fn: LayoutFn = tp_layout,
) -> None:
    """Copy a full TP=1 state dict into this rank's model chunks (unwrapped ``GPTModel`` s).

    Ranks come from ``parallel_state``. Every tensor entry of each chunk's own state dict must be
    provided and nothing else; ``_extra_state`` entries are left alone.
    """
    tp_rank, tp_size, pp_rank, pp_size, vp_size = _local_layout()
    if vp_size is not None and vp_size != len(chunks):
        raise ValueError(f"got {len(chunks)} chunks, virtual pipeline size is {vp_size}")
    for i, chunk in enumerate(chunks):
        shard = shard_full_state_dict(
            full_sd,
            tp_rank,
            tp_size,
            model_cfg,
            pp_rank=pp_rank,
            pp_size=pp_size,
            vp_stage=i if vp_size else None,
            vp_size=vp_size,
            layout_fn=layout_fn,
        )
        expected = set(_tensors(chunk.state_dict()))
        missing, unexpected = sorted(expected - set(shard)), sorted(set(shard) - expected)
        if missing or unexpected:
            raise KeyError(f"chunk {i}: missing {missing}, unexpected {unexpected}")
        result = chunk.load_state_dict(shard, strict=False)
        leftover = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if leftover or result.unexpected_keys:
            raise KeyError(f"chunk {i}: missing {leftover}, unexpected {result.unexpected_keys}")
