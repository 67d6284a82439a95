"""N-dimensional patterns on a token grid: `neighborhood` (NATTEN) and `sliding_tile` (Sliding Tile Attention),
and `tile_major`, which computes either in tile-major token order.

Tokens are the cells of ``grid`` (``(L,)``, ``(H, W)`` or ``(T, H, W)``) in row-major order, optionally after
`prefix` and before `suffix` other tokens (text tokens, say), which these patterns never make visible:
compose with ``global_tokens`` for that. Every dimension has a rule giving, for each query coordinate ``x``,
inclusive key bounds ``lo[x] <= y <= hi[x]`` and a dilation (keys with ``(y - x) % dilation != 0`` are not
visible); a key is visible when it is visible in every dimension.

Blocks are enumerated analytically. The sequence is seen as a sequence of *tiles* (a row-major grid is tiles
of ``(1, ..., 1, W)``: its lines). The queries of one query block inside one tile form a segment; the union
of their windows is a box, which touches a box of key tiles; in each key tile the box's cells lie between
two token indices, whose key blocks are the candidates. That is O(kept blocks), up to the boxes'
over-approximation, plus O(S) per-token bookkeeping. A candidate is full when every query of its block sees
every key of its block (an interval test per dimension, exact without dilation).

Tiles are deduplicated exactly: a tile's mask is a function of the per-row window offsets of its query block
(``x - x_ref``, ``lo - x``, ``hi - x`` per dimension), the per-column offsets of its key block
(``y - y_ref``), and the corner difference ``x_ref - y_ref``; equal triples give equal tiles.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from ..checks import check_int
from ._blockset import from_candidates
from .base import Pattern
from .chunked import _number


# -- argument checks ---------------------------------------------------------------------------------
def _check_grid(grid) -> tuple[int, ...]:
    if isinstance(grid, numbers.Integral) or not isinstance(grid, tuple | list):
        raise TypeError(
            f"grid must be a tuple of 1 to 3 positive ints ((L,), (H, W) or (T, H, W)), got {grid!r}"
        )
    if not 1 <= len(grid) <= 3:
        raise ValueError(f"grid must have 1 to 3 dimensions ((L,), (H, W) or (T, H, W)), got {len(grid)}")
    return tuple(check_int(f"grid[{d}]", n, 1) for d, n in enumerate(grid))


def _per_dim(name: str, value, ndim: int, minimum: int) -> tuple[int, ...]:
    """An int (the same for every dimension) or one int per dimension."""
    if isinstance(value, tuple | list):
        if len(value) != ndim:
            raise ValueError(f"{name} must be an int or {ndim} ints (one per grid dimension), got {value!r}")
        return tuple(check_int(f"{name}[{d}]", v, minimum) for d, v in enumerate(value))
    return (check_int(name, value, minimum),) * ndim


def _per_dim_bool(name: str, value, ndim: int) -> tuple[bool, ...]:
    values = tuple(value) if isinstance(value, tuple | list) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} must be a bool or {ndim} bools (one per grid dimension), got {value!r}")
    for v in values:
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool or a tuple of bools, got {value!r}")
    return values


# -- per-dimension window rules ---------------------------------------------------------------------
def neighborhood_bounds(n: int, k: int, dilation: int, stride: int, causal: bool):
    """NATTEN's window along one dimension of length `n`: inclusive key bounds ``[n]`` per query coordinate.

    Dilation d puts coordinate x in group ``x % d`` at in-group index ``x // d``; the window rule runs on
    in-group indices (group length ``ceil((n - g) / d)``) and maps back. Stride s gives queries ``x // s``
    a shared leader whose window they use (causal: only the start; each query ends at itself)."""
    x = torch.arange(n)
    group, index = x % dilation, x // dilation
    length = (n - group + dilation - 1) // dilation
    if causal:
        leader = torch.minimum((index // stride) * stride + stride - 1, length - 1)
        start, end = (leader - k + 1).clamp(min=0), index
    else:
        leader = torch.minimum((index // stride) * stride + stride // 2, length - 1)
        start = torch.minimum((leader - k // 2).clamp(min=0), length - k)
        end = start + k - 1
    return group + dilation * start, group + dilation * end


def sliding_tile_bounds(n: int, tile: int, window: int):
    """STA's window along one dimension: a query's tile sees the `window` key tiles around it, shifted at
    the borders (tiles of the last, ragged tile included)."""
    x = torch.arange(n)
    num_tiles = -(-n // tile)
    first = (x // tile - window // 2).clamp(min=0).clamp(max=num_tiles - window)
    return first * tile, ((first + window) * tile).clamp(max=n) - 1


# -- token orders -------------------------------------------------------------------------------------
class TokenOrder:
    """The grid's cells in tile-major order: tiles row-major, cells row-major inside each tile (ragged
    tiles at the far edges are smaller). Tiles of ``(1, ..., 1, W)`` are row-major order itself.

    ``cell_of[u]`` is the row-major cell at position u of this order (None for row-major order)."""

    def __init__(self, grid: tuple[int, ...], tile: tuple[int, ...]):
        self.grid, self.tile = grid, tuple(min(t, n) for t, n in zip(tile, grid, strict=True))
        self.row_major = all(t == 1 for t in self.tile[:-1]) and self.tile[-1] == grid[-1]
        self.num_tiles = tuple(-(-n // t) for n, t in zip(grid, self.tile, strict=True))
        self.cell_of = None if self.row_major else self._cells_in_order()

    def coords(self, u: torch.Tensor) -> list[torch.Tensor]:
        """Grid coordinates of positions u (in 0..N-1) of this order."""
        cell = u if self.cell_of is None else self.cell_of[u]
        return unravel(cell, self.grid)

    def _cells_in_order(self) -> torch.Tensor:
        cells = torch.arange(math.prod(self.grid))
        coords = unravel(cells, self.grid)
        tile_ids = ravel([c // t for c, t in zip(coords, self.tile, strict=True)], self.num_tiles)
        local = ravel([c % t for c, t in zip(coords, self.tile, strict=True)], self.tile)
        return torch.argsort(tile_ids * math.prod(self.tile) + local)

    def tile_extents(self, tile_coords: list[torch.Tensor]) -> list[torch.Tensor]:
        """Extent of tiles (ragged at the far edge) per dimension."""
        return [(n - a * t).clamp(max=t) for a, t, n in zip(tile_coords, self.tile, self.grid, strict=True)]

    def tile_start(self, tile_coords: list[torch.Tensor]) -> torch.Tensor:
        """Position of each tile's first cell: the cells of every earlier tile come before it."""
        # Tiles before a (row-major over tiles) first differ from a in some dimension d, smaller there:
        # a's extents in dimensions < d, a_d * t_d cells in d, whole dimensions after d.
        ext = self.tile_extents(tile_coords)
        start = torch.zeros_like(tile_coords[0])
        for d in range(len(self.grid)):
            before = tile_coords[d] * self.tile[d]
            for e in range(d):
                before = before * ext[e]
            start = start + before * math.prod(self.grid[d + 1 :])
        return start

    def __eq__(self, other):
        return isinstance(other, TokenOrder) and (self.grid, self.tile) == (other.grid, other.tile)

    def __hash__(self):
        return hash((self.grid, self.tile))


def unravel(index: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor]:
    coords = []
    for n in reversed(shape):
        coords.append(index % n)
        index = index // n
    return coords[::-1]


def ravel(coords, shape) -> torch.Tensor:
    index = torch.zeros_like(coords[0])
    for c, n in zip(coords, shape, strict=True):
        index = index * n + c
    return index


# -- the pattern --------------------------------------------------------------------------------------
class GridPattern(Pattern):
    """Visible iff both tokens are grid cells and, in every dimension, ``lo[x] <= y <= hi[x]`` and
    ``(y - x) % dilation == 0`` (x the query's coordinate, y the key's)."""

    def __init__(self, grid, bounds, dilation, description, *, prefix=0, suffix=0, order=None):
        self.grid, self.description = grid, description
        self.lo = [b[0] for b in bounds]
        self.hi = [b[1] for b in bounds]
        self.dilation = dilation
        self.prefix = check_int("prefix", prefix, 0)
        self.suffix = check_int("suffix", suffix, 0)
        self.cells = math.prod(grid)
        self.order = order if order is not None else TokenOrder(grid, (1,) * (len(grid) - 1) + (grid[-1],))

    def in_order(self, order: TokenOrder) -> GridPattern:
        """The same pattern with its tokens in `order`."""
        return GridPattern(
            self.grid,
            list(zip(self.lo, self.hi, strict=True)),
            self.dilation,
            self.description,
            prefix=self.prefix,
            suffix=self.suffix,
            order=order,
        )

    def check_lengths(self, q_len, kv_len):
        expected = self.prefix + self.cells + self.suffix
        if kv_len != expected:
            extra = f" + prefix {self.prefix} + suffix {self.suffix}" if self.prefix or self.suffix else ""
            raise ValueError(
                f"{self.description} needs a sequence of {expected:,} tokens (grid {self.grid} = "
                f"{self.cells:,} cells{extra}), got kv_len={kv_len:,}"
            )
        if q_len > kv_len:
            raise ValueError(f"{self.description} needs q_len <= kv_len, got {q_len} > {kv_len}")

    # The token predicate.
    def _grid_coords(self, position: torch.Tensor):
        u = position - self.prefix
        inside = (u >= 0) & (u < self.cells)
        return self.order.coords(u.clamp(0, self.cells - 1)), inside

    def visible(self, g, h, i, j):
        (x, q_in), (y, k_in) = self._grid_coords(i + g.offset), self._grid_coords(j)
        out = q_in & k_in
        for d in range(len(self.grid)):
            out = out & (y[d] >= self.lo[d][x[d]]) & (y[d] <= self.hi[d][x[d]])
            if self.dilation[d] > 1:
                out = out & ((y[d] - x[d]) % self.dilation[d] == 0)
        return out

    # The blocks.
    def blocks(self, g):
        rows = self._query_rows(g)
        qb, kb = self._candidates(g, rows)
        full = self._full(g, qb, kb, rows)
        tile_key = torch.zeros_like(qb)
        part = ~full
        tile_key[part] = self._tile_key(g, qb[part], kb[part])
        return from_candidates(self, g, 1, torch.zeros_like(qb), qb, kb, full, tile_key)

    def _query_rows(self, g):
        """Rows whose position is a grid cell: (row, its position u in the order, its coordinates)."""
        first = max(self.prefix - g.offset, 0)
        last = min(self.prefix + self.cells - g.offset, g.q_len)
        row = torch.arange(first, max(first, last))
        u = row + g.offset - self.prefix
        return row, u, self.order.coords(u)

    def _candidates(self, g, rows):
        row, u, x = rows
        order, ndim = self.order, len(self.grid)
        # Segments: the queries of one query block inside one tile; the union of their windows is a box.
        tile_of = ravel([c // t for c, t in zip(x, order.tile, strict=True)], order.num_tiles)
        seg_key = (row // g.block_q) * math.prod(order.num_tiles) + tile_of
        seg, seg_of_row = torch.unique(seg_key, return_inverse=True)
        seg_qb = seg // math.prod(order.num_tiles)
        box_lo = [_segment_reduce(self.lo[d][x[d]], seg_of_row, len(seg), "amin") for d in range(ndim)]
        box_hi = [_segment_reduce(self.hi[d][x[d]], seg_of_row, len(seg), "amax") for d in range(ndim)]
        # Every key tile the box touches: a cartesian product of tile ranges, expanded one dimension at a time.
        owner = torch.arange(len(seg))
        tile_coords: list[torch.Tensor] = []
        for d in range(ndim):
            t_first = box_lo[d][owner] // order.tile[d]
            counts = box_hi[d][owner] // order.tile[d] - t_first + 1
            owner, step = _expand(owner, counts)
            tile_coords = [c.repeat_interleave(counts) for c in tile_coords]
            tile_coords.append(t_first.repeat_interleave(counts) + step)
        # The box's cells inside each key tile lie between its two corner cells' positions.
        ext = order.tile_extents(tile_coords)
        base = [a * t for a, t in zip(tile_coords, order.tile, strict=True)]
        low = [torch.maximum(box_lo[d][owner], base[d]) - base[d] for d in range(ndim)]
        high = [torch.minimum(box_hi[d][owner], base[d] + ext[d] - 1) - base[d] for d in range(ndim)]
        start = order.tile_start(tile_coords) + self.prefix
        first_key = start + ravel_varying(low, ext)
        last_key = start + ravel_varying(high, ext)
        kb_first = first_key // g.block_k
        cand_owner, step = _expand(torch.arange(len(owner)), last_key // g.block_k - kb_first + 1)
        qb = seg_qb[owner][cand_owner]
        kb = kb_first[cand_owner] + step
        key = torch.unique(qb * g.num_k_blocks + kb)
        return key // g.num_k_blocks, key % g.num_k_blocks

    def _full(self, g, qb, kb, rows):
        """Blocks whose every valid query is a grid cell that sees every valid key (exact without dilation)."""
        if any(d > 1 for d in self.dilation):
            return torch.zeros_like(qb, dtype=torch.bool)
        row, _, x = rows
        ndim = len(self.grid)
        nqb, nkb = g.num_q_blocks, g.num_k_blocks
        # Query blocks: all rows in the grid; the tightest bounds over their rows.
        q_in = torch.bincount(row // g.block_q, minlength=nqb) == g.valid_rows(torch.arange(nqb))
        q_lo = [_segment_reduce(self.lo[d][x[d]], row // g.block_q, nqb, "amax") for d in range(ndim)]
        q_hi = [_segment_reduce(self.hi[d][x[d]], row // g.block_q, nqb, "amin") for d in range(ndim)]
        # Key blocks: all keys in the grid; the coordinate range of their keys.
        key = torch.arange(self.prefix, self.prefix + self.cells)
        y = self.order.coords(key - self.prefix)
        k_in = torch.bincount(key // g.block_k, minlength=nkb) == g.valid_cols(torch.arange(nkb))
        k_lo = [_segment_reduce(y[d], key // g.block_k, nkb, "amin") for d in range(ndim)]
        k_hi = [_segment_reduce(y[d], key // g.block_k, nkb, "amax") for d in range(ndim)]
        full = q_in[qb] & k_in[kb]
        for d in range(ndim):
            full &= (q_lo[d][qb] <= k_lo[d][kb]) & (k_hi[d][kb] <= q_hi[d][qb])
        return full

    def _tile_key(self, g, qb, kb):
        """Equal keys, equal tiles (see the module docstring). A dimension that every pair of the block
        passes (its offsets ``y - x`` lie inside every row's window) does not shape the tile: its corner
        difference is left out of the key, so blocks that differ only there share one tile."""
        rows = self._profiles(g, g.q_len, g.block_q, g.offset, with_bounds=True)
        cols = self._profiles(g, g.kv_len, g.block_k, 0, with_bounds=False)
        corner = []
        for d in range(len(self.grid)):
            delta = rows.ref[d][qb] - cols.ref[d][kb]
            if self.dilation[d] == 1:
                # y - x = (y - y_ref) - (x - x_ref) - delta over the block's pairs.
                low = cols.rel_min[d][kb] - rows.rel_max[d][qb] - delta
                high = cols.rel_max[d][kb] - rows.rel_min[d][qb] - delta
                passes = (low >= rows.lo_max[d][qb]) & (high <= rows.hi_min[d][qb])
                delta = torch.where(passes, _PASSES, delta)
            corner.append(delta)
        return _number(rows.ids[qb], cols.ids[kb], *corner)

    def _profiles(self, g, length, block, offset, with_bounds):
        """Per block: an id of its tokens' offsets relative to its first grid token (equal ids, equal
        offsets), that token's coordinates, and per dimension the range of the offsets and (rows) the
        tightest window bounds relative to the query, ``max(lo - x)`` and ``min(hi - x)``."""
        n_blocks = -(-length // block)
        u = torch.arange(n_blocks * block) + offset - self.prefix
        inside = (u >= 0) & (u < self.cells) & (torch.arange(n_blocks * block) < length)
        x = self.order.coords(u.clamp(0, self.cells - 1))
        # The first grid token of each block is the reference (blocks without one never reach here).
        flags = inside.view(n_blocks, block)
        first = torch.argmax(flags.long(), dim=1) + torch.arange(n_blocks) * block
        ref = [c[first] for c in x]
        columns = [inside.long()]
        stats = {"rel_min": [], "rel_max": [], "lo_max": [], "hi_min": []}

        def reduce(values, how):
            fill = _PASSES if how == "min" else -_PASSES
            masked = torch.where(inside, values, fill).view(n_blocks, block)
            return masked.amin(1) if how == "min" else masked.amax(1)

        for d in range(len(self.grid)):
            rel = x[d] - ref[d].repeat_interleave(block)
            columns.append(rel)
            stats["rel_min"].append(reduce(rel, "min"))
            stats["rel_max"].append(reduce(rel, "max"))
            if with_bounds:
                lo, hi = self.lo[d][x[d]] - x[d], self.hi[d][x[d]] - x[d]
                columns += [lo, hi]
                stats["lo_max"].append(reduce(lo, "max"))
                stats["hi_min"].append(reduce(hi, "min"))
        features = torch.stack([torch.where(inside, c, 0) for c in columns], 1).view(n_blocks, -1)
        return _Profiles(_row_ids(features), ref, **stats)

    def __repr__(self):
        extra = ""
        if self.prefix or self.suffix:
            extra = f", prefix={self.prefix}, suffix={self.suffix}"
        text = self.description[:-1] + extra + ")"
        return text if self.order.row_major else f"tile_major({text}, tile={self.order.tile})"


#: Stands for "every pair passes this dimension" in tile keys (no real coordinate difference is this large).
_PASSES = 1 << 40


class _Profiles(NamedTuple):
    ids: torch.Tensor
    ref: list
    rel_min: list
    rel_max: list
    lo_max: list
    hi_min: list


def ravel_varying(coords, extents) -> torch.Tensor:
    """Row-major index of `coords` in boxes of per-element `extents`."""
    index = torch.zeros_like(coords[0])
    for c, n in zip(coords, extents, strict=True):
        index = index * n + c
    return index


def _segment_reduce(values, segment, n, reduce):
    out = torch.zeros(n, dtype=values.dtype)
    return out.scatter_reduce_(0, segment, values, reduce=reduce, include_self=False)


def _expand(owner, counts):
    """Repeat each owner `counts` times; also the index 0..count-1 of every repeat."""
    counts = counts.clamp(min=0)
    starts = torch.cumsum(counts, 0) - counts
    expanded = owner.repeat_interleave(counts)
    step = torch.arange(len(expanded)) - starts.repeat_interleave(counts)
    return expanded, step


def _row_ids(features: torch.Tensor) -> torch.Tensor:
    """Ids of the distinct rows of an int64 matrix, exactly: rows are hashed, then checked against their
    hash group's first row (a collision falls back to a lexicographic sort)."""
    if len(features) == 0:
        return torch.zeros(0, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0x5EED)
    weights = torch.randint(1, 1 << 62, (features.shape[1],), generator=gen) | 1
    # Integer products wrap around in int64: a 64-bit polynomial-free hash.
    hashes = (features * weights).sum(1)
    _, ids = torch.unique(hashes, return_inverse=True)
    first = torch.full((int(ids.max()) + 1,), len(ids), dtype=torch.int64)
    first.scatter_reduce_(0, ids, torch.arange(len(ids)), reduce="amin")
    if torch.equal(features, features[first[ids]]):
        return ids
    return torch.unique(features, dim=0, return_inverse=True)[1]


# -- the public generators ----------------------------------------------------------------------------
def neighborhood(grid, kernel_size, *, dilation=1, stride=1, causal=False, prefix=0, suffix=0) -> Pattern:
    """NATTEN's neighbourhood attention on a token grid ``(L,)``, ``(H, W)`` or ``(T, H, W)`` (row-major).

    Per dimension (an int applies to every dimension): with dilation 1 and no causality, a query at
    coordinate ``i`` sees keys ``[s, s + k)`` with ``s = clamp(i - k // 2, 0, n - k)``: the window is shifted
    at the borders so every query sees the full kernel; causal, keys ``[max(0, i - k + 1), i]``. Dilation
    ``d`` splits a dimension into ``d`` interleaved groups and runs the window inside the query's group.
    Stride ``s`` makes ``s`` consecutive queries share their leader's window (``stride == kernel_size`` is
    Swin-style blocked attention). ``2 <= k``, ``k * dilation <= n``, ``stride <= k``.

    `prefix` / `suffix`: other tokens (e.g. text) before / after the grid's cells; this pattern keeps none
    of their pairs (add ``global_tokens(...)`` to make them global). The sequence must be exactly
    ``prefix + prod(grid) + suffix`` tokens long.
    """
    grid = _check_grid(grid)
    ndim = len(grid)
    k = _per_dim("kernel_size", kernel_size, ndim, 2)
    dil = _per_dim("dilation", dilation, ndim, 1)
    st = _per_dim("stride", stride, ndim, 1)
    causal_dims = _per_dim_bool("causal", causal, ndim)
    for d in range(ndim):
        if k[d] * dil[d] > grid[d]:
            raise ValueError(
                f"kernel_size {k[d]} x dilation {dil[d]} = {k[d] * dil[d]} is larger than grid dimension "
                f"{d} ({grid[d]}): kernel_size * dilation <= grid size is required"
            )
        if st[d] > k[d]:
            raise ValueError(f"stride {st[d]} is larger than kernel_size {k[d]} in dimension {d}")
    bounds = [neighborhood_bounds(grid[d], k[d], dil[d], st[d], causal_dims[d]) for d in range(ndim)]
    args = [f"{grid}", f"kernel_size={_fmt(k)}"]
    for name, value, default in (("dilation", dil, 1), ("stride", st, 1)):
        if any(v != default for v in value):
            args.append(f"{name}={_fmt(value)}")
    if any(causal_dims):
        args.append(f"causal={causal_dims if len(set(causal_dims)) > 1 else causal_dims[0]}")
    return GridPattern(grid, bounds, dil, f"neighborhood({', '.join(args)})", prefix=prefix, suffix=suffix)


def sliding_tile(grid, tile, window, *, prefix=0, suffix=0) -> Pattern:
    """Sliding Tile Attention on a token grid (row-major): the grid is cut into tiles of `tile` cells per
    dimension, and a query's tile sees the `window` key tiles around it per dimension (``window // 2``
    before), shifted at the borders so that it always sees `window` tiles. For odd windows and a grid that
    the tiles divide, this is ``neighborhood(grid, kernel_size=window * tile, stride=tile)``.

    Run it in tile-major order, as STA's kernels do, with ``tile_major(sliding_tile(...))``: its tiles are
    then dense blocks. `prefix` / `suffix` as for `neighborhood`.
    """
    grid = _check_grid(grid)
    ndim = len(grid)
    t = _per_dim("tile", tile, ndim, 1)
    w = _per_dim("window", window, ndim, 1)
    for d in range(ndim):
        tiles = -(-grid[d] // t[d])
        if w[d] > tiles:
            raise ValueError(
                f"window {w[d]} tiles is larger than grid dimension {d}, which has {tiles} tiles of {t[d]}"
            )
    bounds = [sliding_tile_bounds(grid[d], t[d], w[d]) for d in range(ndim)]
    pattern = GridPattern(
        grid,
        bounds,
        (1,) * ndim,
        f"sliding_tile({grid}, tile={_fmt(t)}, window={_fmt(w)})",
        prefix=prefix,
        suffix=suffix,
    )
    pattern.tile = t
    return pattern


def _fmt(values: tuple[int, ...]):
    return values[0] if len(set(values)) == 1 else values


# -- tile-major order ---------------------------------------------------------------------------------
class TileMajor(Pattern):
    """A grid pattern computed in tile-major token order (see `tile_major`). Its `mask` and `layout` are in
    that order; `sparse_attention` and `SparseAttention` permute q, k, v into it and the output back."""

    reorders_tokens = True

    def __init__(self, pattern: Pattern, tile=None):
        if not isinstance(pattern, Pattern):
            raise TypeError(f"tile_major takes a Pattern, got {type(pattern).__name__}")
        if pattern.reorders_tokens:
            raise TypeError(f"{pattern!r} is already in tile-major order")
        leaves = list(grid_leaves(pattern))
        if not leaves:
            raise TypeError(
                f"tile_major needs a pattern built from neighborhood or sliding_tile, got {pattern!r}"
            )
        first = leaves[0]
        for leaf in leaves[1:]:
            if (leaf.grid, leaf.prefix, leaf.suffix) != (first.grid, first.prefix, first.suffix):
                raise ValueError(
                    f"tile_major needs one grid: {leaf!r} and {first!r} differ in grid, prefix or suffix"
                )
        if tile is None:
            tiles = {getattr(leaf, "tile", None) for leaf in leaves}
            if len(tiles) != 1 or None in tiles:
                raise TypeError(
                    "tile_major needs tile=... (per dimension) unless the pattern is one sliding_tile"
                )
            tile = tiles.pop()
        tile = _per_dim("tile", tile, len(first.grid), 1)
        self.pattern, self.leaf = pattern, first
        self.grid, self.prefix, self.suffix = first.grid, first.prefix, first.suffix
        self.order = TokenOrder(first.grid, tile)
        self.cells = first.cells
        # Layout position a holds the user's token perm[a]; inverse[p] is where user token p goes.
        cell_of = self.order.cell_of if self.order.cell_of is not None else torch.arange(self.cells)
        self.perm = torch.cat(
            [
                torch.arange(self.prefix),
                cell_of + self.prefix,
                torch.arange(self.suffix) + self.prefix + self.cells,
            ]
        )
        self.inverse = torch.argsort(self.perm)
        self.permuted = _in_order(pattern, self)
        self.num_heads = pattern.num_heads

    @property
    def length(self) -> int:
        return self.prefix + self.cells + self.suffix

    def check_lengths(self, q_len, kv_len):
        # The grid decides the length; global tokens were checked against it when reordered. (Checking
        # them again would read a tensor, which torch.compile cannot trace without a guard.)
        self.leaf.check_lengths(q_len, kv_len)
        if q_len != kv_len:
            raise ValueError(
                f"tile-major order needs q_len == kv_len (self-attention), got {q_len} and {kv_len}"
            )

    def visible(self, g, h, i, j):
        return self.permuted.visible(g, h, i, j)

    def blocks(self, g):
        return self.permuted.blocks(g)

    def to_layout_order(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """`x` (user order along `dim`) in this pattern's token order: differentiable, exact."""
        return x.index_select(dim, self.perm.to(x.device))

    def to_user_order(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Inverse of `to_layout_order`."""
        return x.index_select(dim, self.inverse.to(x.device))

    def __or__(self, other):
        raise TypeError("compose patterns before reordering them: tile_major(p | q), not tile_major(p) | q")

    __and__ = __or__

    def __repr__(self):
        return f"tile_major({self.pattern!r}, tile={self.order.tile})"


def grid_leaves(p):
    """The `neighborhood` / `sliding_tile` nodes of pattern `p`, in tree order."""
    from .base import nodes_of

    return nodes_of(p, GridPattern)


def _in_order(p, tm: TileMajor):
    """Pattern `p` with its tokens in `tm`'s order: grid patterns change order, global tokens move with
    their cells; other patterns (windows, causal) have no meaning across a permutation and are refused."""
    from .base import Intersection, PerHead, Union
    from .global_tokens import GlobalTokens
    from .window import Dense

    if isinstance(p, GridPattern):
        return p.in_order(tm.order)
    if isinstance(p, Union | Intersection):
        return type(p)(_in_order(p.left, tm), _in_order(p.right, tm))
    if isinstance(p, PerHead):
        return PerHead([_in_order(q, tm) for q in p.patterns])
    if isinstance(p, GlobalTokens):
        positions = torch.arange(min(p.n, tm.length)) if p.is_prefix else p.positions
        if len(positions) and int(positions.max()) >= tm.length:
            raise ValueError(
                f"global token position {int(positions.max())} is outside the {tm.length} tokens"
            )
        return GlobalTokens(tm.inverse[positions])
    if isinstance(p, Dense):
        return p
    raise TypeError(
        f"tile_major reorders neighborhood, sliding_tile, global_tokens and dense patterns and their "
        f"compositions; {p!r} has no meaning in another token order"
    )


def tile_major(pattern: Pattern, tile=None) -> Pattern:
    """`pattern` (built from `neighborhood` / `sliding_tile` on one grid, with `global_tokens`, `|`, `&`,
    `per_head`) computed in tile-major token order: the grid is cut into tiles of `tile` cells per dimension
    (default: the sliding_tile's tile), the tiles' cells are made contiguous, tile after tile, so that a
    neighbourhood becomes dense blocks (as NATTEN's fused kernels and STA do).

    `sparse_attention(q, k, v, tile_major(p))` equals `sparse_attention(q, k, v, p)`: q, k, v (and key_mask)
    are permuted into tile-major order inside the call and the output back (exact, differentiable). The
    pattern's own `mask()` / `layout()` are in tile-major order. Prefix and suffix tokens keep their place.
    """
    return TileMajor(pattern, tile)
