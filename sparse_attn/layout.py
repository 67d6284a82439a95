"""`BlockLayout`: the one data structure that crosses from patterns to kernels.

Every (query block, key block) pair of every layout sequence is exactly one of:
- empty: skipped by every pass;
- partial: a token mask applies inside it (``tiles[tile_id]``, bit-packed);
- full: every real query-key pair in it is visible; no mask work.

Layout sequences. A layout has ``L = (batch or 1) * num_heads`` layout sequences, sequence
``l = b * num_heads + h`` for batch element b and head h:
- ``num_heads`` is 1 when every head has the same layout (it then applies to all query heads) or the number
  of query heads;
- ``batch`` is None for a layout shared by the whole batch (every layout built from lengths alone), or the
  number of batch elements for a layout built from data (`documents`, varlen, content-selected blocks),
  one layout per element. ``to_block_mask()`` / ``to_dense()`` then have a leading ``[B]`` dimension.
A kernel program of batch element b and query head h walks sequence
``(b if batch else 0) * num_heads + (h if num_heads > 1 else 0)``.

Storage (all int32, on `device`):
- ``row_full_ptr``/``row_part_ptr`` ``[L, nqb + 1]`` index ``row_full_idx`` (key blocks) and
  ``row_part_idx``/``row_part_tile`` (key blocks and their tile ids): the forward and dQ passes walk
  query-block rows. Offsets are global (sequence l's rows continue where sequence l-1's stop); key blocks
  ascend within a row.
- ``col_full_ptr``/``col_part_ptr`` ``[L, nkb + 1]`` index ``col_full_idx``/``col_part_idx`` (query blocks)
  and ``col_part_tile``: the dK/dV pass walks key-block columns. Query blocks ascend.
- ``tiles`` ``[n_tiles, block_q, ceil(block_k / 32)]``: bit ``c % 32`` of word ``c // 32`` of row ``r`` says
  whether row ``r`` may see column ``c`` of the tile. Bits outside the real sequence are 0. Distinct partial
  tiles are stored once and shared by every block (of every sequence) that has them.

Kernels read entries ``[ptr[l, r], ptr[l, r + 1])`` only, so the index arrays may be longer than the last
offset (unused trailing entries): a layout selected on the device with fixed-size outputs (k blocks per
row, fewer where fewer qualify) is valid as ``ptr = cumsum(counts)`` over padded ``[L * n * k]`` entry
arrays, with no host synchronisation. `num_full` / `num_partial` count the entries in use.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from .geometry import FULL, BlockSet, Geometry
from .layout_cache import build_for_every_mode

_INDEX_FIELDS = (
    "row_full_ptr",
    "row_full_idx",
    "row_part_ptr",
    "row_part_idx",
    "row_part_tile",
    "col_full_ptr",
    "col_full_idx",
    "col_part_ptr",
    "col_part_idx",
    "col_part_tile",
    "tiles",
)
_CLASS_CHARS = {0: "·", 1: "▒", 2: "█"}
_DERIVED = WeakIdKeyDictionary()  # a layout's row_full_ptr -> what derives from the layout


def pack_tiles(tiles: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """bool ``[m, bq, bk]`` -> int32 ``[m, bq, ceil(bk / 32)]``, bit c % 32 of word c // 32.

    Packs bytes (8 columns each, uint8: a quarter of int32 bit planes) and reads every 4 as one
    little-endian int32 word; works `chunk` tiles at a time."""
    m, bq, bk = tiles.shape
    words = -(-bk // 32)
    shifts = torch.arange(8, dtype=torch.uint8)
    out = torch.empty(m, bq, words * 4, dtype=torch.uint8)
    for s in range(0, m, chunk):
        part = tiles[s : s + chunk]
        if bk != words * 32:
            part = torch.nn.functional.pad(part, (0, words * 32 - bk))
        bits = part.reshape(len(part), bq, words * 4, 8).view(torch.uint8)
        # Distinct powers of two sum to their OR, and at most 255: no overflow in uint8.
        out[s : s + chunk] = (bits << shifts).sum(-1, dtype=torch.uint8)
    if sys.byteorder != "little":
        out = out.view(m, bq, words, 4).flip(-1).contiguous().view(m, bq, words * 4)
    return out.view(torch.int32).view(m, bq, words)


def unpack_tiles(packed: torch.Tensor, block_k: int, chunk: int = 4096) -> torch.Tensor:
    """Inverse of `pack_tiles`. Works `chunk` tiles at a time so the int32 bit planes stay small."""
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
    out = torch.empty(*packed.shape[:-1], block_k, dtype=torch.bool, device=packed.device)
    for s in range(0, len(packed), chunk):
        # Arithmetic shift of an int32 then & 1 reads bit c exactly, also for negative words.
        bits = (packed[s : s + chunk, ..., None] >> shifts) & 1
        out[s : s + chunk] = bits.flatten(-2)[..., :block_k]
    return out


def _csr(group: torch.Tensor, n_groups: int, order_key: torch.Tensor):
    """Sort entries by (group, order_key) (distinct pairs of non-negative ints); return the permutation and
    int32 offsets ``[n_groups + 1]``."""
    perm = _sort_pairs(group, order_key)
    counts = torch.bincount(group, minlength=n_groups)
    ptr = torch.zeros(n_groups + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(counts, 0)
    return perm, ptr.to(torch.int32)


def _sort_pairs(major: torch.Tensor, minor: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts distinct pairs (major, minor) of non-negative ints (any order of ties
    would do: there are none, so the result is the one `torch.argsort` of the combined key gives)."""
    if len(major) == 0:
        return torch.zeros(0, dtype=torch.long, device=major.device)
    key = major * (int(minor.max()) + 1) + minor
    if major.device.type == "cpu":
        if bool((key[1:] > key[:-1]).all()):  # already sorted: a row walk of a BlockSet's sorted keys
            return torch.arange(len(key))
        if max(int(major.max()), int(minor.max())) < 1 << 16:
            # numpy sorts 16-bit ints stably by radix (linear time; ~10x torch's int64 argsort at 10^4
            # entries): by the minor key, then stably by the major one.
            by_minor = np.argsort(minor.numpy().astype(np.uint16), kind="stable")
            by_major = np.argsort(major.numpy()[by_minor].astype(np.uint16), kind="stable")
            return torch.from_numpy(by_minor[by_major])
    return torch.argsort(key)


class BlockEntries(NamedTuple):
    """Kept blocks one by one (int64 tensors of one length): see `BlockLayout.entries`."""

    head: torch.Tensor
    q_block: torch.Tensor
    k_block: torch.Tensor
    slot: torch.Tensor  # position in its row (or column) list
    tile: torch.Tensor | None  # tile ids of partial blocks; None for full ones


class BlockLayout:
    """Exact block classification of a pattern for one (q_len, kv_len, block size, heads[, batch])."""

    def __init__(self, geometry: Geometry, num_heads: int, batch: int | None = None, **fields: torch.Tensor):
        self.geometry = geometry
        self.num_heads = num_heads
        #: None: one layout shared by the batch; else one layout per batch element.
        self.batch = batch
        for name in _INDEX_FIELDS:
            setattr(self, name, fields[name])

    @property
    def num_sequences(self) -> int:
        """Layout sequences L = (batch or 1) * num_heads (see the module docstring)."""
        return (self.batch or 1) * self.num_heads

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_block_set(cls, s: BlockSet, g: Geometry) -> BlockLayout:
        h, qb, kb = s.split_key(g)
        n_seq = (s.batch or 1) * s.heads
        is_full = s.tile_id == FULL
        packed = getattr(s, "packed_tiles", None)  # builders that make their tiles packed (documents)
        fields = {"tiles": pack_tiles(s.tiles) if packed is None else packed}
        for kind, sel in (("full", is_full), ("part", ~is_full)):
            # index_select, not advanced indexing: a fraction of the per-call cost.
            sel = torch.nonzero(sel).squeeze(1)
            hh, qq, kk, tt = (t.index_select(0, sel) for t in (h, qb, kb, s.tile_id))
            perm, fields[f"row_{kind}_ptr"] = _csr(hh * g.num_q_blocks + qq, n_seq * g.num_q_blocks, kk)
            fields[f"row_{kind}_idx"] = kk.index_select(0, perm).to(torch.int32)
            if kind == "part":
                fields["row_part_tile"] = tt.index_select(0, perm).to(torch.int32)
            perm, fields[f"col_{kind}_ptr"] = _csr(hh * g.num_k_blocks + kk, n_seq * g.num_k_blocks, qq)
            fields[f"col_{kind}_idx"] = qq.index_select(0, perm).to(torch.int32)
            if kind == "part":
                fields["col_part_tile"] = tt.index_select(0, perm).to(torch.int32)
        for side, n in (("row", g.num_q_blocks), ("col", g.num_k_blocks)):
            for kind in ("full", "part"):
                # Per-sequence rows of n + 1 offsets; sequence l's last offset is sequence l + 1's first.
                starts = torch.arange(n_seq)[:, None] * n + torch.arange(n + 1)[None, :]
                fields[f"{side}_{kind}_ptr"] = fields[f"{side}_{kind}_ptr"][starts]
        return cls(g, s.heads, s.batch, **fields)

    def flatten(self) -> tuple[list[torch.Tensor], list[int]]:
        """Tensors and ints that `unflatten` turns back into this layout (custom ops take no objects)."""
        g = self.geometry
        ints = [g.q_len, g.kv_len, g.block_q, g.block_k, self.num_heads, self.batch or 0]
        return [getattr(self, name) for name in _INDEX_FIELDS], ints

    @classmethod
    def unflatten(cls, tensors: list[torch.Tensor], ints: list[int]) -> BlockLayout:
        q_len, kv_len, block_q, block_k, heads, batch = ints
        return cls(
            Geometry(q_len, kv_len, block_q, block_k),
            heads,
            batch or None,
            **dict(zip(_INDEX_FIELDS, tensors, strict=True)),
        )

    @classmethod
    def stack(cls, layouts: list[BlockLayout]) -> BlockLayout:
        """One per-batch layout from unbatched layouts of the same geometry and heads, element b = layouts[b]."""
        if not layouts:
            raise ValueError("stack needs at least one layout")
        first = layouts[0]
        for other in layouts:
            if not isinstance(other, BlockLayout) or other.batch is not None:
                raise TypeError("stack takes unbatched BlockLayouts")
            if (other.geometry, other.num_heads) != (first.geometry, first.num_heads):
                raise ValueError("stack needs layouts of one geometry (lengths, block size) and head count")
        parts = [layout.to("cpu") for layout in layouts]
        tile_base = [0]
        for layout in parts:
            tile_base.append(tile_base[-1] + layout.tiles.shape[0])
        fields = {"tiles": torch.cat([layout.tiles for layout in parts])}
        for name in ("row_full", "row_part", "col_full", "col_part"):
            ptrs, idxs, tiles, base = [], [], [], 0
            for layout, tile0 in zip(parts, tile_base, strict=False):
                ptr = getattr(layout, f"{name}_ptr").long()
                used = int(ptr[-1, -1])
                ptrs.append(ptr + base)
                idxs.append(getattr(layout, f"{name}_idx")[:used])
                if name.endswith("part"):
                    tiles.append(getattr(layout, f"{name}_tile")[:used] + tile0)
                base += used
            fields[f"{name}_ptr"] = torch.cat(ptrs).to(torch.int32)
            fields[f"{name}_idx"] = torch.cat(idxs).to(torch.int32)
            if tiles:
                fields[f"{name}_tile"] = torch.cat(tiles).to(torch.int32)
        out = cls(first.geometry, first.num_heads, len(layouts), **fields)
        return out.to(first.device)

    def batch_element(self, b: int) -> BlockLayout:
        """The unbatched layout of batch element `b` (self for a layout shared by the batch)."""
        if self.batch is None:
            return self
        if not 0 <= b < self.batch:
            raise ValueError(f"batch element must be in [0, {self.batch}), got {b}")
        seqs = slice(b * self.num_heads, (b + 1) * self.num_heads)
        fields = {"tiles": self.tiles}
        for name in ("row_full", "row_part", "col_full", "col_part"):
            ptr = getattr(self, f"{name}_ptr")[seqs]
            lo, hi = int(ptr[0, 0]), int(ptr[-1, -1])
            fields[f"{name}_ptr"] = ptr - lo
            fields[f"{name}_idx"] = getattr(self, f"{name}_idx")[lo:hi]
            if name.endswith("part"):
                fields[f"{name}_tile"] = getattr(self, f"{name}_tile")[lo:hi]
        return BlockLayout(self.geometry, self.num_heads, None, **fields)

    # -- geometry -------------------------------------------------------------------------------------
    q_len = property(lambda self: self.geometry.q_len)
    kv_len = property(lambda self: self.geometry.kv_len)
    block_q = property(lambda self: self.geometry.block_q)
    block_k = property(lambda self: self.geometry.block_k)
    num_q_blocks = property(lambda self: self.geometry.num_q_blocks)
    num_k_blocks = property(lambda self: self.geometry.num_k_blocks)

    @property
    def block_size(self) -> tuple[int, int]:
        return self.block_q, self.block_k

    @property
    def device(self) -> torch.device:
        return self.row_full_idx.device

    @property
    def num_full(self) -> int:
        return int(self.row_full_ptr[-1, -1])

    @property
    def num_partial(self) -> int:
        return int(self.row_part_ptr[-1, -1])

    # -- views ----------------------------------------------------------------------------------------
    def cached(self, key, compute):
        """``compute()``, computed once per layout: layouts are immutable, so what derives from them keeps.

        Shared by every layout over the same index tensors: the custom ops pass a layout as its tensors and
        rebuild it on the other side."""
        derived = _DERIVED.setdefault(self.row_full_ptr, {})
        if key not in derived:
            derived[key] = build_for_every_mode(compute)
        return derived[key]

    def tile_masks(self) -> torch.Tensor:
        """Unpacked partial tiles, bool ``[n_tiles, block_q, block_k]`` (cached per layout)."""
        return self.cached("tile_masks", lambda: unpack_tiles(self.tiles, self.block_k))

    def entries(self, kind: str, order: str = "row", device=None) -> BlockEntries:
        """Every full (``kind="full"``) or partial (``"part"``) block as int64 `BlockEntries`, in the order of
        the row lists (``order="row"``, what the forward and dQ passes walk) or of the column lists
        (``"col"``, the dK/dV pass), on `device` (default: the CPU). `slot` is an entry's position in its
        row (column); `tile` its tile id (partial blocks only); `head` the layout sequence
        (``b * num_heads + h`` for a per-batch layout)."""
        if kind not in ("full", "part") or order not in ("row", "col"):
            raise ValueError(
                f"kind must be 'full' or 'part' and order 'row' or 'col', got {kind!r}, {order!r}"
            )
        device = torch.device("cpu") if device is None else torch.device(device)
        ptr = getattr(self, f"{order}_{kind}_ptr").to(device).long()  # [L, n + 1], global offsets
        # Index arrays may hold unused entries past the last offset (see the module docstring).
        lo, hi = int(ptr[0, 0]), int(ptr[-1, -1])
        idx = getattr(self, f"{order}_{kind}_idx")[lo:hi].to(device).long()
        per_line = (ptr[:, 1:] - ptr[:, :-1]).reshape(-1)
        line = torch.repeat_interleave(torch.arange(len(per_line), device=device), per_line)
        slot = torch.arange(lo, hi, device=device) - ptr[:, :-1].reshape(-1)[line]
        n_lines = ptr.shape[1] - 1
        head, pos = line // n_lines, line % n_lines
        tile = getattr(self, f"{order}_part_tile")[lo:hi].to(device).long() if kind == "part" else None
        q_block, k_block = (pos, idx) if order == "row" else (idx, pos)
        return BlockEntries(head, q_block, k_block, slot, tile)

    def _with_batch_dim(self, t: torch.Tensor) -> torch.Tensor:
        """``[L, ...]`` -> ``[B, H, ...]`` for a per-batch layout, unchanged (``[H, ...]``) otherwise."""
        return t if self.batch is None else t.view(self.batch, self.num_heads, *t.shape[1:])

    def to_block_mask(self) -> torch.Tensor:
        """int8 ``[H, nqb, nkb]`` (``[B, H, nqb, nkb]`` per batch): 0 empty, 1 partial, 2 full."""
        out = torch.zeros(self.num_sequences, self.num_q_blocks, self.num_k_blocks, dtype=torch.int8)
        for kind, value in (("part", 1), ("full", 2)):
            e = self.entries(kind)
            out[e.head, e.q_block, e.k_block] = value
        return self._with_batch_dim(out).to(self.device)

    def to_dense(self) -> torch.Tensor:
        """Token mask bool ``[H, q_len, kv_len]`` (``[B, H, ...]`` per batch). O(S^2): small sizes only."""
        bq, bk, n_seq = self.block_q, self.block_k, self.num_sequences
        grid = torch.zeros(n_seq, self.num_q_blocks * bq, self.num_k_blocks * bk, dtype=torch.bool)
        view = grid.view(n_seq, self.num_q_blocks, bq, self.num_k_blocks, bk)
        full, part = self.entries("full"), self.entries("part")
        view[full.head, full.q_block, :, full.k_block, :] = True
        view[part.head, part.q_block, :, part.k_block, :] = self.tile_masks().cpu()[part.tile]
        return self._with_batch_dim(grid[:, : self.q_len, : self.kv_len]).to(self.device)

    def density(self) -> float:
        """Fraction of query-key pairs the kernels compute (real pairs in kept blocks)."""
        g = self.geometry
        total = 0
        for kind in ("full", "part"):
            e = self.entries(kind)
            total += int((g.valid_rows(e.q_block) * g.valid_cols(e.k_block)).sum())
        return total / (self.num_sequences * self.q_len * self.kv_len)

    def to(self, device) -> BlockLayout:
        """The same layout with its tensors on `device` (self if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self

        def move():
            moved = {name: getattr(self, name).to(device) for name in _INDEX_FIELDS}
            return BlockLayout(self.geometry, self.num_heads, self.batch, **moved)

        # Kept, so that passing a CPU layout with GPU tensors uploads it once, not on every call.
        return self.cached(("to", str(device)), move)

    def __repr__(self) -> str:
        n_blocks = self.num_sequences * self.num_q_blocks * self.num_k_blocks
        batch = "" if self.batch is None else f"batch={self.batch}, "
        head = (
            f"BlockLayout(q_len={self.q_len}, kv_len={self.kv_len}, block_size={self.block_size}, "
            f"{batch}heads={self.num_heads}, grid={self.num_q_blocks}x{self.num_k_blocks}, full={self.num_full}, "
            f"partial={self.num_partial}, empty={n_blocks - self.num_full - self.num_partial}, "
            f"tiles={self.tiles.shape[0]}, density={self.density():.4f}, device={self.device})"
        )
        return head + "\n" + self._picture()

    def _picture(self, max_rows: int = 24, max_cols: int = 64) -> str:
        """The block grid of the first head, one character per (downsampled) block: █ full, ▒ partial, · empty.

        A character is full if all its blocks are, empty if all are, else partial; counted from the kept
        blocks of head 0, never from the whole ``[H, nqb, nkb]`` grid (GBs for long per-head layouts)."""
        nqb, nkb = self.num_q_blocks, self.num_k_blocks
        step_r, step_c = -(-nqb // max_rows), -(-nkb // max_cols)
        rows, cols = -(-nqb // step_r), -(-nkb // step_c)
        kept = {}
        for kind in ("full", "part"):
            e = self.entries(kind)
            cell = (e.q_block[e.head == 0] // step_r) * cols + e.k_block[e.head == 0] // step_c
            kept[kind] = torch.bincount(cell, minlength=rows * cols).view(rows, cols)
        blocks_r = (nqb - torch.arange(rows) * step_r).clamp(max=step_r)
        blocks_c = (nkb - torch.arange(cols) * step_c).clamp(max=step_c)
        grid = torch.where(kept["full"] == blocks_r[:, None] * blocks_c[None, :], 2, 1)
        grid = torch.where(kept["full"] + kept["part"] == 0, 0, grid)
        lines = ["".join(_CLASS_CHARS[c] for c in row) for row in grid.tolist()]
        scale = f" (each character {step_r}x{step_c} blocks)" if step_r * step_c > 1 else ""
        first = "head 0" if self.batch is None else "batch element 0, head 0"
        return f"{first}{scale}:\n" + "\n".join(lines)
