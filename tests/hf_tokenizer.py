"""A tiny local Hugging Face tokenizer (no download): one token per character, a BOS added to every
encoded text, a chat template, and a ``generation_config.json`` listing two end ids (eos and the
template's end of turn), like an instruct model's."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_end|>", "<|user|>", "<|assistant|>"]
PAD, BOS, EOS, END_OF_TURN = 0, 1, 2, 3
CHARS = "0123456789+-*=?$ abcdefghijklmnopqrstuvwxyz."
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(directory: Path, *, chat_template: bool = True) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *CHARS, "<unk>"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[3:],
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(directory))
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [EOS, END_OF_TURN]})
    )
    return directory
