"""A built-in verifiable task: integer arithmetic with a character tokenizer.

Problems look like ``"123+45="`` with answer ``"168"`` followed by the end token ``$``. The answer is
written most-significant digit first. Operations: ``+``, ``-``, ``*`` and ``#``, the digit-wise
difference mod 10 (``"123#45="`` -> ``"188"``: operands right-aligned and zero-padded to the longer
one, each answer digit is ``(a_i - b_i) mod 10``, no borrows). ``#`` reuses the digit alignment an
addition model has learned but needs a new per-digit table, which makes it a good "new operation"
for post-training benchmarks. Its answers keep their leading zeros (``"500#500="`` -> ``"000"``) as
training targets, while the integer rewards (``exact_int``, ``digit_partial``) compare values, so
``"0"`` also scores as correct there. Everything is generated locally from a seed, so the demo
needs no download.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_hybrid.train.step import Batch

__all__ = ["OPS", "ArithTask", "CharTokenizer", "make_sft_batch"]


class CharTokenizer:
    """Maps characters to ids; id 0 is padding, the end token ``$`` is id 16.

    The default alphabet covers the arithmetic tasks; :meth:`from_texts` extends it for any data
    (its characters after the default ones, which keep their ids).
    """

    PAD = "_"
    EOS = "$"
    CHARS = PAD + "0123456789+-*#=" + EOS

    def __init__(self, chars: str | None = None) -> None:
        if chars is not None:
            if chars[0] != self.PAD or self.EOS not in chars or len(set(chars)) != len(chars):
                raise ValueError(
                    "a character alphabet must start with '_', contain '$' and have no repeats"
                )
            self.CHARS = chars
        self._ids = {c: i for i, c in enumerate(self.CHARS)}

    @classmethod
    def from_texts(cls, texts) -> CharTokenizer:
        """The default alphabet followed by every other character of ``texts``, in sorted order:
        the default characters, the end token included, keep the ids of ``CharTokenizer()``, and
        for data written in them the two tokenizers are the same."""
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        reserved = cls.reserved_in("".join(seen))
        if reserved is not None:
            raise ValueError(
                f"the data contains the reserved character {reserved!r} (padding / end token)"
            )
        extra = "".join(sorted(seen - set(cls.CHARS)))
        return cls(cls.CHARS + extra)

    @classmethod
    def reserved_in(cls, text: str) -> str | None:
        """The first reserved character (padding, then end token) that ``text`` contains."""
        return next((c for c in (cls.PAD, cls.EOS) if c in text), None)

    @property
    def vocab_size(self) -> int:
        return len(self.CHARS)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return self._ids[self.EOS]

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the tokenizer alphabet {self.CHARS!r}"
            ) from None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens that end a completion: the end token."""
        return (self.eos_id,)

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids (no special tokens here: the same as :meth:`encode`)."""
        return self.encode(text)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.CHARS[i] for i in ids if 0 < i < len(self.CHARS))


#: Supported operations (``#``: digit-wise difference mod 10, see the module docstring).
OPS = ("+", "-", "*", "#")


@dataclass
class ArithTask:
    """Random problems ``a <op> b`` with ``a`` of ``min_digits..max_digits`` digits."""

    op: str = "+"
    min_digits: int = 1
    max_digits: int = 3
    b_max: int | None = None
    """Upper bound of ``b`` (None: same digit range as ``a``)."""
    b_min: int = 0
    """Lower bound of ``b`` when ``b_max`` is set."""
    symbol: str | None = None
    """Character written between the operands (None: ``op`` itself). The demo writes ``#`` as
    ``-`` ("borrow-free subtraction"): see docs/benchmark.md for why the symbol matters."""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"task.op must be one of {', '.join(map(repr, OPS))}, got {self.op!r}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"task digits must satisfy 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}"
            )
        allowed = "".join(OPS)
        if self.symbol is not None and (
            not isinstance(self.symbol, str) or len(self.symbol) != 1 or self.symbol not in allowed
        ):
            raise ValueError(
                f"task.symbol must be one of {', '.join(map(repr, allowed))} or null, got {self.symbol!r}"
            )
        b_max = self.b_max
        if b_max is not None and (type(b_max) is not int or b_max < 0):
            raise ValueError(f"task.b_max must be a non-negative integer or null, got {b_max!r}")
        if b_max is not None and not 0 <= self.b_min <= b_max:
            raise ValueError(f"task.b_min must be in [0, b_max], got {self.b_min!r}")

    def _b_range(self) -> tuple[int, int]:
        if self.b_max is None:
            return 10 ** (self.min_digits - 1), 10**self.max_digits - 1
        return self.b_min, self.b_max

    def space_size(self) -> int:
        """Number of distinct problems."""
        lo, hi = 10 ** (self.min_digits - 1), 10**self.max_digits - 1
        b_lo, b_hi = self._b_range()
        return (hi - lo + 1) * (b_hi - b_lo + 1)

    def format(self, a: int, b: int) -> tuple[str, str]:
        sym = self.symbol or self.op
        if self.op == "#":
            width = max(len(str(a)), len(str(b)))
            digits = zip(str(a).zfill(width), str(b).zfill(width))
            return f"{a}{sym}{b}=", "".join(str((int(x) - int(y)) % 10) for x, y in digits)
        value = a + b if self.op == "+" else a - b if self.op == "-" else a * b
        return f"{a}{sym}{b}=", str(value)

    def enumerate_all(self) -> list[tuple[str, str]]:
        """Every problem, in a fixed order (for small spaces that are split into train/val/test)."""
        lo, hi = 10 ** (self.min_digits - 1), 10**self.max_digits - 1
        b_lo, b_hi = self._b_range()
        return [self.format(a, b) for a in range(lo, hi + 1) for b in range(b_lo, b_hi + 1)]

    def sample(self, n: int, gen: torch.Generator) -> list[tuple[str, str]]:
        """``n`` (prompt, answer) pairs."""
        lo, hi = 10 ** (self.min_digits - 1), 10**self.max_digits
        a = torch.randint(lo, hi, (n,), generator=gen).tolist()
        b_lo, b_hi = self._b_range()
        b = torch.randint(b_lo, b_hi + 1, (n,), generator=gen).tolist()
        return [self.format(x, y) for x, y in zip(a, b)]


def make_sft_batch(pairs: list[tuple[str, str]], tok: CharTokenizer, seq_length: int) -> Batch:
    """Next-token batch of ``prompt + answer + EOS``; the loss counts answer and EOS tokens only.
    The prompt is encoded as a prompt (``tok.encode_prompt``: an HF tokenizer's BOS or chat
    template), the answer as plain text."""
    n = len(pairs)
    tokens = torch.zeros(n, seq_length, dtype=torch.long)
    labels = torch.zeros(n, seq_length, dtype=torch.long)
    mask = torch.zeros(n, seq_length, dtype=torch.float)
    for i, (prompt, answer) in enumerate(pairs):
        p = tok.encode_prompt(prompt)
        full = p + tok.encode(answer) + [tok.eos_id]
        if len(full) > seq_length + 1:
            raise ValueError(
                f"row {i}: {prompt + answer!r} needs {len(full) - 1} tokens > seq_length {seq_length}"
            )
        ids = torch.tensor(full)
        tokens[i, : len(full) - 1] = ids[:-1]
        labels[i, : len(full) - 1] = ids[1:]
        mask[i, len(p) - 1 : len(full) - 1] = 1.0
    return Batch(tokens=tokens, labels=labels, loss_mask=mask)
