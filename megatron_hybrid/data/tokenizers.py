"""Tokenizers behind one small interface: the built-in character tokenizer or a local HF tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
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
    @property
    def stop_ids(self) -> tuple[int, ...]: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_prompt(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (``AutoTokenizer``, offline).

    Prompts are encoded with the tokenizer's own special tokens (Llama's BOS; none for Qwen2), or,
    with ``chat_template=True``, as one user turn of the tokenizer's chat template followed by the
    assistant prompt (as NeMo-RL and TRL format instruct prompts). Answers and completions are plain
    text. Generation stops at the eos token and at every ``eos_token_id`` of the directory's
    ``generation_config.json`` (instruct models end a turn with their own token, e.g. Llama-3's
    ``<|eot_id|>`` or Qwen2's ``<|im_end|>``).
    """

    def __init__(self, path: str, *, chat_template: bool = False) -> None:
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
        if chat_template and not getattr(self._tok, "chat_template", None):
            raise ValueError(
                f"chat_template=true, but tokenizer {path!r} has no chat template "
                "(tokenizer_config.json / chat_template.jinja)"
            )
        self.chat_template = chat_template
        self._stop_ids = tuple(dict.fromkeys((self.eos_id, *_generation_eos_ids(Path(path)))))

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

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return self._stop_ids

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_prompt(self, text: str) -> list[int]:
        if self.chat_template:
            text = self._tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            return self.encode(text)  # the template writes its own BOS, if any
        ids = list(self._tok.encode(text, add_special_tokens=True))
        # A tokenizer set to append EOS to every text would end the prompt before the answer.
        if ids and ids[-1] == self.eos_id and self.encode(text)[-1:] != [self.eos_id]:
            ids.pop()
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _generation_eos_ids(path: Path) -> list[int]:
    """``eos_token_id`` (an id or a list) of the model's ``generation_config.json``, if it has
    one: in the directory, or for a hub name in the local HF cache."""
    file = path / "generation_config.json"
    if not path.is_dir():
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(str(path), local_files_only=True).eos_token_id
        except Exception:  # noqa: BLE001 - no generation config cached: eos only
            return []
        return [eos] if isinstance(eos, int) else list(eos or [])
    if not file.is_file():
        return []
    try:
        eos = json.loads(file.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: could not be read: {e}") from None
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{file}: eos_token_id must be an id or a list of ids, got {eos!r}")
    return ids


def build_tokenizer(
    spec: str,
    texts: Iterable[str] = (),
    *,
    recorded: str | None = None,
    source: str = "",
    chat_template: bool = False,
) -> Tokenizer:
    """``char`` (arithmetic alphabet), ``char:auto`` (alphabet from ``texts``) or a local HF path
    (``chat_template``: format prompts with its chat template, see :class:`HFTokenizer`).

    ``recorded``: the character alphabet a starting checkpoint (``source``) was trained with. A
    character tokenizer must then give every character the id it had: ``char:auto`` reuses the
    recorded alphabet when it covers ``texts``; anything else that differs is refused (the ids
    would silently mean other characters, the end token included).
    """
    if spec not in ("char", "char:auto"):
        if recorded is not None:
            raise ValueError(
                f"{source} was trained with a character tokenizer (alphabet {recorded!r}); "
                f"tokenizer={spec} would read its ids as other tokens"
            )
        return HFTokenizer(spec, chat_template=chat_template)
    if chat_template:
        raise ValueError(f"chat_template=true needs an HF tokenizer, not tokenizer={spec}")
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
