"""Tokenizers behind one small interface: the built-in character tokenizer or a local HF tokenizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from megatron_hybrid.data.arith import CharTokenizer

__all__ = ["HFTokenizer", "Tokenizer", "build_tokenizer", "tokenizer_details"]

#: Checkpoint ``details`` key of the character alphabet a model was trained with.
CHAR_ALPHABET_KEY = "char_alphabet"


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


def build_tokenizer(
    spec: str, texts: Iterable[str] = (), *, recorded: str | None = None, source: str = ""
) -> Tokenizer:
    """``char`` (arithmetic alphabet), ``char:auto`` (alphabet from ``texts``) or a local HF path.

    ``recorded``: the character alphabet a starting checkpoint (``source``) was trained with. A
    character tokenizer must then give every character the id it had: ``char:auto`` reuses the
    recorded alphabet when it covers ``texts``; anything else that differs is refused (the ids
    would silently mean other characters, the end token included).
    """
    if spec not in ("char", "char:auto"):
        return HFTokenizer(spec)
    texts = list(texts)
    tok = CharTokenizer() if spec == "char" else CharTokenizer.from_texts(texts)
    if recorded is None or tok.CHARS == recorded:
        return tok
    if spec == "char:auto":
        missing = sorted(set(tok.CHARS) - set(recorded))
        if not missing:
            return CharTokenizer(recorded)
        raise ValueError(
            f"{source} was trained with the character alphabet {recorded!r}; the data has "
            f"characters it lacks: {missing}"
        )
    raise ValueError(
        f"tokenizer=char is the alphabet {tok.CHARS!r}, but {source} was trained with "
        f"{recorded!r}; use tokenizer=char:auto"
    )


def tokenizer_details(tok: Tokenizer) -> dict:
    """What a checkpoint records about its tokenizer: a character tokenizer's alphabet (an HF
    tokenizer travels with the HF checkpoint it came from)."""
    return {CHAR_ALPHABET_KEY: tok.CHARS} if isinstance(tok, CharTokenizer) else {}
