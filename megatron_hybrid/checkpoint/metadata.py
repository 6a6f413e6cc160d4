"""``hybrid_meta.json``: what a checkpoint holds, for which architecture and plan.

Every checkpoint directory written by this package carries this JSON file beside Megatron's own
files. It is readable without torch and lets scripts rebuild the model (``model``), check a
checkpoint against the model and plan it is loaded into, and find the base a trainables checkpoint
belongs to.

Kinds:

* ``base``: every model weight (what ``convert-hf`` writes and a hybrid run starts from).
* ``trainables``: LoRA A/B, FFT module weights, optionally optimizer state, RNG states, step and
  data position; only meaningful on top of its base.
* ``merged``: a ``base``-like checkpoint whose weights include the merged adapters and FFT weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_hybrid.checkpoint.commit import CheckpointError
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.peft.plan import HybridPlan

__all__ = [
    "ARCHITECTURE_FIELDS",
    "KINDS",
    "META_FILE",
    "CheckpointMeta",
    "check_architecture",
    "check_plan",
    "read_meta",
    "write_meta",
]

META_FILE = "hybrid_meta.json"
FORMAT_VERSION = 1
KINDS = ("base", "trainables", "merged")

#: ModelConfig fields that change the weights' shapes or the function the model computes.
ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "normalization",
    "norm_epsilon",
    "swiglu",
    "add_bias_linear",
    "add_qkv_bias",
    "position_embedding_type",
    "rotary_base",
    "untie_embeddings_and_output_weights",
)


@dataclass
class CheckpointMeta:
    """Contents of ``hybrid_meta.json``."""

    kind: str
    """One of :data:`KINDS`."""
    model: dict
    """The :class:`ModelConfig` as a dict (rebuild with :meth:`model_config`)."""
    layout: dict
    """Layout the checkpoint was saved at (``tp``, ``pp``, ``vpp``, ``dp``); loading may differ."""
    plan: dict | None = None
    """The :class:`HybridPlan` as a dict (trainables, merged)."""
    step: int | None = None
    """Optimizer steps taken (trainables)."""
    base: str | None = None
    """Path of the base checkpoint a trainables checkpoint belongs to, when known."""
    uid: str = ""
    """Random identity given at save time (empty in checkpoints older than this field)."""
    base_uid: str | None = None
    """The ``uid`` of that base when the trainables were saved: a base rewritten in place since
    (a fresh run in the same ``save_dir``) is detected by :func:`check_base`."""
    hf: dict | None = None
    """HF origin: ``{"architecture": ..., "config": <config.json>}`` (base from ``convert-hf``)."""
    contents: list[str] = field(default_factory=list)
    """What the sharded part holds: ``model``, ``optimizer``, ``rng``."""
    details: dict = field(default_factory=dict)
    """Free-form facts, e.g. ``{"merged": ["fft", "lora"]}`` for a merged checkpoint."""
    created_by: str = ""
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"checkpoint kind must be one of {KINDS}, got {self.kind!r}")

    def model_config(self) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in self.model.items() if k in fields})

    def hybrid_plan(self) -> HybridPlan | None:
        return None if self.plan is None else HybridPlan.from_dict(self.plan)


def _version() -> str:
    from megatron_hybrid import __version__

    return f"megatron-hybrid {__version__}"


def write_meta(directory: Path, meta: CheckpointMeta) -> Path:
    """Write ``directory/hybrid_meta.json`` (fsynced)."""
    if not meta.created_by:
        meta.created_by = _version()
    path = Path(directory) / META_FILE
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(meta), f, indent=1, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def read_meta(directory: Path) -> CheckpointMeta:
    """Read ``directory/hybrid_meta.json``; errors name the file and what is wrong."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no {META_FILE}: not a megatron-hybrid checkpoint, or the save did "
            "not finish"
        )
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated?): {e}") from None
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this version reads {FORMAT_VERSION}"
        )
    known = {f.name for f in dataclasses.fields(CheckpointMeta)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"{path} has unknown keys {unknown}")
    try:
        return CheckpointMeta(**data)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _arch_value(model: dict | ModelConfig, key: str) -> Any:
    if isinstance(model, ModelConfig):
        return model.kv_heads if key == "num_query_groups" else getattr(model, key)
    value = model.get(key)
    if key == "num_query_groups" and value is None:
        return model.get("num_attention_heads")
    return value


def check_architecture(meta: CheckpointMeta, model: ModelConfig, source: str) -> None:
    """Raise :class:`CheckpointError` naming every architecture field that differs."""
    diffs = [
        f"{k}: checkpoint has {_arch_value(meta.model, k)!r}, model has {_arch_value(model, k)!r}"
        for k in ARCHITECTURE_FIELDS
        if _arch_value(meta.model, k) != _arch_value(model, k)
    ]
    if diffs:
        raise CheckpointError(f"{source} was saved for another architecture: " + "; ".join(diffs))


def new_uid() -> str:
    """A fresh checkpoint identity."""
    return uuid.uuid4().hex


def check_base(meta: CheckpointMeta, base: CheckpointMeta, source: str, base_dir: Path) -> None:
    """Raise :class:`CheckpointError` when trainables (``meta``) were saved on top of another
    base than the one at ``base_dir`` (``base``); checkpoints without identities pass."""
    if meta.base_uid and base.uid and meta.base_uid != base.uid:
        raise CheckpointError(
            f"{source} was trained on another base than {base_dir}: that checkpoint was "
            f"rewritten or replaced since (base uid {meta.base_uid}, found {base.uid}); "
            "load the base it was trained on, or name a base explicitly (merge --base, "
            "checkpoint.base_dir) to use another one"
        )


def check_plan(meta: CheckpointMeta, plan: HybridPlan, source: str) -> None:
    """Raise :class:`CheckpointError` naming every module whose decision or effective LoRA rank
    differs, and a differing LoRA scaling (``alpha``, ``use_rslora``). Frozen entries count as
    absent; the adapter init seed is irrelevant once adapters are loaded."""
    saved = meta.hybrid_plan()
    if saved is None:
        raise CheckpointError(f"{source} holds no hybrid plan (kind {meta.kind!r})")

    def effective(p: HybridPlan, name: str) -> str:
        mode = p.modules[name].mode
        return f"lora (rank {p.lora_config_for(name).rank})" if mode == "lora" else mode

    def active(p: HybridPlan) -> set[str]:
        return {n for n, d in p.modules.items() if d.mode != "frozen"}

    problems = []
    mine, theirs = active(plan), active(saved)
    for name in sorted(mine | theirs):
        if name not in mine:
            problems.append(
                f"{name}: {effective(saved, name)} in the checkpoint, absent from the plan"
            )
        elif name not in theirs:
            problems.append(
                f"{name}: {effective(plan, name)} in the plan, absent from the checkpoint"
            )
        elif effective(saved, name) != effective(plan, name):
            problems.append(
                f"{name}: checkpoint {effective(saved, name)}, current plan {effective(plan, name)}"
            )
    for key in ("alpha", "use_rslora"):
        a, b = getattr(saved.lora, key), getattr(plan.lora, key)
        if a != b:
            problems.append(f"lora.{key}: checkpoint {a!r}, current plan {b!r}")
    if problems:
        raise CheckpointError(
            f"{source} was saved with another hybrid plan: " + "; ".join(problems)
        )
