"""Reward functions (integers, partial credit, math answers), the registry, and batch scoring."""

from __future__ import annotations

import random
import signal
import threading
import time

import pytest
import torch

from megatron_hybrid.rl import rewards as rw
from megatron_hybrid.rl.rewards import (
    END_TOKEN,
    REWARD_FUNCTIONS,
    digit_partial,
    exact_int,
    extract_math_answer,
    get_reward_function,
    math_equal,
    math_reward,
    score_completions,
)

try:
    import math_verify  # noqa: F401

    HAVE_MATH_VERIFY = True
except Exception:  # noqa: BLE001 - same guard as the module's
    HAVE_MATH_VERIFY = False


# -- integers -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("168$", "168", 1.0),
        ("168", "168", 1.0),  # no end token: the whole completion
        ("0168$__", "168", 1.0),  # leading zeros
        ("168$999", "168", 1.0),
        ("-12$", "-12", 1.0),
        ("+7$", "7", 1.0),
        ("12$", "-12", 0.0),
        ("16$8", "168", 0.0),
        ("$168", "168", 1.0),  # a $ is text (HF tokenizers: "The answer is $18.")
        ("The answer is $18.", "18", 1.0),
        ("169$", "168", 0.0),
        ("abc$", "168", 0.0),
        ("", "0", 0.0),
        ("12+3$", "12", 1.0),  # the first integer
        ("The answer is 42.", "42", 1.0),  # a full stop is not a decimal point
        ("1,000$", "1000", 1.0),  # thousands separators
        ("1,234,567$", "1234567", 1.0),
        ("1,0005$", "1000", 0.0),  # not a separator: four digits follow the comma
        ("1,0005$", "1", 1.0),
        ("7.0$", "7", 1.0),  # a zero decimal part
        # A first number that is not an integer does not pass for its integer part.
        ("3.5$", "3", 0.0),
        ("3/4$", "3", 0.0),
        ("3.5$", "4", 0.0),
    ],
)
def test_exact_int(completion, answer, expected):
    assert exact_int(completion, answer) == expected


def test_end_token_is_the_arithmetic_tokenizers():
    from megatron_hybrid.data.arith import CharTokenizer

    assert END_TOKEN == CharTokenizer.EOS
    assert exact_int("5</s>", "5", end_token="</s>") == 1.0


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [("16$8", "168", 0.0), ("$168", "168", 0.0), ("168$999", "168", 1.0), ("168$", "168", 1.0)],
)
def test_an_explicit_end_token_ends_the_completion(completion, answer, expected):
    assert exact_int(completion, answer, end_token=END_TOKEN) == expected
    assert (digit_partial(completion, answer, end_token=END_TOKEN) == 1.0) == (expected == 1.0)


def test_exact_int_rejects_a_non_integer_answer():
    with pytest.raises(ValueError, match="answer '1.5' is not an integer"):
        exact_int("1$", "1.5")


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("168$", "168", 1.0),
        ("178$", "168", 2 / 3),  # two of three digits, from the right
        ("167$", "168", 2 / 3),
        ("68$", "168", 2 / 3),  # a missing digit is a wrong position
        ("1168$", "168", 3 / 4),  # an extra digit too
        ("861$", "168", 1 / 3),
        ("-168$", "168", 3 / 4),  # a wrong sign costs one position
        ("x$", "168", 0.0),
        ("0$", "0", 1.0),
        ("5$", "-5", 1 / 2),
    ],
)
def test_digit_partial_hand_values(completion, answer, expected):
    assert digit_partial(completion, answer) == pytest.approx(expected)


def test_digit_partial_is_one_exactly_when_exact_int_is():
    rng = random.Random(0)
    for _ in range(2000):
        answer = str(rng.randint(-999, 999))
        guess = answer if rng.random() < 0.2 else str(rng.randint(-1200, 1200))
        completion = rng.choice(["", "0", "00"]) + guess.lstrip("-") + "$"
        if guess.startswith("-"):
            completion = "-" + completion
        score = digit_partial(completion, answer)
        assert 0.0 <= score <= 1.0
        assert (score == 1.0) == (exact_int(completion, answer) == 1.0)


# -- math answers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{ 2 }", "2"),
        ("\\boxed{{a}{b}} and \\boxed{3", "{a}{b}"),  # the unclosed last box is skipped
        ("The answer is 1,234.", "1,234"),
        ("from 3 to -4.5 units", "-4.5"),
        ("\\fbox{7}", "7"),
        ("no answer", None),
    ],
)
def test_extract_math_answer(completion, expected):
    assert extract_math_answer(completion) == expected


@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("0.5", "\\frac{1}{2}", True),
        ("-\\dfrac{3}{4}", "-0.75", True),
        ("1,000", "1000", True),
        ("72", "72.0", True),
        ("$5$", "5", True),
        ("\\text{(B)}", "(B)", True),
        ("90^\\circ", "90", True),
        ("3", "4", False),
        ("x+1", "y+1", False),
        ("", "", False),
    ],
)
def test_math_equal_without_math_verify(prediction, answer, expected):
    assert math_equal(prediction, answer, use_math_verify=False) is expected


@pytest.mark.skipif(not HAVE_MATH_VERIFY, reason="math-verify is not installed")
@pytest.mark.parametrize(
    ("prediction", "answer", "expected"),
    [
        ("0.5", "\\frac{1}{2}", True),
        ("x+1", "1+x", True),
        ("\\sqrt{4}", "2", True),
        ("3", "4", False),
    ],
)
def test_math_equal_with_math_verify(prediction, answer, expected):
    assert math_equal(prediction, answer) is expected


def test_math_reward_falls_back_without_math_verify(monkeypatch):
    monkeypatch.setattr(rw, "_MATH_VERIFY", False)  # as if the import had failed
    assert math_reward("Thus \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert math_reward("It is 41, no 42.", "42") == 1.0
    assert math_reward("It is 42, no 41.", "42") == 0.0
    assert math_reward("I don't know", "42") == 0.0
    # A reference answer written as \boxed{...} (as in MATH-style data) is unboxed too.
    assert math_reward("so \\boxed{\\frac{9}{2}}$", "\\boxed{\\frac{9}{2}}") == 1.0
    assert math_reward("so \\boxed{4.5}", "\\boxed{\\frac{9}{2}}") == 1.0
    assert math_reward("so \\boxed{5}", "\\boxed{\\frac{9}{2}}") == 0.0


# -- registry -------------------------------------------------------------------------------------
def test_registry():
    assert {"exact_int", "digit_partial", "math"} <= set(REWARD_FUNCTIONS)
    assert get_reward_function("math") is math_reward
    with pytest.raises(ValueError, match=r"unknown reward function 'f1'.*'digit_partial'"):
        get_reward_function("f1")
    with pytest.raises(ValueError, match="already registered"):
        rw.register_reward_function("exact_int")(exact_int)


# -- scoring a batch ------------------------------------------------------------------------------
def test_score_completions_values_and_error_counts():
    def fn(completion, answer):
        if completion == "boom":
            raise KeyError("bad")
        if completion == "nan":
            return float("nan")
        if completion == "text":
            return "1.0"
        return float(completion == answer)

    rewards, stats = score_completions(fn, ["a", "boom", "b", "nan", "text"], ["a"] * 5)
    assert rewards.dtype == torch.float32 and rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert (stats.num, stats.errors, stats.timeouts) == (5, 3, 0)
    assert stats.first_error == "completion 1: KeyError: 'bad'"


def test_score_completions_by_name():
    rewards, stats = score_completions("exact_int", ["3$", "4$"], ["3", "3"])
    assert rewards.tolist() == [1.0, 0.0] and stats.errors == 0
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        score_completions("exact_int", ["3$", "4$"], ["3"])
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        score_completions("exact_int", [], [], timeout_s=0)


def stuck(completion, answer):
    """Loops forever unless interrupted, swallowing ordinary exceptions on the way."""
    if completion != "stuck":
        return 1.0
    while True:
        try:
            sum(range(1000))
        except Exception:  # noqa: BLE001, S110 - a reward function that swallows errors
            pass


def test_timeout_in_the_main_thread_interrupts_the_call():
    handler = signal.getsignal(signal.SIGALRM)
    threads = threading.active_count()
    start = time.perf_counter()
    rewards, stats = score_completions(stuck, ["ok", "stuck", "ok"], ["1"] * 3, timeout_s=0.2)
    assert time.perf_counter() - start < 2.0
    assert rewards.tolist() == [1.0, 0.0, 1.0]
    assert (stats.timeouts, stats.errors) == (1, 0)
    # Nothing left behind: no thread, no armed timer, the previous handler back.
    assert threading.active_count() == threads
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is handler


def test_timeout_off_the_main_thread_uses_an_abandoned_daemon_thread():
    release = threading.Event()

    def blocked(completion, answer):
        if completion == "stuck":
            release.wait(30)
        return 1.0

    out = {}
    worker = threading.Thread(
        target=lambda: out.update(
            r=score_completions(blocked, ["stuck", "ok"], ["", ""], timeout_s=0.2)
        )
    )
    worker.start()
    worker.join(10)
    release.set()  # let the abandoned call finish
    rewards, stats = out["r"]
    assert rewards.tolist() == [0.0, 1.0] and stats.timeouts == 1


def test_an_armed_outer_timer_is_left_alone():
    """E.g. pytest-timeout's signal method: scoring falls back to threads and keeps its timer."""
    fired, release = [], threading.Event()

    def blocked(completion, answer):
        if completion == "stuck":
            release.wait(30)
        return 1.0

    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 60.0)
        rewards, stats = score_completions(blocked, ["stuck", "ok"], ["", ""], timeout_s=0.2)
        assert rewards.tolist() == [0.0, 1.0] and stats.timeouts == 1
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 55.0 < remaining <= 60.0 and not fired
    finally:
        release.set()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_math_reward_scores_a_batch():
    completions = ["\\boxed{\\frac{1}{2}}", "the answer is 3", "\\boxed{x}"]
    rewards, stats = score_completions("math", completions, ["0.5", "3", "2"], timeout_s=30)
    assert rewards.tolist() == [1.0, 1.0, 0.0] and stats.errors == stats.timeouts == 0
