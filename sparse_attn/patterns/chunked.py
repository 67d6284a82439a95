"""`chunked(size)`: queries see the keys of their own chunk (Llama 4's chunked attention).

Visible iff ``qpos // size == j // size`` (``qpos = i + Skv - Sq``; a query at a negative position sees
nothing). With a diagonal band it gives Llama 4's mask, ``chunked(8192) & causal()``: that intersection is
one pattern, `Chunked` with a band (``lo <= qpos - j <= hi``, a multiple of the dilation) applied inside
every chunk, so it enumerates only the blocks both keep.

Blocks are enumerated analytically, like the bands of `window.py`: every row of query blocks keeps one
contiguous run of key blocks, from the start of the chunk of its first query (or the band's first key)
to the end of the chunk of its last query (or the band's last key). A candidate is full when its rows and
keys lie in one chunk and the band covers it. Tiles are periodic: shifting a block's rows and keys by a
multiple of `size` leaves its mask unchanged, so a tile is a function of where the first chunk boundary
falls in its rows and in its keys, and of the band's ``qpos - j`` at its corner (`Chunked._tile_key`): a
chunked layout of any length has few distinct partial tiles. (The segment builder of `documents.py` would
give every block holding chunk boundaries on both sides its own tile: one tile per diagonal block for
chunks shorter than a block.)
"""

from __future__ import annotations

import torch

from ..checks import check_int
from ._blockset import from_candidates
from .base import Pattern
from .documents import _band_pairs
from .window import UNBOUNDED, _Band


class Chunked(Pattern):
    """Visible iff ``qpos // size == j // size`` and ``lo <= qpos - j <= hi`` (and ``(qpos - j) %
    dilation == 0``): a diagonal band inside every chunk; `chunked(size)` has no band."""

    def __init__(self, size: int, lo: int = -UNBOUNDED, hi: int = UNBOUNDED, dilation: int = 1):
        self.size = check_int("size", size, 1)
        # Chunks longer than any position behave alike (one chunk from 0): clamped, no int64 overflow.
        self._size = min(self.size, UNBOUNDED)
        self.lo, self.hi, self.dilation = lo, hi, dilation

    def visible(self, g, h, i, j):
        qpos = i + g.offset
        # Floor division: a negative qpos has a negative chunk, which no key (j >= 0) shares.
        same = torch.div(qpos, self._size, rounding_mode="floor") == torch.div(
            j, self._size, rounding_mode="floor"
        )
        return same & _band_pairs(qpos, j, self.lo, self.hi, self.dilation)

    def intersection(self, other):
        if isinstance(other, _Band):
            band = _Band.intersection(other, _band_of(self))
            return Chunked(self.size, band.lo, band.hi, band.dilation)
        if isinstance(other, Chunked) and other.size == self.size:
            band = _Band.intersection(_band_of(other), _band_of(self))
            return Chunked(self.size, band.lo, band.hi, band.dilation)
        return None

    def blocks(self, g):
        size = self._size
        qb, kb = self._candidates(g)
        # Valid corners of each candidate: its first / last real query position and key.
        p0 = qb * g.block_q + g.offset
        p1 = p0 + g.valid_rows(qb) - 1
        c0 = kb * g.block_k
        c1 = c0 + g.valid_cols(kb) - 1
        chunk = torch.div(c0, size, rounding_mode="floor")
        one_chunk = (
            (torch.div(p0, size, rounding_mode="floor") == chunk)
            & (torch.div(p1, size, rounding_mode="floor") == chunk)
            & (torch.div(c1, size, rounding_mode="floor") == chunk)
        )
        d_min, d_max = p0 - c1, p1 - c0
        band_covers = (d_min >= self.lo) & (d_max <= self.hi)
        full = one_chunk & band_covers
        if self.dilation > 1:
            full &= (d_min == d_max) & (d_min % self.dilation == 0)
        # Only partial candidates need a tile key (full ones have no tile).
        tile_key = torch.zeros_like(qb)
        part = ~full
        tile_key[part] = self._tile_key(g, p0[part], c0[part], band_covers[part])
        return from_candidates(self, g, 1, torch.zeros_like(qb), qb, kb, full, tile_key)

    def _tile_key(self, g, p0, c0, band_covers):
        """Equal keys, equal tiles (ragged edges aside, which `from_candidates` separates).

        Row r of a tile is in chunk ``chunk(p0) + n(r)``, where n counts the chunk starts in ``(p0, p0 + r]``
        and depends only on the first of them, ``size - p0 % size`` rows in (the same for keys). So a tile is
        fixed by those two offsets (clipped to the block: "no boundary"), ``chunk(p0) - chunk(c0)`` and the
        band's ``d = p0 - c0`` at the corner (irrelevant where the band covers the block)."""
        size = self._size
        row_cut = (size - p0 % size).clamp(max=g.block_q)
        col_cut = (size - c0 % size).clamp(max=g.block_k)
        chunk_gap = torch.div(p0, size, rounding_mode="floor") - torch.div(c0, size, rounding_mode="floor")
        covered = band_covers if self.dilation == 1 else torch.zeros_like(band_covers)
        corner = torch.where(covered, UNBOUNDED * 4, p0 - c0)
        return _number(row_cut, col_cut, chunk_gap, corner)

    def _candidates(self, g):
        """Every block that may hold a visible pair: one contiguous run of key blocks per query block row."""
        size = self._size
        qb = torch.arange(g.num_q_blocks)
        p0 = qb * g.block_q + g.offset
        p1 = p0 + g.valid_rows(qb) - 1
        # Rows at negative positions see nothing: start at the first real position.
        first = torch.maximum(p0, torch.zeros_like(p0))
        j_first = torch.maximum(torch.div(first, size, rounding_mode="floor") * size, first - self.hi)
        j_last = torch.minimum(
            (torch.div(p1, size, rounding_mode="floor") + 1) * size - 1, p1 - self.lo
        ).clamp(max=g.kv_len - 1)
        j_first = j_first.clamp(min=0)
        kb_first = j_first // g.block_k
        counts = torch.where((j_first <= j_last) & (p1 >= 0), j_last // g.block_k - kb_first + 1, 0)
        rows = torch.repeat_interleave(qb, counts)
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        kb = torch.repeat_interleave(kb_first, counts) + torch.arange(len(rows)) - starts
        return rows, kb

    def __repr__(self):
        if (self.lo, self.hi, self.dilation) == (-UNBOUNDED, UNBOUNDED, 1):
            return f"chunked({self.size})"
        return f"(chunked({self.size}) & band({self.lo}, {self.hi}, dilation={self.dilation}))"


def _number(*columns: torch.Tensor) -> torch.Tensor:
    """Ids of the distinct rows of `columns` (equal rows, equal ids), numbered compactly one column at a
    time so that no product of lengths can overflow (1-D sorts: `unique(dim=0)` is far slower)."""
    ids = torch.zeros_like(columns[0])
    for column in columns:
        _, column_ids = torch.unique(column, return_inverse=True)
        width = int(column_ids.max()) + 1 if len(column_ids) else 1
        ids = torch.unique(ids * width + column_ids, return_inverse=True)[1]
    return ids


def _band_of(p) -> _Band:
    band = _Band()
    band.lo, band.hi, band.dilation = p.lo, p.hi, p.dilation
    return band


def chunked(size: int) -> Pattern:
    """Queries see the keys of their own chunk of `size` positions: visible iff ``qpos // size == j // size``.

    ``chunked(size) & causal()`` is Llama 4's chunked attention (``attention_chunk_size``); compose it with
    windows, `global_tokens`, `per_head` like any pattern. Built in time proportional to the kept blocks.
    """
    return Chunked(size)
