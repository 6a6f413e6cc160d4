"""Tokenizers behind one small interface: the built-in character tokenizer or a local HF tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from megatron_hybrid.data.arith import CharTokenizer

__all__ = ["HFTokenizer", "Tokenizer", "build_tokenizer"]


class Tokenizer(Protocol):
    """What the trainers need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (``AutoTokenizer``, offline)."""

    def __init__(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except Exception as e:  # noqa: BLE001 - transformers is optional
            raise ValueError(
                f"tokenizer {path!r}: HF tokenizers need `transformers` ({e})"
            ) from None
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"tokenizer {path!r} could not be loaded: {e}") from None
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer {path!r} has no eos token")

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eos_id(self) -> int:
        return int(self._tok.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self._tok.pad_token_id
        return int(pad if pad is not None else self._tok.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def build_tokenizer(spec: str, texts: Iterable[str] = ()) -> Tokenizer:
    """``char`` (arithmetic alphabet), ``char:auto`` (alphabet from ``texts``) or a local HF path."""
    if spec == "char":
        return CharTokenizer()
    if spec == "char:auto":
        return CharTokenizer.from_texts(texts)
    return HFTokenizer(spec)
