"""The one exception type that means "the user asked for something we cannot do".

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its
traceback. Messages name the parameter and the values it accepts.
"""
from __future__ import annotations

import math

from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from a user: a parameter, a file, or an unreachable data source."""


def choice_error(param: str, value: object, allowed: Iterable[object]) -> UserError:
    """`param='x' is not one of a|b|c` in one line."""
    allowed_text = "|".join(str(a) for a in allowed)
    return UserError(f"{param}={value!r} is not allowed; expected one of: {allowed_text}")


def check_choice(param: str, value: object, allowed: Iterable[object]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise choice_error(param, value, allowed)


def check_positive(param: str, value: object, *, integer: bool = False) -> None:
    """Positive number (bool is not a number here)."""
    kind = "a positive integer" if integer else "a positive finite number"
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type) or not 0 < value < math.inf:
        raise UserError(f"{param}={value!r} is not allowed; expected {kind}")


def check_non_negative(param: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise UserError(f"{param}={value!r} is not allowed; expected a finite number >= 0")
