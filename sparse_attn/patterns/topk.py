"""Content-selected blocks: `topk_blocks(k)`, a pattern chosen from q and k at call time.

For each batch element, key/value head g and query block qb, every candidate key block kb gets the score
``s = mean_q . mean_k`` (float32; mean_q over the block's rows and the group's query heads, mean_k over the
block's real keys) and the k best candidates are kept, ties to the lower kb. A block is kept whole (full),
so under ``&`` the other side's class and token mask apply inside it; under ``|`` it is united with the
other side. The selection itself lives in `sparse_attn.selection`; this module only holds the pattern node
and the tree walks that selection needs (which nodes select, and among which static blocks).

A pattern that holds a `TopKBlocks` has no layout from lengths alone: `layout()` and `mask()` raise and
point to `select_layout` / `sparse_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..geometry import BlockSet
from ._blockset import empty_tiles
from .base import Intersection, Pattern, PerHead, Union
from .window import UNBOUNDED, SlidingWindow

_NEEDS_DATA = (
    "topk_blocks(k) selects blocks from q and k at call time: pass the pattern to sparse_attention(q, k, v, "
    "pattern), or get its layout with select_layout(pattern, q, k)"
)


class TopKBlocks(Pattern):
    """The `k` best-scoring key blocks of every query block (see the module docstring)."""

    def __init__(self, k: int):
        self.k = check_int("k", k, 1)

    def visible(self, g, h, i, j):
        raise TypeError(_NEEDS_DATA)

    def blocks(self, g):
        raise TypeError(_NEEDS_DATA)

    def __repr__(self):
        return f"topk_blocks({self.k})"


def topk_blocks(k: int) -> Pattern:
    """Keep, per query block, the `k` key blocks whose mean key best matches the block's mean query (all of
    them when there are fewer: any int k >= 1 is taken, a huge one means every candidate).

    Selected from q and k when attention runs (see `sparse_attn.selection`); compose it with static patterns,
    e.g. ``topk_blocks(16) & causal()`` or ``topk_blocks(8) | sliding_window(128) | global_tokens(4)``.
    """
    return TopKBlocks(k)


class Nothing(Pattern):
    """No pair visible; stands in for a selecting node whose block is not selected."""

    def visible(self, g, h, i, j):
        return torch.zeros(torch.broadcast_shapes(h.shape, i.shape, j.shape), dtype=torch.bool)

    def blocks(self, g):
        empty = torch.zeros(0, dtype=torch.long)
        return BlockSet(1, empty, empty.clone(), empty_tiles(g))

    def __repr__(self):
        return "nothing"


def selects(pattern: Pattern) -> bool:
    """True if `pattern` holds a content-selected node (its layout depends on q and k)."""
    if isinstance(pattern, TopKBlocks):
        return True
    if isinstance(pattern, Union | Intersection):
        return selects(pattern.left) or selects(pattern.right)
    if isinstance(pattern, PerHead):
        return any(selects(p) for p in pattern.patterns)
    return False


@dataclass
class Leaf:
    """One `TopKBlocks` node of a pattern tree and the static patterns it selects among (ANDed)."""

    node: TopKBlocks
    among: list[Pattern]


def leaves(pattern: Pattern) -> list[Leaf]:
    """The selecting nodes of `pattern`, in tree order, each with the static sides of the ``&`` above it.

    ``(A | B) & S`` selects A among S (it equals ``(A & S) | (B & S)``); an ``&`` of two selecting sides has
    no such reading and raises.
    """
    found: list[Leaf] = []

    def walk(p: Pattern, among: list[Pattern]) -> None:
        if isinstance(p, TopKBlocks):
            found.append(Leaf(p, among))
        elif isinstance(p, Union):
            walk(p.left, among)
            walk(p.right, among)
        elif isinstance(p, Intersection):
            left, right = selects(p.left), selects(p.right)
            if left and right:
                raise ValueError(
                    f"cannot intersect two content-selected patterns ({p!r}): topk_blocks selects among the "
                    "blocks of a static pattern; unite selections with | instead"
                )
            if left:
                walk(p.left, [*among, p.right])
            elif right:
                walk(p.right, [*among, p.left])
        elif isinstance(p, PerHead):
            for item in p.patterns:
                walk(item, among)

    walk(pattern, [])
    return found


def substitute(pattern: Pattern, chosen: dict[int, bool]) -> Pattern:
    """`pattern` with each selecting node replaced by every pair (``chosen[id(node)]``) or by `Nothing`.

    Patterns are monotone in their parts, so a block's class under a selection is the class of this static
    pattern for the selection bits of that block."""
    if isinstance(pattern, TopKBlocks):
        return SlidingWindow(UNBOUNDED, UNBOUNDED) if chosen[id(pattern)] else Nothing()
    if isinstance(pattern, Union):
        return Union(substitute(pattern.left, chosen), substitute(pattern.right, chosen))
    if isinstance(pattern, Intersection):
        return Intersection(substitute(pattern.left, chosen), substitute(pattern.right, chosen))
    if isinstance(pattern, PerHead):
        return PerHead([substitute(p, chosen) for p in pattern.patterns])
    return pattern
