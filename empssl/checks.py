"""The small validators every layer uses: of Python arguments (TypeError for a wrong type, ValueError for a wrong
value, each naming the argument) and of command-line text (``argparse`` types, which argparse turns into one-line
usage errors naming the option)."""

from __future__ import annotations

import argparse
import math
import os

FLOAT32_MAX = 3.4028234663852886e38  # a value beyond it becomes inf in the float32 the step computes in
FLOAT32_TINY = 1.1754943508222875e-38  # float32's smallest normal number: below it a divisor flushes to 0 on a GPU
INT64_LIMIT = 2**63  # counts and sizes are int64 in torch: a count must be below it


def check_positive_int(value, name: str) -> None:
    """TypeError unless ``value`` is an int (not a bool), ValueError unless it is >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_finite_number(value, name: str, positive: bool = False) -> None:
    """TypeError unless ``value`` is a real number (not a bool), ValueError unless it is finite within float32's
    range (and, with ``positive``, at least float32's smallest normal number): what the command line's
    ``finite_float`` and ``positive_float`` accept."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if abs(value) > FLOAT32_MAX or not math.isfinite(value):  # compared first: a huge int overflows isfinite
        # an int of thousands of digits has no str(): its size is shown instead
        shown = repr(value) if isinstance(value, float) else f"about 1e{int(abs(value).bit_length() * math.log10(2))}"
        raise ValueError(f"{name} must be a finite number within float32's range (|x| <= 3.4e38), got {shown}")
    if positive and not value >= FLOAT32_TINY:
        raise ValueError(
            f"{name} must be a positive number (at least 1.2e-38, float32's smallest normal), got {value!r}"
        )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    if value >= INT64_LIMIT:
        raise argparse.ArgumentTypeError(f"must be below 2^63 (a 64-bit count), got {text}")
    return value


def thread_count(text: str) -> int:
    """A number of CPU threads: a positive integer, at most this machine's cores (more only oversubscribe them, and
    thousands of threads exhaust the process's stack space)."""
    value = positive_int(text)
    cores = os.cpu_count() or 1
    if value > cores:
        raise argparse.ArgumentTypeError(f"must be at most this machine's {cores} CPU cores, got {text}")
    return value


def momentum_float(text: str) -> float:
    """A momentum: a number in [0, 1) (at 1 or beyond, SGD's velocity grows without bound)."""
    value = finite_float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (SGD diverges from 1 on), got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def finite_float(text: str) -> float:
    """A float that float32 holds: NaN, inf and values beyond float32's range are refused."""
    value = float(text)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be a finite number within float32's range (|x| <= 3.4e38), got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value >= FLOAT32_TINY:
        raise argparse.ArgumentTypeError(f"must be a positive number (at least 1.2e-38), got {text}")
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
