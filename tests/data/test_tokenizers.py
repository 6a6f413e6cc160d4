"""Character alphabets: ``char:auto`` keeps the arithmetic ids, and a recorded alphabet wins."""

from __future__ import annotations

import pytest

from megatron_hybrid.data.arith import CharTokenizer
from megatron_hybrid.data.tokenizers import build_tokenizer, tokenizer_details


def test_auto_on_arithmetic_data_is_the_default_alphabet():
    assert build_tokenizer("char:auto", ["12+3=", "15", "7#2="]).CHARS == CharTokenizer.CHARS


def test_auto_keeps_the_arithmetic_ids_and_adds_the_rest_before_the_end_token():
    default, auto = CharTokenizer(), build_tokenizer("char:auto", ["ab 12+3=", "15?"])
    assert auto.CHARS == CharTokenizer.CHARS[:-1] + " ?ab" + "$"
    assert auto.encode("12+3=15") == default.encode("12+3=15")
    assert auto.eos_id == len(auto.CHARS) - 1 and auto.decode([auto.eos_id]) == "$"


def test_a_recorded_alphabet_is_reused_when_it_covers_the_data():
    recorded = CharTokenizer.CHARS[:-1] + " ?ab$"
    tok = build_tokenizer("char:auto", ["a?"], recorded=recorded, source="ckpt")
    assert tok.CHARS == recorded
    assert tokenizer_details(tok) == {"char_alphabet": recorded}


@pytest.mark.parametrize(
    ("spec", "texts", "match"),
    [
        ("char:auto", ["a?z"], r"ckpt was trained with the character alphabet .*lacks: \['z'\]"),
        ("char", ["12"], r"tokenizer=char is the alphabet .* but ckpt was trained with"),
    ],
)
def test_an_alphabet_that_would_move_ids_is_refused(spec, texts, match):
    recorded = CharTokenizer.CHARS[:-1] + " ?ab$"
    with pytest.raises(ValueError, match=match):
        build_tokenizer(spec, texts, recorded=recorded, source="ckpt")
