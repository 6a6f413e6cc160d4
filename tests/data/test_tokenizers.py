"""Character alphabets: ``char:auto`` keeps the arithmetic ids, and a recorded alphabet wins."""

from __future__ import annotations

import pytest

from megatron_hybrid.data.arith import CharTokenizer
from megatron_hybrid.data.tokenizers import build_tokenizer, tokenizer_details


def test_auto_on_arithmetic_data_is_the_default_alphabet():
    assert build_tokenizer("char:auto", ["12+3=", "15", "7#2="]).CHARS == CharTokenizer.CHARS


def test_auto_keeps_every_default_id_and_adds_the_rest_after_them():
    default, auto = CharTokenizer(), build_tokenizer("char:auto", ["ab 12+3=", "15?"])
    assert auto.CHARS == CharTokenizer.CHARS + " ?ab"
    assert auto.encode("12+3=15") == default.encode("12+3=15")
    assert auto.eos_id == default.eos_id and auto.decode([auto.eos_id]) == "$"
    assert auto.encode("a?") == [len(CharTokenizer.CHARS) + 2, len(CharTokenizer.CHARS) + 1]


def test_a_recorded_alphabet_is_reused_when_it_covers_the_data():
    recorded = CharTokenizer.CHARS + " ?ab"
    tok = build_tokenizer("char:auto", ["a?"], recorded=recorded, source="ckpt")
    assert tok.CHARS == recorded
    assert tokenizer_details(tok) == {"char_alphabet": recorded}


@pytest.mark.parametrize(
    ("spec", "texts", "match"),
    [
        ("char:auto", ["a?z"], r"ckpt was trained with the character alphabet .*lacks: \['z'\]"),
        ("char", ["12"], r"tokenizer=char is the alphabet .* but ckpt was trained with"),
        ("/some/hf/tokenizer", ["12"], r"ckpt was trained with a character tokenizer"),
    ],
)
def test_an_alphabet_that_would_move_ids_is_refused(spec, texts, match):
    recorded = CharTokenizer.CHARS + " ?ab"
    with pytest.raises(ValueError, match=match):
        build_tokenizer(spec, texts, recorded=recorded, source="ckpt")


# -- HF tokenizers (a tiny local one, tests/hf_tokenizer.py) ----------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.hf_tokenizer import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("hf_tok"))


def test_hf_prompts_get_the_bos_and_answers_do_not(hf_dir):
    from tests.hf_tokenizer import BOS

    tok = build_tokenizer(str(hf_dir))
    assert tok.encode_prompt("12+3=") == [BOS, *tok.encode("12+3=")]
    assert BOS not in tok.encode("15")
    assert tok.decode([BOS, *tok.encode("15"), tok.eos_id]) == "15"


def test_hf_chat_template_writes_the_prompt_as_a_user_turn(hf_dir):
    from tests.hf_tokenizer import SPECIALS

    tok = build_tokenizer(str(hf_dir), chat_template=True)
    user, end, assistant = (SPECIALS.index(t) for t in ("<|user|>", "<|im_end|>", "<|assistant|>"))
    assert tok.encode_prompt("1+2=") == [user, *tok.encode("1+2="), end, assistant]


def test_hf_stop_ids_include_the_generation_configs_end_ids(hf_dir):
    from tests.hf_tokenizer import END_OF_TURN, EOS

    assert build_tokenizer(str(hf_dir)).stop_ids == (EOS, END_OF_TURN)


def test_a_chat_template_is_refused_where_there_is_none(tmp_path, hf_dir):
    from tests.hf_tokenizer import write_tokenizer

    plain = write_tokenizer(tmp_path / "plain", chat_template=False)
    with pytest.raises(
        ValueError, match=r"chat_template=true, but tokenizer .*plain.* has no chat"
    ):
        build_tokenizer(str(plain), chat_template=True)
    with pytest.raises(ValueError, match=r"chat_template=true needs an HF tokenizer"):
        build_tokenizer("char:auto", ["1"], chat_template=True)


def test_a_bad_generation_config_is_named(tmp_path):
    from tests.hf_tokenizer import write_tokenizer

    d = write_tokenizer(tmp_path / "t")
    (d / "generation_config.json").write_text('{"eos_token_id": "x"}')
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id must be"):
        build_tokenizer(str(d))


def test_an_sft_batch_starts_with_the_prompt_as_encoded_for_prompts(hf_dir):
    from megatron_hybrid.data.arith import make_sft_batch
    from tests.hf_tokenizer import BOS

    tok = build_tokenizer(str(hf_dir))
    batch = make_sft_batch([("12+3=", "15")], tok, 12)
    want = [BOS, *tok.encode("12+3="), *tok.encode("15"), tok.eos_id]
    assert batch.tokens[0, : len(want) - 1].tolist() == want[:-1]
    assert batch.labels[0, : len(want) - 1].tolist() == want[1:]
    # the loss counts the answer and the end token only
    assert batch.loss_mask[0].tolist() == [0.0] * 5 + [1.0] * 3 + [0.0] * 4
