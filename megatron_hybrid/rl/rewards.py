"""Verifiable rewards: functions ``(completion, answer) -> float`` registered by name, and a scorer.

Built in: ``exact_int`` and ``digit_partial`` for the arithmetic task (completions end with its
end token ``$``), ``math`` for boxed / numeric answers (Math-Verify when installed).

:func:`score_completions` runs a reward function over a batch with a per-completion time limit;
one that raises, times out or returns something other than a finite number scores 0.0 and is
counted in :class:`RewardStats`, so a bad completion never stops training.

Timeouts. In the main thread (where a trainer scores), the limit is a ``SIGALRM`` timer
(``signal.setitimer``): it interrupts a stuck pure-Python function by raising inside it, so
nothing is left running. The exception derives from ``BaseException`` so that a reward function's
own ``except Exception`` cannot swallow it. A C call that never returns to the interpreter (e.g. a
huge integer power) is only interrupted when it returns. Off the main thread, or when another
``ITIMER_REAL`` timer is already armed (which we must not clobber), the function runs in a daemon
thread joined with the time limit; a stuck one is abandoned there (it keeps running in the
background, holding the GIL at times, but does not block interpreter exit).
"""

from __future__ import annotations

import math
import numbers
import re
import signal
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

__all__ = [
    "END_TOKEN",
    "REWARD_FUNCTIONS",
    "RewardFn",
    "RewardStats",
    "digit_partial",
    "exact_int",
    "extract_math_answer",
    "get_reward_function",
    "math_equal",
    "math_reward",
    "register_reward_function",
    "score_completions",
]

END_TOKEN = "$"
"""The arithmetic task's end-of-answer token (``CharTokenizer.EOS``). The integer rewards take it
as ``end_token`` only when asked: a completion from the pipeline ends at its stop token anyway, and
for an HF tokenizer a ``$`` is text (``"The answer is $18."``), not an end marker."""

RewardFn = Callable[[str, str], float]

REWARD_FUNCTIONS: dict[str, RewardFn] = {}
"""Registered reward functions by name; add one with :func:`register_reward_function`."""

_SETUP: dict[RewardFn, Callable[[], object]] = {}


def register_reward_function(
    name: str, *, setup: Callable[[], object] | None = None
) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(completion, answer) -> float`` under ``name``.

    ``setup`` (e.g. a heavy import) runs before :func:`score_completions` starts its clocks: an
    import interrupted by the time limit could leave half-initialised modules behind.
    """

    def register(fn: RewardFn) -> RewardFn:
        if name in REWARD_FUNCTIONS:
            raise ValueError(f"reward function {name!r} is already registered")
        REWARD_FUNCTIONS[name] = fn
        if setup is not None:
            _SETUP[fn] = setup
        return fn

    return register


def get_reward_function(name: str) -> RewardFn:
    """The reward function registered as ``name``; ValueError listing the valid names otherwise."""
    try:
        return REWARD_FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown reward function {name!r}; valid names: {sorted(REWARD_FUNCTIONS)}"
        ) from None


# -- integers (arithmetic task) ------------------------------------------------------------------
_INT = re.compile(r"[-+]?\d+")


def _canonical_int(text: str) -> tuple[bool, str]:
    """(negative, digits without leading zeros) of an integer string; no int() digit limit."""
    negative = text.startswith("-")
    digits = text.lstrip("+-").lstrip("0") or "0"
    return negative and digits != "0", digits


# The first number of a completion, whole: thousands separators, a decimal part, a fraction.
_FIRST_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?(?:/\d+)?")


def _first_int(completion: str, end_token: str | None) -> tuple[bool, str] | None:
    """The first number (before ``end_token``, if given) if it is an integer (``1,000`` and ``7.0`` are;
    ``3.5`` and ``3/4`` are not: None, so they cannot pass for their leading ``3``)."""
    found = _FIRST_NUMBER.search(completion.split(end_token, 1)[0] if end_token else completion)
    if found is None or "/" in found.group():
        return None
    whole, _, fraction = found.group().replace(",", "").partition(".")
    if fraction.strip("0"):
        return None
    return _canonical_int(whole)


def _answer_int(answer: str) -> tuple[bool, str]:
    text = answer.strip()
    if not _INT.fullmatch(text):
        raise ValueError(f"answer {answer!r} is not an integer")
    return _canonical_int(text)


@register_reward_function("exact_int")
def exact_int(completion: str, answer: str, *, end_token: str | None = None) -> float:
    """1.0 if the first integer of ``completion`` (before ``end_token``, when one is given) equals
    the integer ``answer``, else 0.0.

    Leading zeros, a ``+`` sign, thousands separators and a zero decimal part are ignored
    (``"007"``, ``"+7"`` and ``"7.0"`` equal ``"7"``); a first number that is not an integer
    (``"7.5"``, ``"7/2"``) or no number scores 0.0.
    """
    return 1.0 if _first_int(completion, end_token) == _answer_int(answer) else 0.0


@register_reward_function("digit_partial")
def digit_partial(completion: str, answer: str, *, end_token: str | None = None) -> float:
    """Dense partial credit for integer answers; 1.0 exactly when ``exact_int`` gives 1.0.

    With ``p`` and ``a`` the digit strings of the predicted and true integers (no sign, no leading
    zeros), aligned at the least significant digit::

        score = #{k < min(|p|, |a|): p[-1-k] == a[-1-k]} / (max(|p|, |a|) + [sign differs])

    Missing or extra digits count as wrong positions (so a wrong length costs), and a wrong sign
    costs one more. No integer in the completion scores 0.0.
    """
    gold = _answer_int(answer)
    pred = _first_int(completion, end_token)
    if pred is None:
        return 0.0
    if pred == gold:
        return 1.0
    (p_neg, p), (a_neg, a) = pred, gold
    matches = sum(x == y for x, y in zip(reversed(p), reversed(a)))
    return matches / (max(len(p), len(a)) + (p_neg != a_neg))


# -- math answers --------------------------------------------------------------------------------
_NUMBER = re.compile(r"[-+]?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_math_answer(completion: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, else the last number, else None."""
    last = None
    for start in _BOXED.finditer(completion):
        depth, i = 1, start.end()
        while i < len(completion) and depth:
            depth += {"{": 1, "}": -1}.get(completion[i], 0)
            i += 1
        if depth == 0:
            last = completion[start.end() : i - 1].strip()
    if last is not None:
        return last
    numbers_found = _NUMBER.findall(completion)
    return numbers_found[-1] if numbers_found else None


_FRAC = re.compile(r"\\frac\{([^{}]*)\}\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}")
_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "^\\circ", "^{\\circ}", "\\%", "%", "$")


def _normalize_math(text: str) -> str:
    s = text.strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _TEXT.sub(r"\1", s)
    for token in _DROP:
        s = s.replace(token, "")
    s = "".join(s.split()).rstrip(".")
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    return _FRAC.sub(r"(\1)/(\2)", s)


def _as_fraction(normalized: str) -> Fraction | None:
    m = re.fullmatch(r"([-+]?)\(?([\d.]+)\)?/\(?([\d.]+)\)?", normalized)
    try:
        if m:
            return Fraction(m.group(1) + m.group(2)) / Fraction(m.group(3))
        return Fraction(normalized)
    except (ValueError, ZeroDivisionError):
        return None


_MATH_VERIFY: object = None  # the module, False when unavailable, None before the first try


def _math_verify():
    global _MATH_VERIFY
    if _MATH_VERIFY is None:
        try:  # optional extra; any failure (not just ImportError) means "not usable"
            import math_verify

            # score_completions owns the time limit (math_equal passes timeout=None); mark
            # Math-Verify's one-time "you must provide the timeout yourself" warning as shown.
            for name in ("parser", "grader"):
                module = getattr(math_verify, name, None)
                if module is not None and hasattr(module, "TIMEOUT_WARNING_SHOWN"):
                    module.TIMEOUT_WARNING_SHOWN = True
            _MATH_VERIFY = math_verify
        except Exception:  # noqa: BLE001 - a broken optional install means "use the fallback"
            _MATH_VERIFY = False
    return _MATH_VERIFY or None


def math_equal(prediction: str, answer: str, *, use_math_verify: bool | None = None) -> bool:
    """Whether ``prediction`` and ``answer`` (LaTeX or plain) denote the same value.

    Equal normalised strings match first. Then Math-Verify (symbolic, when importable and
    ``use_math_verify`` is not False; its own signal-based timeouts are disabled because
    :func:`score_completions` owns the time limit), else exact numeric comparison of numbers,
    decimals and fractions (``1/2``, ``\\frac{1}{2}``, ``0.5`` and ``1,000`` are understood).
    """
    p, a = _normalize_math(prediction), _normalize_math(answer)
    if p == a:
        return bool(p)
    mv = _math_verify() if use_math_verify is not False else None
    if mv is not None:
        gold = mv.parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
        pred = mv.parse(f"\\boxed{{{prediction}}}", parsing_timeout=None)
        return bool(gold) and bool(pred) and bool(mv.verify(gold, pred, timeout_seconds=None))
    fp, fa = _as_fraction(p), _as_fraction(a)
    return fp is not None and fp == fa


@register_reward_function("math", setup=_math_verify)
def math_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer (see :func:`extract_math_answer`) equals ``answer``
    (itself a plain answer or one written as ``\\boxed{...}``)."""
    prediction = extract_math_answer(completion)
    gold = extract_math_answer(answer) if _BOXED.search(answer) else answer
    return 1.0 if prediction is not None and gold and math_equal(prediction, gold) else 0.0


# -- scoring a batch -----------------------------------------------------------------------------
@dataclass
class RewardStats:
    """What happened while scoring a batch."""

    num: int = 0
    """Completions scored."""
    errors: int = 0
    """Calls that raised or returned something other than a finite number (scored 0.0)."""
    timeouts: int = 0
    """Calls stopped (or abandoned) at the time limit (scored 0.0)."""
    first_error: str | None = None
    """``"completion <i>: <type>: <message>"`` of the first error, for the log."""


class _RewardTimeout(BaseException):
    """Raised inside a reward function at its time limit (not an Exception: see the module doc)."""


_OK, _ERROR, _TIMEOUT = "ok", "error", "timeout"


def score_completions(
    fn: RewardFn | str,
    completions: Sequence[str],
    answers: Sequence[str],
    *,
    timeout_s: float | None = 5.0,
) -> tuple[Tensor, RewardStats]:
    """Rewards ``[N]`` (float32) of ``fn(completions[i], answers[i])``, and the error counts.

    ``fn`` is a function or a registered name. ``timeout_s`` limits each call (None: no limit);
    see the module docstring for how. A call that raises, times out, or returns a non-number or a
    non-finite number scores 0.0 and is counted.
    """
    fn = get_reward_function(fn) if isinstance(fn, str) else fn
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
    if isinstance(fn, Hashable) and fn in _SETUP:
        _SETUP[fn]()
    rewards = [0.0] * len(completions)
    stats = RewardStats(num=len(completions))

    def record(i: int, outcome: str, value) -> None:
        if outcome == _TIMEOUT:
            stats.timeouts += 1
            return
        if outcome == _OK:
            if isinstance(value, numbers.Real) and math.isfinite(value):
                rewards[i] = float(value)
                return
            value = TypeError(f"reward function returned {value!r}, not a finite number")
        stats.errors += 1
        if stats.first_error is None:
            stats.first_error = f"completion {i}: {type(value).__name__}: {value}"

    pairs = list(zip(completions, answers))
    if timeout_s is None:
        for i, (c, a) in enumerate(pairs):
            record(i, *_call_plain(fn, c, a))
    elif _alarm_usable():
        _score_with_alarm(fn, pairs, timeout_s, record)
    else:
        for i, (c, a) in enumerate(pairs):
            record(i, *_call_in_thread(fn, c, a, timeout_s))
    return torch.tensor(rewards, dtype=torch.float32), stats


def _call_plain(fn, completion, answer):
    try:
        return _OK, fn(completion, answer)
    except Exception as e:  # noqa: BLE001 - any failure of a reward function scores 0
        return _ERROR, e


def _alarm_usable() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    )


def _score_with_alarm(fn, pairs, timeout_s, record) -> None:
    armed = [False]

    def on_alarm(signum, frame):
        # A signal delivered just as a call finished is handled later: ignore it then.
        if armed[0]:
            armed[0] = False
            raise _RewardTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for i, (completion, answer) in enumerate(pairs):
            try:
                try:
                    armed[0] = True
                    signal.setitimer(signal.ITIMER_REAL, timeout_s)
                    outcome = (_OK, fn(completion, answer))
                finally:
                    armed[0] = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _RewardTimeout:
                outcome = (_TIMEOUT, None)
            except Exception as e:  # noqa: BLE001 - any failure of a reward function scores 0
                outcome = (_ERROR, e)
            record(i, *outcome)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _call_in_thread(fn, completion, answer, timeout_s):
    result: dict = {}

    def target() -> None:
        try:
            result[_OK] = fn(completion, answer)
        except Exception as e:  # noqa: BLE001 - any failure of a reward function scores 0
            result[_ERROR] = e

    worker = threading.Thread(target=target, name="reward-fn", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return _TIMEOUT, None  # abandoned: Python cannot stop a thread
    if _ERROR in result:
        return _ERROR, result[_ERROR]
    return _OK, result.get(_OK)
