"""Configuration of LoRA adapters and of a Hybrid-LoRA plan's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megatron_hybrid.config import check_int

__all__ = ["A_INITS", "B_INITS", "DROPOUT_POSITIONS", "LoRAConfig"]

A_INITS = ("kaiming", "gaussian", "xavier", "zero")
B_INITS = ("zero", "gaussian", "kaiming", "xavier")
DROPOUT_POSITIONS = ("pre", "post")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class LoRAConfig:
    """Hyper-parameters of one LoRA adapter ``W x + s * B A x``.

    Names follow Megatron-Bridge / NeMo (``dim``/``alpha``) and HF PEFT (``r``/``lora_alpha``);
    YAML may use either spelling (see :meth:`from_dict`).
    """

    rank: int = 8
    """r: inner dimension of the adapter (A is r x in, B is out x r)."""
    alpha: float = 16.0
    """Scaling numerator: s = alpha / r (or alpha / sqrt(r) with ``use_rslora``)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling s = alpha / sqrt(r) (Kalajdzievski 2023)."""
    dropout: float = 0.0
    """Dropout probability on the adapter path."""
    dropout_position: str = "pre"
    """``pre``: dropout on the adapter's input (HF PEFT); ``post``: on the adapter's output (NeMo)."""
    a_init: str = "kaiming"
    """Init of A: ``kaiming`` (uniform, a=sqrt(5), as nn.Linear and PEFT), ``gaussian`` (std 1/r),
    ``xavier`` (normal), or ``zero``."""
    b_init: str = "zero"
    """Init of B: ``zero`` (the adapted model starts equal to the base), ``gaussian``, ``kaiming``, ``xavier``."""
    init_std: float | None = None
    """Std of the ``gaussian`` inits; None means 1/r."""

    def __post_init__(self) -> None:
        check_int("lora.rank", self.rank)
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(
                f"lora.dropout_position must be one of {DROPOUT_POSITIONS}, got {self.dropout_position!r}"
            )
        if self.a_init not in A_INITS:
            raise ValueError(f"lora.a_init must be one of {A_INITS}, got {self.a_init!r}")
        if self.b_init not in B_INITS:
            raise ValueError(f"lora.b_init must be one of {B_INITS}, got {self.b_init!r}")
        if self.a_init == "zero" and self.b_init == "zero":
            raise ValueError(
                "lora.a_init and lora.b_init cannot both be 'zero': no gradient would flow"
            )
        std = self.init_std
        if std is not None and (not _is_number(std) or std <= 0):
            raise ValueError(f"lora.init_std must be > 0, got {self.init_std!r}")

    @property
    def scaling(self) -> float:
        """s in ``W x + s * B A x``."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def from_dict(cls, d: dict, base: LoRAConfig | None = None) -> LoRAConfig:
        """Build from a mapping; accepts NeMo (``dim``) and PEFT (``r``, ``lora_alpha``,
        ``lora_dropout``) keys. Keys not in ``d`` come from ``base`` (default: class defaults)."""
        aliases = {"dim": "rank", "r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}
        out: dict = {}
        for key, value in d.items():
            name = aliases.get(key, key)
            if name not in cls.__dataclass_fields__:
                valid = sorted(cls.__dataclass_fields__) + sorted(aliases)
                raise ValueError(f"unknown lora key {key!r}; valid keys: {', '.join(valid)}")
            if name in out:
                raise ValueError(f"lora key {key!r} given twice (as {name!r})")
            out[name] = value
        return replace(base, **out) if base is not None else cls(**out)

    def with_rank(self, rank: int) -> LoRAConfig:
        """A copy with another rank, keeping alpha (so the scaling follows the rank)."""
        from dataclasses import replace

        return replace(self, rank=rank)
