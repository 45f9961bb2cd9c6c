"""argparse `type=` callables that check a flag's range where it is parsed: a bad value is argparse's
one-line usage error with exit status 2, before any model is loaded."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number_in(
    kind: type, low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float | int]:
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = (
        f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    )

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        ok = (low is None or (value > low if low_open else value >= low)) and (
            high is None or (value < high if high_open else value <= high)
        )
        if not ok:
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} in {interval}"  # argparse names the type in its messages
    return parse


positive_int = number_in(int, 1, None)
non_negative_int = number_in(int, 0, None)
seed_int = number_in(int, 0, 2**32 - 1)
fraction_open = number_in(float, 0, 1, low_open=True, high_open=True)
fraction_closed = number_in(float, 0, 1)
positive_float = number_in(float, 0, None, low_open=True)
