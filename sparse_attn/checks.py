"""Argument checks shared by the whole package: bad input gets an error naming what was expected.

Every integer argument is checked where it is given, against one of two kinds of range:

- sizes of tensor dimensions (sequence lengths, heads, head dims, batch sizes, block sizes, world sizes):
  ``minimum <= value <= MAX_SIZE``, so that no later shape computation overflows;
- extents that mean "up to" (window sides, dilations, chunk sizes, global-token counts, top-k and
  random-block counts): any int from `minimum` up. One beyond every sequence means "all of them" and is
  clamped where it is used (to the sequence, or to `window.UNBOUNDED`), so no huge value ever reaches
  int64 arithmetic; `sliding_window(10**30)` is the unbounded window.
"""

from __future__ import annotations

import numbers

#: Largest size of a tensor dimension an argument may give (int32 indices address blocks and rows).
MAX_SIZE = 2**31 - 1


def check_int(
    name: str, value, minimum: int | None = None, maximum: int | None = None, *, wrong_type: type = TypeError
) -> int:
    """`value` as an int, else `wrong_type` (TypeError, or ValueError where an API promises that) naming
    `name`; a ValueError if it is below `minimum` or above `maximum`. bool is not an int here."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise wrong_type(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:,}, got {value:,}")
    return int(value)


def check_size(name: str, value, minimum: int = 1, *, wrong_type: type = TypeError) -> int:
    """`check_int` for the size of a tensor dimension: ``minimum <= value <= MAX_SIZE``."""
    return check_int(name, value, minimum, MAX_SIZE, wrong_type=wrong_type)
