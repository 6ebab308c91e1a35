"""The small validators every layer uses: of Python arguments (TypeError for a wrong type, ValueError for a wrong
value, each naming the argument) and of command-line text (``argparse`` types, which argparse turns into one-line
usage errors naming the option)."""

from __future__ import annotations

import argparse
import math

FLOAT32_MAX = 3.4028234663852886e38  # a value beyond it becomes inf in the float32 the step computes in


def check_positive_int(value, name: str) -> None:
    """TypeError unless ``value`` is an int (not a bool), ValueError unless it is >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def finite_float(text: str) -> float:
    """A float that float32 holds: NaN, inf and values beyond float32's range are refused."""
    value = float(text)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be a finite number within float32's range (|x| <= 3.4e38), got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def aspect_ratio(text: str) -> float:
    """A longest kept aspect ratio: a number from 1 to 4, or a ratio such as 4:3 or 4/3."""
    for separator in (":", "/"):
        if separator in text:
            long, _, short = text.partition(separator)
            try:
                value = float(long) / float(short)
            except (ValueError, ZeroDivisionError):
                raise argparse.ArgumentTypeError(f"expected a ratio such as 4:3, got {text}") from None
            break
    else:
        value = finite_float(text)
    if not 1.0 <= value <= 4.0:
        raise argparse.ArgumentTypeError(f"must be from 1 (the centre square) to 4 (4:1), got {text}")
    return value
