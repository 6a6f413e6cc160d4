"""The built-in arithmetic task: tokenizer, problem sampling and the SFT batch layout."""

from __future__ import annotations

import pytest
import torch

from megatron_hybrid.data.arith import ArithTask, CharTokenizer, make_sft_batch

TOK = CharTokenizer()


# -- tokenizer --------------------------------------------------------------------------------
def test_round_trip_of_every_printable_character():
    text = "0123456789+-*#=$"
    ids = TOK.encode(text)
    assert len(ids) == len(text) and all(0 < i < TOK.vocab_size for i in ids)
    assert TOK.decode(ids) == text
    assert TOK.decode(TOK.encode("123+45=168$")) == "123+45=168$"


def test_special_ids_and_vocab_size():
    assert TOK.vocab_size == len(set(CharTokenizer.CHARS)) == 17
    assert TOK.pad_id == 0 and TOK.encode(CharTokenizer.PAD) == [0]
    assert TOK.encode(CharTokenizer.EOS) == [TOK.eos_id]


def test_decode_drops_padding():
    assert TOK.decode([0, *TOK.encode("7=7"), 0, 0]) == "7=7"


@pytest.mark.parametrize(("text", "bad"), [("1/2", "/"), ("a+1", "a"), ("1 + 2", " ")])
def test_unknown_character_error_names_it_and_the_alphabet(text, bad):
    with pytest.raises(ValueError) as info:
        TOK.encode(text)
    assert f"character {bad!r} is not in the tokenizer alphabet" in str(info.value)
    assert repr(CharTokenizer.CHARS) in str(info.value)


# -- task -------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_samples_are_correct_and_within_the_digit_range(op):
    task = ArithTask(op=op, min_digits=2, max_digits=3)
    pairs = task.sample(64, torch.Generator().manual_seed(0))
    assert len(pairs) == 64
    for prompt, answer in pairs:
        assert prompt.endswith("=")
        a, b = (int(x) for x in prompt[:-1].split(op))
        assert 10 <= a < 1000 and 10 <= b < 1000
        assert int(answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        TOK.encode(prompt + answer)  # always in the alphabet


def _digitwise_difference(a: int, b: int) -> str:
    """Reference for ``#``: pad both to the same width, subtract digit by digit mod 10."""
    sa, sb = f"{a:0{len(str(max(a, b)))}d}", f"{b:0{len(str(max(a, b)))}d}"
    return "".join("0123456789"[(int(x) - int(y) + 10) % 10] for x, y in zip(sa, sb))


@pytest.mark.parametrize(
    ("a", "b", "answer"),
    [(123, 45, "188"), (45, 123, "922"), (7, 9, "8"), (500, 500, "000"), (90, 5, "95")],
)
def test_digitwise_difference_by_hand(a, b, answer):
    assert ArithTask(op="#").format(a, b) == (f"{a}#{b}=", answer)


def test_digitwise_difference_samples_match_the_reference():
    pairs = ArithTask(op="#", min_digits=1, max_digits=3).sample(
        300, torch.Generator().manual_seed(1)
    )
    for prompt, answer in pairs:
        a, b = (int(x) for x in prompt[:-1].split("#"))
        assert answer == _digitwise_difference(a, b)
        assert len(answer) == max(len(str(a)), len(str(b)))
        TOK.encode(prompt + answer)


def test_symbol_changes_only_the_written_operator():
    task = ArithTask(op="#", symbol="-")
    assert task.format(123, 45) == ("123-45=", "188")
    assert ArithTask(op="+", symbol="*").format(2, 3) == ("2*3=", "5")


@pytest.mark.parametrize("bad", ["/", "7", "=", "--", 3])
def test_bad_symbol_is_refused_with_the_allowed_ones(bad):
    with pytest.raises(
        ValueError, match=r"task.symbol must be one of '\+', '-', '\*', '#' or null"
    ):
        ArithTask(op="#", symbol=bad)


def test_unknown_op_error_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"task.op must be one of '\+', '-', '\*', '#', got '/'"):
        ArithTask(op="/")


def test_b_max_bounds_the_second_operand():
    pairs = ArithTask(b_max=3).sample(200, torch.Generator().manual_seed(0))
    bs = {int(p[:-1].split("+")[1]) for p, _ in pairs}
    assert bs <= {0, 1, 2, 3} and len(bs) == 4


def test_sampling_is_determined_by_the_generator_seed():
    task = ArithTask()
    first = task.sample(16, torch.Generator().manual_seed(3))
    assert first == task.sample(16, torch.Generator().manual_seed(3))
    assert first != task.sample(16, torch.Generator().manual_seed(4))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"op": "/"}, r"task\.op must be one of"),
        ({"op": "+-"}, r"task\.op must be one of"),
        ({"op": ""}, r"task\.op must be one of"),
        ({"min_digits": 0}, r"1 <= min_digits <= max_digits"),
        ({"min_digits": 3, "max_digits": 2}, r"1 <= min_digits <= max_digits"),
    ],
)
def test_task_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArithTask(**kwargs)


def test_negative_b_max_is_rejected():
    with pytest.raises(ValueError, match=r"task\.b_max"):
        ArithTask(b_max=-1)


# -- SFT batch --------------------------------------------------------------------------------
PAIRS = [("12+5=", "17"), ("7*8=", "56"), ("100-1=", "99")]


def test_batch_shapes_and_dtypes():
    b = make_sft_batch(PAIRS, TOK, 12)
    assert b.tokens.shape == b.labels.shape == b.loss_mask.shape == (3, 12)
    assert b.tokens.dtype == b.labels.dtype == torch.long and b.loss_mask.dtype == torch.float
    assert torch.equal(b.position_ids, torch.arange(12).expand(3, 12))


def test_tokens_are_the_row_and_labels_the_row_shifted_by_one():
    seq = 12
    b = make_sft_batch(PAIRS, TOK, seq)
    for i, (prompt, answer) in enumerate(PAIRS):
        full = TOK.encode(prompt + answer) + [TOK.eos_id]
        n = len(full) - 1
        assert b.tokens[i].tolist() == full[:-1] + [TOK.pad_id] * (seq - n)
        assert b.labels[i].tolist() == full[1:] + [TOK.pad_id] * (seq - n)
        assert torch.equal(b.labels[i, : n - 1], b.tokens[i, 1:n])  # the shift, within the row


def test_loss_mask_covers_exactly_the_answer_and_eos_labels():
    b = make_sft_batch(PAIRS, TOK, 12)
    for i, (prompt, answer) in enumerate(PAIRS):
        on = b.loss_mask[i].nonzero().flatten().tolist()
        assert on == list(range(len(prompt) - 1, len(prompt) + len(answer)))
        assert TOK.decode(b.labels[i, on].tolist()) == answer + CharTokenizer.EOS
        assert b.labels[i, on[-1]] == TOK.eos_id
    assert int(b.loss_mask.sum()) == sum(len(a) + 1 for _, a in PAIRS)


def test_a_row_that_exactly_fits_needs_no_padding():
    prompt, answer = "12+5=", "17"
    seq = len(prompt) + len(answer)  # + EOS - 1 for the shift
    b = make_sft_batch([(prompt, answer)], TOK, seq)
    assert TOK.pad_id not in b.tokens[0].tolist()
    assert b.labels[0, -1] == TOK.eos_id and b.loss_mask[0, -1] == 1.0


def test_too_long_row_error_names_the_row_and_the_lengths():
    pairs = [("1+1=", "2"), ("123+456=", "579")]
    with pytest.raises(ValueError) as info:
        make_sft_batch(pairs, TOK, 8)
    msg = str(info.value)
    assert msg.startswith("row 1: '123+456=579'") and "needs 11 tokens > seq_length 8" in msg


def test_unknown_character_in_a_pair_is_reported():
    with pytest.raises(ValueError, match="not in the tokenizer alphabet"):
        make_sft_batch([("1/2=", "0")], TOK, 8)
