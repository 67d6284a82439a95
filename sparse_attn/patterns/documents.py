"""Layouts from data: packed documents (`documents`) and the segment builder varlen shares.

`documents(ids)` keeps query position ``qpos`` and key ``j`` apart unless ``ids[..., qpos] == ids[..., j]``.
Packed documents are contiguous, so every batch element is a list of *segments*: a segment is a range of
query rows, a range of keys and a shift ``delta`` with ``d = row + delta - key`` (``qpos - j`` for packed
documents, where ``delta = kv_len - q_len``; a sequence's own bottom-right alignment for varlen batches).
A pair is visible iff its row and its key lie in the same segment and ``lo <= d <= hi`` (and ``d`` is a
multiple of the dilation): the diagonal bands of `window.py` (causal, sliding windows, dilated windows, or
none: ``lo, hi = -inf, inf``) applied inside each segment.

`segment_band_blocks` builds that set in work proportional to the kept blocks: each row of query blocks
keeps one contiguous run of key blocks (from the first key its first segment may see to the last key its
last segment may see); a candidate block is full when its rows and keys all lie in one segment and the band
covers it, and otherwise partial. Most full blocks are known per row, not block by block: a row inside one
segment has a run of surely full key blocks (from the segment's bounds and the band); only the other
candidates are classified one by one. Partial tiles are shared: a block whose rows and keys share exactly
one segment has a rectangle (the segment's rows x the segment's keys, in block coordinates) intersected
with the band at the block's corner, a handful of distinct tiles per document boundary; only blocks holding
two or more segments on both sides (near the diagonal at a boundary, or short documents) get a tile of
their own.
The ids are read once: the only host synchronisation is one copy of ``sign(diff(ids))`` to the CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..geometry import FULL, BlockSet, Geometry
from ._blockset import empty_tiles
from .base import Pattern
from .window import UNBOUNDED, _Band


@dataclass
class Segments:
    """Segments of every batch element, sorted by (element, position); int64 on the CPU.

    Rows ``[q_start, q_end)`` and keys ``[k_start, k_end)`` of element ``batch``, both non-empty; a pair of
    the segment is at ``d = row + shift - key``. Rows and keys outside every segment see nothing."""

    batch: torch.Tensor
    q_start: torch.Tensor
    q_end: torch.Tensor
    k_start: torch.Tensor
    k_end: torch.Tensor
    shift: torch.Tensor

    def nonempty(self) -> Segments:
        keep = torch.nonzero((self.q_end > self.q_start) & (self.k_end > self.k_start)).squeeze(1)
        return Segments(*(_at(getattr(self, f), keep) for f in self.__dataclass_fields__))


def _at(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` for a 1-D index: `index_select`, a fraction of advanced indexing's per-call cost."""
    return t.index_select(0, index)


def _segment_of(start: torch.Tensor, end: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Index of the segment holding each global position (sorted, disjoint [start, end)), or -1."""
    s = torch.searchsorted(start, pos, right=True) - 1
    inside = (s >= 0) & (pos < end[s.clamp(min=0)])
    return torch.where(inside, s, -1)


def segment_band_blocks(
    segs: Segments, g: Geometry, batch: int | None, lo: int, hi: int, dilation: int = 1
) -> BlockSet:
    """The exact `BlockSet` of "same segment and ``lo <= d <= hi``, ``d % dilation == 0``" (see the module
    docstring); one layout sequence per batch element (`batch` elements, or None: one shared)."""
    bq, bk, nqb, nkb = g.block_q, g.block_k, g.num_q_blocks, g.num_k_blocks
    n_b = batch or 1
    # Global coordinates: element b's row r is b * q_len + r, its key j is b * kv_len + j.
    gq0, gq1 = segs.batch * g.q_len + segs.q_start, segs.batch * g.q_len + segs.q_end
    gk0, gk1 = segs.batch * g.kv_len + segs.k_start, segs.batch * g.kv_len + segs.k_end
    if len(gq0) == 0:
        return BlockSet(
            1, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), empty_tiles(g), batch
        )
    # Rows of query blocks, their first / last row and segments.
    row_b = torch.arange(n_b).repeat_interleave(nqb)
    row_qb = torch.arange(nqb).repeat(n_b)
    r0 = row_qb * bq
    r1 = r0 + g.valid_rows(row_qb) - 1
    sf = torch.searchsorted(gq1, row_b * g.q_len + r0, right=True)
    sl = torch.searchsorted(gq0, row_b * g.q_len + r1, right=True) - 1
    live = sf <= sl
    live = torch.nonzero(live).squeeze(1)
    row_b, row_qb, r0, r1, sf, sl = (t.index_select(0, live) for t in (row_b, row_qb, r0, r1, sf, sl))
    # The first key the first segment's first row may see, the last key the last segment's last row may see.
    ra = torch.maximum(r0, _at(segs.q_start, sf))
    rb = torch.minimum(r1, _at(segs.q_end, sl) - 1)
    j_first = torch.minimum(
        torch.maximum(_at(segs.k_start, sf), ra + _at(segs.shift, sf) - hi), _at(segs.k_end, sf)
    )
    j_last = torch.maximum(
        torch.minimum(_at(segs.k_end, sl) - 1, rb + _at(segs.shift, sl) - lo), _at(segs.k_start, sl) - 1
    )
    kb_first = j_first.clamp(0, g.kv_len - 1) // bk
    counts = torch.where(j_first <= j_last, j_last.clamp(0, g.kv_len - 1) // bk - kb_first + 1, 0)
    pick = torch.repeat_interleave(torch.arange(len(counts)), counts)
    within = torch.arange(len(pick)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    kb = _at(kb_first, pick) + within
    key = _at((row_b * nqb + row_qb) * nkb + kb_first, pick) + within
    # Most candidates are surely full (a run of key blocks per row, from its segment's bounds): only the
    # others are classified block by block.
    fa, fb = _sure_full_runs(segs, r0, r1, sf, sl, g, lo, hi, dilation)
    sure = (kb >= _at(fa, pick)) & (kb <= _at(fb, pick))
    rest = torch.nonzero(~sure).squeeze(1)
    row = _at(pick, rest)
    r0, r1, sf, sl = (_at(t, row) for t in (r0, r1, sf, sl))
    # Key-block columns (element, key block): first / last key and segments, once per column, then gathered.
    col = _at(row_b * nkb, row) + _at(kb, rest)
    col_b = torch.arange(n_b).repeat_interleave(nkb)
    col_k0 = torch.arange(nkb).repeat(n_b) * bk
    col_k1 = col_k0 + g.valid_cols(col_k0 // bk) - 1
    col_kf = torch.searchsorted(gk1, col_b * g.kv_len + col_k0, right=True)
    col_kl = torch.searchsorted(gk0, col_b * g.kv_len + col_k1, right=True) - 1
    k0, k1, kf, kl = (_at(t, col) for t in (col_k0, col_k1, col_kf, col_kl))
    c_lo, c_hi = torch.maximum(sf, kf), torch.minimum(sl, kl)
    # One shared segment: a rectangle of rows x keys, intersected with the band.
    x = c_lo.clamp(max=len(gq0) - 1)
    one = c_lo == c_hi
    shift = _at(segs.shift, x)
    ra = torch.maximum(r0, _at(segs.q_start, x))
    rb = torch.minimum(r1, _at(segs.q_end, x) - 1)
    ca = torch.maximum(k0, _at(segs.k_start, x))
    cb = torch.minimum(k1, _at(segs.k_end, x) - 1)
    corner = r0 + shift - k0  # d at the block's top-left corner
    d_min, d_max = ra + shift - cb, rb + shift - ca
    band_full = (d_min >= lo) & (d_max <= hi)
    if dilation > 1:
        band_full &= (d_min == d_max) & (d_min % dilation == 0)
    band_meets = (d_max >= lo) & (d_min <= hi)
    whole = (ra == r0) & (rb == r1) & (ca == k0) & (cb == k1)
    keep, full = sure.clone(), sure.clone()
    keep[rest] = (one & band_meets) | (c_lo < c_hi)
    full[rest] = one & whole & band_full
    kept = torch.nonzero(keep).squeeze(1)
    key, full = _at(key, kept), _at(full, kept)
    tile_id = torch.full_like(key, FULL)
    part = torch.nonzero(~full).squeeze(1)
    if len(part) == 0:
        return BlockSet(1, key, tile_id, empty_tiles(g), batch)
    # Partial blocks are never sure ones: their place among the others.
    sel = _at(torch.cumsum(~sure, 0) - 1, _at(kept, part))
    rect = _at(one, sel)
    # Rectangle tiles, deduplicated by (rows, keys, band corner or "band covers it"), packed in one int64.
    rsel = _at(sel, torch.nonzero(rect).squeeze(1))
    r0s, k0s = _at(r0, rsel), _at(k0, rsel)
    # A rectangle in tile coordinates: rows [lo_r, hi_r], keys [lo_c, hi_c]; its band corner ck.
    lo_r, hi_r, lo_c, hi_c = (
        _at(ra, rsel) - r0s,
        _at(rb, rsel) - r0s,
        _at(ca, rsel) - k0s,
        _at(cb, rsel) - k0s,
    )
    ck, covered = _at(corner, rsel), _at(band_full, rsel)
    corners, corner_id = torch.unique(torch.where(covered, UNBOUNDED * 4, ck), return_inverse=True)
    rect_key = (((lo_r * bq + hi_r) * bk + lo_c) * bk + hi_c) * len(corners) + corner_id
    uniq, inverse = torch.unique(rect_key, return_inverse=True)
    rep_of = torch.zeros(len(uniq), dtype=torch.long).scatter_(0, inverse, torch.arange(len(rsel)))
    rows = torch.arange(bq)[None, :, None]
    cols = torch.arange(bk)[None, None, :]
    lo_r, hi_r, lo_c, hi_c, ck, covered = (
        _at(t, rep_of)[:, None, None] for t in (lo_r, hi_r, lo_c, hi_c, ck, covered)
    )
    if dilation == 1:
        # Every row of a tile sees one interval of keys (its segment's keys within the band): the packed
        # words come from the intervals directly, with no [bq, bk] tile ever formed.
        rect_tiles = None
        rect_start, rect_end = _rect_intervals(rows, lo_r, hi_r, lo_c, hi_c, ck, covered, lo, hi)
    else:
        # Only bool tensors are tile-sized: each comparison broadcasts [m, bq, 1] against [m or 1, 1, bk].
        in_rows = (rows >= lo_r) & (rows <= hi_r)
        in_cols = (cols >= lo_c) & (cols <= hi_c)
        rect_tiles = in_rows & in_cols & (_band_pairs(rows + ck, cols, lo, hi, dilation) | covered)
    # Blocks holding several segments on both sides: each its own tile, from the segment of every row / key.
    multi = _at(sel, torch.nonzero(~rect).squeeze(1))
    mb = _at(row_b, _at(row, multi))
    mr0, mr1, mk0, mk1 = (_at(t, multi) for t in (r0, r1, k0, k1))
    row_pos = (mb * g.q_len + mr0)[:, None] + torch.arange(bq)[None, :]
    rs = _segment_of(gq0, gq1, row_pos)
    rs = torch.where(torch.arange(bq)[None, :] <= (mr1 - mr0)[:, None], rs, -1)
    part_ids = torch.empty(len(part), dtype=torch.long)
    part_ids[rect] = inverse
    part_ids[~rect] = len(uniq) + torch.arange(len(multi))
    if rect_tiles is None:
        multi_start, multi_end = _segment_intervals(segs, rs, mr0, mk0, mk1, lo, hi)
        # Multi-segment tiles may be empty (the band can miss every same-segment pair): drop those.
        nonempty = torch.cat([torch.ones(len(uniq), dtype=torch.bool), (multi_start <= multi_end).any(1)])
        keep_multi = nonempty[len(uniq) :]
        keep_multi = torch.nonzero(keep_multi).squeeze(1)
        parts = [(rect_start, rect_end), (_at(multi_start, keep_multi), _at(multi_end, keep_multi))]
        packed = _interval_words(parts, bk)
        return _finish(key, tile_id, part, part_ids, nonempty, batch, PackedBlockSet, packed, bk)
    col_pos = (mb * g.kv_len + mk0)[:, None] + torch.arange(bk)[None, :]
    cs = _segment_of(gk0, gk1, col_pos)
    cs = torch.where((torch.arange(bk)[None, :] <= (mk1 - mk0)[:, None]) & (cs >= 0), cs, -2)
    # d = row + shift - key, in element coordinates (the batch offsets cancel within a segment).
    a = row_pos - (mb * g.q_len)[:, None] + segs.shift[rs.clamp(min=0)]
    c = col_pos - (mb * g.kv_len)[:, None]
    multi_tiles = (rs[:, :, None] == cs[:, None, :]) & _band_pairs(
        a[:, :, None], c[:, None, :], lo, hi, dilation
    )
    tiles = torch.cat([rect_tiles, multi_tiles])
    nonempty = tiles.flatten(1).any(1)
    return _finish(key, tile_id, part, part_ids, nonempty, batch, BlockSet, tiles[nonempty])


def _sure_full_runs(segs: Segments, r0, r1, sf, sl, g: Geometry, lo, hi, dilation):
    """Per row of query blocks (rows ``[r0, r1]``, segments ``sf..sl``): key blocks ``[fa, fb]`` that are
    surely full (possibly not all full ones; none where fa > fb): the rows lie in one segment, and so do
    the block's keys, and the band covers the block (``d = row + shift - key`` in ``[lo, hi]``)."""
    bk = g.block_k
    ks, ke, sh = _at(segs.k_start, sf), _at(segs.k_end, sf), _at(segs.shift, sf)
    single = (sf == sl) & (_at(segs.q_start, sf) <= r0) & (r1 < _at(segs.q_end, sf))
    if dilation > 1:  # a dilated band rarely covers a block: every block is classified one by one
        single = torch.zeros_like(single)
    # Keys [k0, k1] of block kb: k0 = kb * bk >= max(segment start, r1 + shift - hi) ...
    fa = torch.maximum(ks, r1 + sh - hi).clamp(min=0)
    fa = torch.div(fa + bk - 1, bk, rounding_mode="floor")
    # ... and k1 = min(kb * bk + bk - 1, kv_len - 1) <= min(segment end - 1, r0 + shift - lo).
    last = torch.minimum(ke - 1, r0 + sh - lo)
    fb = torch.where(
        last >= g.kv_len - 1, g.num_k_blocks - 1, torch.div(last + 1, bk, rounding_mode="floor") - 1
    )
    return fa, torch.where(single, fb, fa - 1)


def _finish(key, tile_id, part, part_ids, nonempty, batch, kind, *tiles):
    """The set, with blocks whose tile is empty dropped and the tiles renumbered.

    Classes are exact otherwise: a block is full iff one segment covers it whole and the band covers it,
    and a block holding two segments on both sides has invisible pairs across them."""
    new_id = torch.cumsum(nonempty, 0) - 1
    tile_id.index_copy_(0, part, torch.where(_at(nonempty, part_ids), _at(new_id, part_ids), -2))
    kept = torch.nonzero(tile_id != -2).squeeze(1)
    return kind(1, _at(key, kept), _at(tile_id, kept), *tiles[:1], batch, *tiles[1:])


class PackedBlockSet(BlockSet):
    """A `BlockSet` whose tiles were made bit-packed (`BlockLayout.from_block_set` takes them as they
    are); the bool tiles are unpacked only if a composition asks for them."""

    def __init__(self, heads, key, tile_id, packed, batch, block_k):
        self.heads, self.key, self.tile_id, self.batch = heads, key, tile_id, batch
        self.packed_tiles, self._block_k, self._tiles = packed, block_k, None

    @property
    def tiles(self) -> torch.Tensor:
        if self._tiles is None:
            from ..layout import unpack_tiles

            self._tiles = unpack_tiles(self.packed_tiles, self._block_k)
        return self._tiles

    @tiles.setter
    def tiles(self, value):
        self._tiles, self.packed_tiles = value, None


def _rect_intervals(rows, lo_r, hi_r, lo_c, hi_c, ck, covered, lo, hi):
    """Each row's visible columns ``[start, end]`` (``[m, bq]``; start > end: none) of rectangle tiles: row r
    (in ``[lo_r, hi_r]``) sees the keys in ``[lo_c, hi_c]`` whose ``d = r + ck - c`` lies in ``[lo, hi]``
    (all of them where `covered`)."""
    rows = rows[..., 0]  # [1, bq]
    lo_r, hi_r, lo_c, hi_c, ck, covered = (t[..., 0] for t in (lo_r, hi_r, lo_c, hi_c, ck, covered))
    start = torch.where(covered, lo_c, torch.maximum(lo_c, rows + ck - hi))
    end = torch.where(covered, hi_c, torch.minimum(hi_c, rows + ck - lo))
    return start, torch.where((rows >= lo_r) & (rows <= hi_r), end, start - 1)


def _segment_intervals(segs: Segments, rs, r0, k0, k1, lo, hi):
    """Each row's visible columns ``[start, end]`` (``[m, bq]``; start > end: none) of blocks with rows
    ``r0 + [0, bq)`` and keys ``[k0, k1]`` (element coordinates): row r of segment ``rs[:, r]`` (-1: none)
    sees the segment's keys whose ``d = r + shift - key`` lies in ``[lo, hi]``."""
    s = rs.clamp(min=0)
    row = r0[:, None] + torch.arange(rs.shape[1])[None, :]
    first = torch.maximum(segs.k_start[s], row + segs.shift[s] - hi)
    last = torch.minimum(segs.k_end[s] - 1, row + segs.shift[s] - lo)
    start = (first - k0[:, None]).clamp(min=0)
    end = torch.minimum(last, k1[:, None]) - k0[:, None]
    return start, torch.where(rs >= 0, end, start - 1)


def _interval_words(parts, bk: int, chunk: int = 4096) -> torch.Tensor:
    """Packed tiles (int32 ``[m, bq, ceil(bk / 32)]``, the tiles of every ``(start, end)`` of `parts` in
    order) whose row r sees the columns ``[start, end]`` of ``[m_i, bq]`` (none where start > end)."""
    # Columns [a, b) are the bits of prefix(b) that prefix(a) lacks (a <= b): two row gathers and an xor.
    prefix = _prefix_words(bk)
    bq = parts[0][0].shape[1]
    starts = [p[0].flatten() for p in parts]
    ends = [p[1].flatten() for p in parts]
    words = torch.empty(sum(map(len, starts)), prefix.shape[1], dtype=torch.int32)
    # `chunk` rows at a time, written in place: every temporary stays small enough for the allocator's heap
    # (a large one is a fresh mapping whose pages fault in on every build, dearer than a few more calls).
    base = 0
    for start, end in zip(starts, ends, strict=True):
        for s in range(0, len(start), chunk):
            a = start[s : s + chunk].clamp(0, bk)
            b = (end[s : s + chunk] + 1).clamp_(max=bk)
            out = words[base + s : base + s + len(a)]
            torch.index_select(prefix, 0, a, out=out)
            out ^= prefix.index_select(0, torch.maximum(b, a, out=b))
        base += len(start)
    return words.view(-1, bq, prefix.shape[1])


@functools.cache
def _prefix_words(bk: int) -> torch.Tensor:
    """Packed rows ``[bk + 1, ceil(bk / 32)]``: row n has columns ``[0, n)`` set (read-only, shared)."""
    from ..layout import pack_tiles

    with torch.inference_mode(False):  # a normal tensor, whatever mode the first call ran in
        return pack_tiles((torch.arange(bk)[None, :] < torch.arange(bk + 1)[:, None])[None])[0]


def _band_pairs(a: torch.Tensor, c: torch.Tensor, lo: int, hi: int, dilation: int) -> torch.Tensor:
    """``lo <= a - c <= hi`` and ``(a - c) % dilation == 0``, broadcast, without forming ``a - c``."""
    visible = (c <= a - lo) & (c >= a - hi)
    return visible & (a % dilation == c % dilation) if dilation > 1 else visible


class Documents(Pattern):
    """Visible iff ``ids[..., qpos] == ids[..., j]`` (packed, contiguous documents)."""

    from_data = True

    def __init__(self, ids):
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"document ids must be an integer tensor [S] or [B, S], got dtype {ids.dtype}")
        if ids.dim() not in (1, 2) or ids.shape[-1] == 0 or (ids.dim() == 2 and ids.shape[0] == 0):
            raise ValueError(
                f"document ids must be a non-empty tensor [S] or [B, S], got shape {tuple(ids.shape)}"
            )
        if ids.dtype in (torch.uint16, torch.uint32):
            # Unsigned dtypes torch barely supports (no comparisons on the CPU): int64 holds them exactly.
            ids = ids.long()
        elif ids.dtype == torch.uint64:
            raise TypeError(
                "document ids must be an integer tensor torch can compare; got uint64 (use int64)"
            )
        if ids.is_meta:
            raise ValueError(
                "document ids must hold data (a CPU or CUDA tensor: the layout is built from them), got a "
                "tensor on the meta device"
            )
        self.ids = ids
        self.batch_size = ids.shape[0] if ids.dim() == 2 else None
        self._starts = None

    def starts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch element, position) of every document start, on the CPU (one host synchronisation, once)."""
        if self._starts is None:
            ids = self.ids if self.ids.dim() == 2 else self.ids[None]
            # The sign of each step, as int8: the one copy to the host, S bytes per element. From comparisons,
            # not a difference, which overflows in the ids' own dtype (int8 -100 -> 100, uint8 200 -> 0).
            step = (ids[:, 1:] > ids[:, :-1]).to(torch.int8) - (ids[:, 1:] < ids[:, :-1]).to(torch.int8)
            step = step.cpu()
            if bool((step < 0).any()):
                b, pos = (int(t[0]) for t in torch.nonzero(step < 0, as_tuple=True))
                raise ValueError(
                    "document ids must be non-decreasing along the sequence (packed documents are "
                    f"contiguous); batch element {b} goes down after position {pos}"
                )
            b, pos = torch.nonzero(step, as_tuple=True)
            first_b = torch.arange(ids.shape[0])
            all_b = torch.cat([first_b, b])
            all_pos = torch.cat([torch.zeros_like(first_b), pos + 1])
            order = torch.argsort(all_b * (ids.shape[1] + 1) + all_pos)
            self._starts = (all_b[order], all_pos[order])
        return self._starts

    @property
    def num_documents(self) -> torch.Tensor:
        """Documents per batch element (``[B]``, or ``[1]`` for 1-D ids)."""
        b, _ = self.starts()
        return torch.bincount(b, minlength=self.batch_size or 1)

    def segments(self, g: Geometry) -> Segments:
        b, start = self.starts()
        nxt = torch.cat([start[1:], start.new_zeros(1)])
        last = torch.cat([b[1:] != b[:-1], torch.ones(1, dtype=torch.bool)]) if len(b) else b.bool()
        end = torch.where(last, g.kv_len, nxt)
        off = g.offset
        q0, q1 = (start - off).clamp(0, g.q_len), (end - off).clamp(0, g.q_len)
        return Segments(b, q0, q1, start, end, torch.full_like(start, off)).nonempty()

    def check_lengths(self, q_len, kv_len):
        if kv_len != self.ids.shape[-1]:
            raise ValueError(f"document ids cover {self.ids.shape[-1]} positions, but kv_len={kv_len}")

    def visible(self, g, h, i, j):
        ids = self.ids.cpu()
        ids = ids[getattr(g, "batch_index", 0)] if ids.dim() == 2 else ids
        qpos = i + g.offset
        return (qpos >= 0) & (ids[qpos.clamp(min=0)] == ids[j])

    def intersection(self, other):
        if isinstance(other, _Band):
            return DocumentBand(self, other.lo, other.hi, other.dilation)
        return None

    def blocks(self, g):
        return DocumentBand(self, -UNBOUNDED, UNBOUNDED, 1).blocks(g)

    def __repr__(self):
        shape = "x".join(map(str, self.ids.shape))
        return f"documents(<ids {shape}>)"


class DocumentBand(Pattern):
    """``documents(ids) & band``: a diagonal band (causal, a window) inside every document."""

    from_data = True

    def __init__(self, docs: Documents, lo: int, hi: int, dilation: int):
        self.docs, self.lo, self.hi, self.dilation = docs, lo, hi, dilation
        self.batch_size = docs.batch_size

    def check_lengths(self, q_len, kv_len):
        self.docs.check_lengths(q_len, kv_len)

    def visible(self, g, h, i, j):
        return self.docs.visible(g, h, i, j) & _band_pairs(i + g.offset, j, self.lo, self.hi, self.dilation)

    def intersection(self, other):
        if isinstance(other, _Band):
            band = _Band.intersection(other, _as_band(self))
            return DocumentBand(self.docs, band.lo, band.hi, band.dilation)
        return None

    def blocks(self, g):
        return segment_band_blocks(self.docs.segments(g), g, self.batch_size, self.lo, self.hi, self.dilation)

    def __repr__(self):
        return f"({self.docs!r} & band({self.lo}, {self.hi}, dilation={self.dilation}))"


def _as_band(p) -> _Band:
    band = _Band()
    band.lo, band.hi, band.dilation = p.lo, p.hi, p.dilation
    return band


def documents(ids) -> Pattern:
    """Packed documents: visible iff ``ids[..., qpos] == ids[..., j]``.

    `ids` is an integer tensor ``[Skv]`` (one packing for the whole batch) or ``[B, Skv]`` (one per batch
    element: the layout is then per batch), non-decreasing along the sequence. Compose it like any pattern:
    ``documents(ids) & causal()``, ``documents(ids) & sliding_window(256, 0)``, ``... | global_tokens(4)``.
    The layout is built from the ids' device with one host synchronisation, in work proportional to blocks.
    """
    return Documents(ids)
