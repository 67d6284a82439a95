"""The usual compositions: Longformer and BigBird."""

from __future__ import annotations

from ..checks import check_int
from .base import Pattern
from .block_sparse import random_blocks
from .global_tokens import global_tokens as _global_tokens
from .window import dilated, sliding_window


def longformer(window: int, global_tokens=1, *, dilation: int = 1) -> Pattern:
    """Longformer: a (optionally dilated) window of `window` keys each side, plus global tokens.

    `global_tokens` is an int n (positions 0..n-1, e.g. the [CLS] token) or a sequence of positions.
    """
    window = check_int("window", window, 0)
    dilation = check_int("dilation", dilation, 1)
    local = sliding_window(window) if dilation == 1 else dilated(window, dilation=dilation)
    return local | _global_tokens(global_tokens)


def bigbird(
    window: int = 192,
    global_tokens=64,
    num_random_blocks: int = 3,
    *,
    block_size: int = 64,
    seed: int = 0,
    heads: int | None = None,
) -> Pattern:
    """BigBird: a sliding window, global tokens, and `num_random_blocks` seeded random key blocks per query block.

    With `heads`, every head draws its own random blocks (a per-head pattern).
    """
    return (
        sliding_window(window)
        | _global_tokens(global_tokens)
        | random_blocks(num_random_blocks, block_size, seed=seed, heads=heads)
    )
