"""Argument checks shared by the whole package: bad input gets an error naming what was expected."""

from __future__ import annotations

import numbers


def check_int(name: str, value, minimum: int | None = None, *, wrong_type: type = TypeError) -> int:
    """`value` as an int, else `wrong_type` (TypeError, or ValueError where an API promises that) naming
    `name`; a ValueError if it is below `minimum`. bool is not an int here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise wrong_type(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
