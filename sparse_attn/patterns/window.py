"""Diagonal-band patterns: `sliding_window`, `dilated`, `causal`, and `dense` and `top_left_causal`.

All three see key `j` from query position `qpos` according to ``d = qpos - j`` alone, so every row of
query blocks keeps one contiguous run of key blocks, and a tile's mask depends only on the ``d`` at its
top-left corner: a window of any length has a handful of distinct partial tiles.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_int
from ._blockset import from_candidates
from .base import Pattern

# Stands in for an unbounded window side; far beyond any sequence length, far from int64 overflow.
UNBOUNDED = 1 << 40


def _bounded(x: int) -> int:
    """`x` clamped to +-UNBOUNDED: the same band for every real length, and no int64 overflow (a window of
    sys.maxsize once wrapped around and built a wrong layout)."""
    return max(-UNBOUNDED, min(UNBOUNDED, x))


class _Band(Pattern):
    """Visible iff ``lo <= qpos - j <= hi`` and ``(qpos - j) % dilation == 0``."""

    lo: int
    hi: int
    dilation: int = 1

    def visible(self, g, h, i, j):
        d = i + g.offset - j
        visible = (d >= self.lo) & (d <= self.hi)
        if self.dilation > 1:
            visible &= d % self.dilation == 0
        return visible

    def intersection(self, other):
        if not isinstance(other, _Band):
            return None
        return Band(
            max(self.lo, other.lo), min(self.hi, other.hi), _bounded(math.lcm(self.dilation, other.dilation))
        )

    classifies_blocks = True

    def blocks(self, g):
        return self._classify(g, *_band_candidates(g, self.lo, self.hi))

    def blocks_among(self, g, other):
        key = torch.unique(other.key % (g.num_q_blocks * g.num_k_blocks))
        return self._classify(g, key // g.num_k_blocks, key % g.num_k_blocks)

    def _classify(self, g, qb, kb):
        """The kept blocks among the candidates (qb, kb), each exactly classified."""
        row0, col0 = qb * g.block_q + g.offset, kb * g.block_k
        d_min = row0 - (col0 + g.valid_cols(kb) - 1)
        d_max = row0 + g.valid_rows(qb) - 1 - col0
        meets = (d_max >= self.lo) & (d_min <= self.hi)
        full = (d_min >= self.lo) & (d_max <= self.hi)
        if self.dilation > 1:
            full &= (d_min == d_max) & (d_min % self.dilation == 0)
        qb, kb, full, corner = qb[meets], kb[meets], full[meets], (row0 - col0)[meets]
        # The tile is a function of the d at its top-left corner.
        return from_candidates(self, g, 1, torch.zeros_like(qb), qb, kb, full, corner)


def _band_candidates(g, lo, hi):
    """Every (query block, key block) whose d-range meets [lo, hi], one contiguous key run per row."""
    qb = torch.arange(g.num_q_blocks)
    q_first = qb * g.block_q + g.offset
    q_last = q_first + g.valid_rows(qb) - 1
    j_first = (q_first - hi).clamp(min=0)
    j_last = (q_last - lo).clamp(max=g.kv_len - 1)
    kb_first = j_first // g.block_k
    counts = (j_last // g.block_k - kb_first + 1).clamp(min=0)
    counts = torch.where(j_first <= j_last, counts, 0)
    rows = torch.repeat_interleave(qb, counts)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    kb = torch.repeat_interleave(kb_first, counts) + torch.arange(len(rows)) - starts
    return rows, kb


class Band(_Band):
    """A band with explicit bounds: the band two bands share (tighter bounds, the least common multiple
    of their dilations), or one that depends on the lengths (`TopLeftCausal`)."""

    def __init__(self, lo: int, hi: int, dilation: int):
        self.lo, self.hi, self.dilation = lo, hi, dilation


class SlidingWindow(_Band):
    def __init__(self, left: int, right: int | None = None):
        self.left = check_int("left", left, 0)
        self.right = self.left if right is None else check_int("right", right, 0)
        self.lo, self.hi = _bounded(-self.right), _bounded(self.left)

    def __repr__(self):
        return f"sliding_window({self.left}, {self.right})"


class Dilated(_Band):
    def __init__(self, left: int, right: int | None = None, dilation: int = 2):
        self.left = check_int("left", left, 0)
        self.right = self.left if right is None else check_int("right", right, 0)
        self.step = check_int("dilation", dilation, 1)
        # A dilation beyond every |qpos - j| keeps only d = 0, as UNBOUNDED does.
        self.dilation = _bounded(self.step)
        self.lo, self.hi = _bounded(-self.right * self.step), _bounded(self.left * self.step)

    def __repr__(self):
        return f"dilated({self.left}, {self.right}, dilation={self.step})"


class Causal(_Band):
    lo, hi = 0, UNBOUNDED

    def __repr__(self):
        return "causal()"


class Dense(_Band):
    lo, hi = -UNBOUNDED, UNBOUNDED

    def __repr__(self):
        return "dense()"


class TopLeftCausal(Pattern):
    """Visible iff ``j <= i`` (row index, not position): causal aligned top-left (xformers'
    LowerTriangularMask). Its band depends on the lengths: ``qpos - j >= offset``."""

    def _band(self, g) -> _Band:
        return Band(g.offset, UNBOUNDED, 1)

    def visible(self, g, h, i, j):
        return self._band(g).visible(g, h, i, j)

    def blocks(self, g):
        return self._band(g).blocks(g)

    def __repr__(self):
        return "top_left_causal()"


def sliding_window(left: int, right: int | None = None) -> Pattern:
    """Visible iff ``-right <= qpos - j <= left``; `right` defaults to `left`."""
    return SlidingWindow(left, right)


def dilated(left: int, right: int | None = None, dilation: int = 2) -> Pattern:
    """Every `dilation`-th key, `left` keys back and `right` keys ahead (Longformer's dilated window)."""
    return Dilated(left, right, dilation)


def causal() -> Pattern:
    """Visible iff ``j <= qpos``."""
    return Causal()


def dense() -> Pattern:
    """Every query sees every key (the pattern of ordinary attention)."""
    return Dense()


def top_left_causal() -> Pattern:
    """Visible iff ``j <= i`` with i the query *row* (causal aligned top-left, not bottom-right)."""
    return TopLeftCausal()
