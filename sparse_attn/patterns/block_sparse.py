"""Block-level patterns: `block_sparse` (a user layout) and seeded `random_blocks`.

Both keep cells of a grid of their own cell size. Each kept cell covers a rectangle of layout blocks
(one block when the sizes and alignment agree); a layout block is full iff every cell it overlaps is kept,
which is counted from the kept cells themselves, so the work is proportional to the kept cells.
"""

from __future__ import annotations

import torch

from ..checks import check_int, check_size
from ._blockset import from_candidates
from .base import Pattern, check_block_size


def _cells_to_blocks(pattern, g, heads, h, r, c, cell_q, cell_k, row_shift):
    """Layout blocks covered by kept cells (h, r, c); a cell row r holds rows with ``i + row_shift`` in it."""
    # Valid rows/keys of each cell, in layout coordinates.
    i_first = (r * cell_q - row_shift).clamp(min=0)
    i_last = ((r + 1) * cell_q - 1 - row_shift).clamp(max=g.q_len - 1)
    j_first = c * cell_k
    j_last = ((c + 1) * cell_k - 1).clamp(max=g.kv_len - 1)
    ok = (i_first <= i_last) & (j_first <= j_last)
    h, r, c, i_first, i_last, j_first, j_last = (t[ok] for t in (h, r, c, i_first, i_last, j_first, j_last))
    qb0, nq = i_first // g.block_q, i_last // g.block_q - i_first // g.block_q + 1
    kb0, nk = j_first // g.block_k, j_last // g.block_k - j_first // g.block_k + 1
    # Expand each cell to its rectangle of blocks.
    per_cell = nq * nk
    cell = torch.repeat_interleave(torch.arange(len(h)), per_cell)
    local = torch.arange(len(cell)) - torch.repeat_interleave(torch.cumsum(per_cell, 0) - per_cell, per_cell)
    bh = h[cell]
    bq = qb0[cell] + local // nk[cell]
    bk = kb0[cell] + local % nk[cell]
    nqb, nkb = g.num_q_blocks, g.num_k_blocks
    key, inverse, hits = torch.unique((bh * nqb + bq) * nkb + bk, return_inverse=True, return_counts=True)
    bh, bq, bk = key // (nqb * nkb), (key // nkb) % nqb, key % nkb
    # Cells each block overlaps (within the valid region), to compare with the kept ones it was hit by.
    rows_first = bq * g.block_q + row_shift
    rows_last = bq * g.block_q + g.valid_rows(bq) - 1 + row_shift
    cols_last = bk * g.block_k + g.valid_cols(bk) - 1
    first_r, first_c = rows_first.div(cell_q, rounding_mode="floor"), (bk * g.block_k) // cell_k
    n_r = rows_last.div(cell_q, rounding_mode="floor") - first_r + 1
    n_c = cols_last // cell_k - first_c + 1
    full = hits == n_r * n_c
    return from_candidates(
        pattern,
        g,
        heads,
        bh,
        bq,
        bk,
        full,
        _tile_keys(
            r[cell], c[cell], inverse, key, bq, bk, first_r, first_c, n_c, n_r, rows_first, g, cell_q, cell_k
        ),
    )


def _tile_keys(r, c, inverse, key, bq, bk, first_r, first_c, n_c, n_r, rows_first, g, cell_q, cell_k):
    """Tile keys: a partial block's tile is fixed by which of the cells it overlaps are kept and by where
    the cell grid falls in it (its phase), so blocks agreeing on both share one tile (a random pattern
    whose cells are smaller than the layout blocks has a few dozen distinct tiles, not one per block).
    Blocks overlapping more cells than an int64 bit mask holds keep one tile each. The first row and
    column of blocks get their own keys: the clamps above make their tiles differ."""
    if len(key) == 0 or int((n_r * n_c).max()) > 60:
        return key
    bit = (r - first_r[inverse]) * n_c[inverse] + (c - first_c[inverse])
    mask = torch.zeros(len(key), dtype=torch.int64).scatter_add_(0, inverse, torch.ones_like(bit) << bit)
    parts = torch.stack(
        [mask, rows_first.remainder(cell_q), (bk * g.block_k) % cell_k, n_r, n_c, bq == 0, bk == 0], 1
    )
    return torch.unique(parts.long(), dim=0, return_inverse=True)[1]


class BlockSparse(Pattern):
    """Visible iff ``layout[h, i // block_q, j // block_k]`` (row index i, not qpos)."""

    def __init__(self, layout, block_size):
        if not isinstance(layout, torch.Tensor):
            raise TypeError(f"block_sparse layout must be a bool torch.Tensor, got {type(layout).__name__}")
        if layout.dtype != torch.bool:
            raise TypeError(f"block_sparse layout must have dtype torch.bool, got {layout.dtype}")
        if layout.dim() not in (2, 3):
            raise ValueError(
                f"block_sparse layout must be [nqb, nkb] or [H, nqb, nkb], got shape {tuple(layout.shape)}"
            )
        self.cell_q, self.cell_k = check_block_size(block_size)
        # A private copy: patterns are immutable (their layouts are cached).
        self.cells = layout.detach().cpu().clone()
        self.num_heads = layout.shape[0] if layout.dim() == 3 else None
        if self.cells.dim() == 2:
            self.cells = self.cells[None]

    def check_lengths(self, q_len, kv_len):
        need = (-(-q_len // self.cell_q), -(-kv_len // self.cell_k))
        have = tuple(self.cells.shape[1:])
        if have[0] < need[0] or have[1] < need[1]:
            raise ValueError(
                f"block_sparse layout of {have[0]}x{have[1]} blocks of {self.cell_q}x{self.cell_k} does not cover "
                f"q_len={q_len}, kv_len={kv_len}: expected at least {need[0]}x{need[1]}"
            )

    def visible(self, g, h, i, j):
        h = h if self.num_heads is not None else torch.zeros_like(h)
        # Clamped: rows and keys past the sequence (padding of ragged tiles) are masked by the caller.
        r = (i // self.cell_q).clamp(max=self.cells.shape[1] - 1)
        c = (j // self.cell_k).clamp(max=self.cells.shape[2] - 1)
        return self.cells[h, r, c]

    def blocks(self, g):
        nq, nk = -(-g.q_len // self.cell_q), -(-g.kv_len // self.cell_k)
        h, r, c = torch.nonzero(self.cells[:, :nq, :nk], as_tuple=True)
        return _cells_to_blocks(self, g, self.cells.shape[0], h, r, c, self.cell_q, self.cell_k, 0)

    def __repr__(self):
        heads = f"{self.num_heads} heads, " if self.num_heads else ""
        n = int(self.cells.sum())
        return f"block_sparse({heads}{tuple(self.cells.shape[-2:])} cells of {self.cell_q}x{self.cell_k}, {n} kept)"


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit integer hash (splitmix64's finaliser), deterministic on every device and platform."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685  # 0x94D049BB133111EB as int64
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


class RandomBlocks(Pattern):
    """Each query-position block sees `num_blocks` distinct key blocks, drawn from a seeded hash."""

    def __init__(self, num_blocks: int, block_size: int = 64, *, seed: int = 0, heads: int | None = None):
        self.count = check_int("num_blocks", num_blocks, 0)
        self.cell = check_size("block_size", block_size)
        self.seed = check_int("seed", seed)
        self.num_heads = None if heads is None else check_size("heads", heads)

    def _choices(self, g, t_first: int, t_last: int) -> torch.Tensor:
        """Chosen key blocks ``[H, t_last - t_first + 1, min(count, key blocks)]``, Floyd's sampling."""
        n_keys = -(-g.kv_len // self.cell)
        heads = self.num_heads or 1
        t = torch.arange(t_first, t_last + 1)
        k = min(self.count, n_keys)
        # As wide as the draws, not `count`: random_blocks(10**6) means "every key block", not 10**6 columns.
        chosen = torch.full((heads, len(t), k), -1, dtype=torch.int64)
        # The seed's part wrapped to int64 as torch wraps it, so that every int seed works (not just |seed| < 2**43).
        base = (self.seed * 1_000_003 + (1 << 63)) % (1 << 64) - (1 << 63)
        stream = (base + torch.arange(heads)[:, None]) * 2_654_435_761 + t[None, :]
        for s in range(k):
            bound = n_keys - k + s + 1
            # Draw s of a row hashes (row stream, s) without collisions (stream * 64 + s once repeated
            # draws of neighbouring rows beyond 64 draws).
            pick = _mix(_mix(stream) + s).remainder(bound)
            taken = (chosen[:, :, :s] == pick[..., None]).any(-1)
            chosen[:, :, s] = torch.where(taken, bound - 1, pick)
        return chosen

    def _position_blocks(self, g):
        t_first = max(g.offset, 0) // self.cell
        t_last = (g.kv_len - 1) // self.cell
        return t_first, t_last

    def visible(self, g, h, i, j):
        t_first, t_last = self._position_blocks(g)
        chosen = self._choices(g, t_first, t_last)
        qpos = i + g.offset
        # Clamped: rows outside the sequence (padding of ragged tiles) are masked by the caller.
        t = (qpos.div(self.cell, rounding_mode="floor") - t_first).clamp(0, t_last - t_first)
        h = h if self.num_heads is not None else torch.zeros_like(h)
        hit = (chosen[h, t] == (j // self.cell)[..., None]).any(-1)
        return hit & (qpos >= 0)

    def blocks(self, g):
        t_first, t_last = self._position_blocks(g)
        chosen = self._choices(g, t_first, t_last)
        h, t, s = torch.nonzero(chosen >= 0, as_tuple=True)
        c = chosen[h, t, s]
        heads = self.num_heads or 1
        return _cells_to_blocks(self, g, heads, h, t + t_first, c, self.cell, self.cell, g.offset)

    def __repr__(self):
        heads = f", heads={self.num_heads}" if self.num_heads else ""
        return f"random_blocks({self.count}, block_size={self.cell}, seed={self.seed}{heads})"


def block_sparse(layout: torch.Tensor, block_size) -> Pattern:
    """Visible iff ``layout[h, i // bq, j // bk]``; layout is bool ``[nqb, nkb]`` or ``[H, nqb, nkb]``."""
    return BlockSparse(layout, block_size)


def random_blocks(
    num_blocks: int, block_size: int = 64, *, seed: int = 0, heads: int | None = None
) -> Pattern:
    """Each block of `block_size` query positions sees `num_blocks` distinct random key blocks.

    Deterministic in `seed`; the draw for a query block depends only on the seed, the head, the block's
    absolute position and the number of key blocks. With `heads`, every head draws its own blocks.
    """
    return RandomBlocks(num_blocks, block_size, seed=seed, heads=heads)
