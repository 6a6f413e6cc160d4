"""Checkpoint settings of a training run (the ``checkpoint:`` section of a trainer config)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_hybrid.config import check_int

__all__ = ["CheckpointConfig"]


@dataclass
class CheckpointConfig:
    """Where and how often a run saves its trainables, and where it resumes from.

    A run saves *trainables only* (LoRA A/B, FFT module weights, optimizer state, plan, RNG states,
    step, data position) under ``save_dir/iter_<step>``; the frozen base lives once in
    ``base_dir`` (or, for a model initialised from the seed, in ``save_dir/base``).
    """

    save_dir: str | None = None
    """Root of this run's checkpoints (``iter_0000010/``, ``latest``); None disables saving."""
    save_interval: int | None = None
    """Save every this many steps; the last step is always saved. None: only the last step."""
    keep_last: int = 2
    """Keep this many newest step checkpoints; older ones are deleted after a successful save."""
    load_dir: str | None = None
    """Resume from this checkpoint: a root with a ``latest`` marker or one ``iter_*`` directory."""
    resume: bool = False
    """Resume from ``save_dir``'s latest checkpoint when there is one (start fresh otherwise).
    False with a ``save_dir`` that holds a run is refused: starting over would overwrite it."""
    base_dir: str | None = None
    """Full base-model checkpoint to start from (e.g. from ``megatron-hybrid convert-hf``).
    None: the model comes from the seed, and runs that save write it once to ``save_dir/base``."""
    save_optimizer: bool = True
    """Include the optimizer state (needed for an exact resume)."""
    load_optimizer: bool = True
    """Restore the optimizer state when resuming (False: fresh moments, e.g. to change optimizer)."""

    def __post_init__(self) -> None:
        interval = self.save_interval
        check_int("checkpoint.save_interval", interval, optional=True)
        check_int("checkpoint.keep_last", self.keep_last)
        if self.resume and self.save_dir is None and self.load_dir is None:
            raise ValueError("checkpoint.resume needs checkpoint.save_dir or checkpoint.load_dir")
        if interval is not None and self.save_dir is None:
            raise ValueError("checkpoint.save_interval is set but checkpoint.save_dir is not")
