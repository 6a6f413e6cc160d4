"""Checkpointing of a training loop: base once, trainables every ``save_interval`` steps, resume.

A trainer calls, in this order (all collective)::

    run_ckpt = RunCheckpointer(cfg.checkpoint, model_cfg)
    chunks = build_model(...)
    run_ckpt.prepare_base(chunks)            # load base_dir / the resumed run's base, or save ours
    apply_hybrid_plan(chunks, plan); ddp = wrap_ddp(chunks); optimizer = build_optimizer(ddp, ...)
    start = run_ckpt.restore(ddp, optimizer, plan, data_state)   # 0 when starting fresh
    for step in range(start + 1, steps + 1):
        ...train one step...
        run_ckpt.after_step(step, steps, ddp, optimizer, plan, data_state)

``data_state`` is the data position: a dict of values identical on all ranks that
:meth:`restore` updates in place (e.g. ``{"generator": torch.Generator}``: the sampler's state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_hybrid.checkpoint.commit import read_latest, resolve_checkpoint
from megatron_hybrid.checkpoint.config import CheckpointConfig
from megatron_hybrid.checkpoint.io import load_model, load_trainables, save_model, save_trainables
from megatron_hybrid.checkpoint.metadata import check_base, read_meta
from megatron_hybrid.models.config import ModelConfig
from megatron_hybrid.peft.plan import HybridPlan

__all__ = ["RunCheckpointer"]

BASE_SUBDIR = "base"


def _encode(data_state: dict) -> dict:
    return {
        k: v.get_state() if isinstance(v, torch.Generator) else v for k, v in data_state.items()
    }


def _decode_into(data_state: dict, saved: dict) -> None:
    missing = sorted(set(data_state) - set(saved))
    if missing:
        raise ValueError(f"the checkpoint's data position lacks {missing}; it has {sorted(saved)}")
    for k, v in data_state.items():
        if isinstance(v, torch.Generator):
            v.set_state(saved[k])
        else:
            data_state[k] = saved[k]


class RunCheckpointer:
    """Applies a :class:`CheckpointConfig` to one training run (see the module docstring)."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        model_cfg: ModelConfig,
        *,
        printer: Callable[[str], Any] = print,
        base_details: dict | None = None,
    ) -> None:
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.printer = printer
        self.base_details = base_details or {}
        """Recorded in a base saved from the seed (e.g. the character alphabet)."""
        self.resume_from = self._resume_path()
        self.base: Path | None = self._base_path()
        self.base_uid: str | None = None  # the identity of the base actually loaded or saved

    def _say(self, text: str) -> None:
        if torch.distributed.get_rank() == 0:
            self.printer(text)

    def _resume_path(self) -> Path | None:
        if self.cfg.load_dir is not None:
            return resolve_checkpoint(self.cfg.load_dir)
        if self.cfg.save_dir is None:
            return None
        latest = read_latest(Path(self.cfg.save_dir))
        if latest is not None and not self.cfg.resume:
            # Starting over would rewrite the run's base and its iter_* under it.
            raise FileExistsError(
                f"checkpoint.save_dir {self.cfg.save_dir} already holds a run (latest: "
                f"{latest.name}); checkpoint.resume=true continues it, another save_dir starts "
                "a new one"
            )
        return latest

    def _base_path(self) -> Path | None:
        if self.cfg.base_dir is not None:
            return Path(self.cfg.base_dir)
        if self.resume_from is not None:
            recorded = read_meta(self.resume_from).base
            return Path(recorded) if recorded else None
        return None

    def prepare_base(self, chunks: Sequence[torch.nn.Module]) -> None:
        """Load the base weights, or save the seed-initialised base once (before the plan)."""
        if self.base is not None:
            self.base_uid = load_model(self.base, chunks, self.model_cfg).uid or None
            self._say(f"base weights from {self.base}")
        elif self.cfg.save_dir is not None:
            self.base = save_model(
                Path(self.cfg.save_dir) / BASE_SUBDIR,
                chunks,
                self.model_cfg,
                details=self.base_details,
                overwrite=True,
            )
            self.base_uid = read_meta(self.base).uid or None
            self._say(f"base weights (from the seed) saved to {self.base}")

    def restore(self, chunks, optimizer, plan: HybridPlan, data_state: dict) -> int:
        """Load the resumed trainables, optimizer, RNG and data position; returns the step."""
        if self.resume_from is None:
            return 0
        if self.base is not None and self.cfg.base_dir is None:
            # The base recorded with the trainables (not one the config names on purpose) must
            # still be the one they were trained on.
            base_dir = resolve_checkpoint(self.base)
            check_base(
                read_meta(self.resume_from),
                read_meta(base_dir),
                f"checkpoint {self.resume_from}",
                base_dir,
            )
        state = load_trainables(
            self.resume_from,
            chunks,
            plan=plan,
            model_cfg=self.model_cfg,
            optimizer=optimizer if self.cfg.load_optimizer else None,
        )
        if not state.optimizer_restored and hasattr(optimizer, "reload_model_params"):
            # A mixed-precision optimizer keeps fp32 main copies of the trainables, cloned when
            # it was built; without this its first step would write the pre-resume values back
            # over the loaded ones (Megatron's trainer does the same on a fresh-optimizer load).
            optimizer.reload_model_params()
        _decode_into(data_state, state.state)
        notes = [
            "optimizer restored" if state.optimizer_restored else "fresh optimizer state",
            "RNG restored" if state.rng_restored else f"RNG not restored ({state.rng_note})",
        ]
        self._say(f"resumed from {self.resume_from} at step {state.step} ({', '.join(notes)})")
        return state.step

    def after_step(
        self, step: int, last_step: int, chunks, optimizer, plan: HybridPlan, data_state: dict
    ) -> Path | None:
        """Save the trainables when ``step`` is due (every ``save_interval`` steps, and the last)."""
        cfg = self.cfg
        if cfg.save_dir is None:
            return None
        due = step == last_step or (cfg.save_interval is not None and step % cfg.save_interval == 0)
        if not due:
            return None
        path = save_trainables(
            cfg.save_dir,
            step,
            chunks,
            plan=plan,
            model_cfg=self.model_cfg,
            optimizer=optimizer if cfg.save_optimizer else None,
            training_state=_encode(data_state),
            base=self.base,
            base_uid=self.base_uid,
            keep_last=cfg.keep_last,
        )
        self._say(f"step {step}: trainables saved to {path}")
        return path
