"""What every fuzzer shares: the property a loader must keep, a hang bound, and byte mutations.

The property: a parser or loader given any input either returns a correct result or raises
:class:`~trustseg.errors.UserError` whose message is one non-empty line naming the culprit. Any other
exception, or a call still running after `TIMEOUT_S`, fails the example (and hypothesis shrinks it).

Mutations start from a valid file written by the test: truncated at a random length, bits flipped at
random positions (half of the time within the first bytes, where headers and lengths live), both, or
replaced by random bytes altogether.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st

from trustseg.errors import UserError

T = TypeVar("T")

TIMEOUT_S = 10.0


class Hang(BaseException):
    """Raised in the test when a call runs past its bound.

    A BaseException, so that product code which turns every ``Exception`` of a third-party reader into
    a UserError cannot hide a hang as a clean refusal.
    """


@contextmanager
def time_limit(seconds: float = TIMEOUT_S) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the block runs longer than `seconds` (SIGALRM)."""

    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_one_line(error: UserError, *needles: str) -> None:
    """A user error's message: one non-empty line that contains every needle (a path, a key, ...)."""
    message = str(error)
    assert message.strip(), f"empty {type(error).__name__} message"
    assert "\n" not in message and "\r" not in message, f"multi-line message: {message!r}"
    for needle in needles:
        assert needle in message, f"{needle!r} not named in: {message!r}"


def outcome(what: str, call: Callable[[], T], *needles: str, seconds: float = TIMEOUT_S) -> T | UserError:
    """`call()` under the hang bound: its result, or the UserError it raised (checked by `assert_one_line`).

    Any other exception propagates and fails the example. Which of the two it was is counted as the
    hypothesis event ``"{what}: result"`` or ``"{what}: UserError"`` (``--hypothesis-show-statistics``
    lists each one's share of the examples).
    """
    with time_limit(seconds):
        try:
            result = call()
        except UserError as error:
            assert_one_line(error, *needles)
            event(f"{what}: UserError")
            return error
    event(f"{what}: result")
    return result


def fuzz_settings(max_examples: int) -> settings:
    """Reproducible runs (same examples every time) without hypothesis' per-example deadline: the hang
    bound is `time_limit`, and the first example of a module pays for imports. No explain phase: its
    line tracing makes a parser 10-100x slower, so a failing example would be reported as a hang."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large],
    )


@st.composite
def mutated(draw: st.DrawFn, valid: bytes, head: int = 64) -> bytes:
    """`valid` truncated, bit-flipped (anywhere, or within its first `head` bytes), both, or random bytes
    (at most 4 KiB, hypothesis' buffer being 8 KiB)."""
    kind = draw(st.sampled_from(["truncate", "flip", "flip_head", "truncate_and_flip", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=min(2 * len(valid), 4096)))
    data = bytearray(valid)
    if kind in ("truncate", "truncate_and_flip"):
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind != "truncate" and data:
        limit = min(len(data), head) if kind == "flip_head" else len(data)
        for bit in draw(st.lists(st.integers(0, 8 * limit - 1), min_size=1, max_size=8)):
            data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)
