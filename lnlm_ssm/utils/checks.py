"""Argument checks for every tier (ops, layers, models, training): one wording per rule.

Each check raises a ValueError that names the argument, says what was expected
and shows what it got, and returns the value (normalised where that is the point)
so that a constructor can check and store in one line.
"""

from __future__ import annotations

import math
from typing import Any, Iterable


def check_positive_int(name: str, value: Any) -> int:
    """``value`` is an int >= 1 (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_nonnegative_int(name: str, value: Any) -> int:
    """``value`` is an int >= 0 (a bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` is True or False (a string such as "False" from a hand-edited config is not)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (true or false), got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable) -> Any:
    """``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_dt_limit(dt_limit: Any) -> tuple[float, float]:
    """Mamba-2's ``dt_limit`` as a pair of floats ``(min, max)`` with ``min <= max``; (0, inf) means no limit."""
    try:
        low, high = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"dt_limit must be a pair of floats (min, max), got {dt_limit!r}") from None
    if not low <= high:
        raise ValueError(f"dt_limit must satisfy min <= max, got {dt_limit!r}")
    return low, high


NO_DT_LIMIT = (0.0, math.inf)
