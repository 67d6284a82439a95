"""The geometry of a block layout and the exact set of blocks a pattern keeps: the vocabulary shared by
`sparse_attn.patterns` (which build `BlockSet`s) and `sparse_attn.layout` (which compresses one into a
`BlockLayout`). It imports neither.

A `BlockSet` holds the sorted linear keys ``(seq * nqb + qb) * nkb + kb`` of the kept (layout sequence,
query block, key block) triples (sequence ``b * heads + h``; see `sparse_attn.layout`), each with a tile id: `FULL` for a full block, otherwise an index into `tiles`, the token
masks of the partial blocks (deduplicated: equal tiles are stored once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL = -1


@dataclass(frozen=True)
class Geometry:
    """Lengths and block sizes one layout is built for; queries are aligned bottom-right."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int

    @property
    def offset(self) -> int:
        """Absolute position of query row 0 (``qpos = i + offset``)."""
        return self.kv_len - self.q_len

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.kv_len // self.block_k)

    def valid_rows(self, qb: torch.Tensor) -> torch.Tensor:
        """Number of real query rows in each query block."""
        return (self.q_len - qb * self.block_q).clamp(max=self.block_q)

    def valid_cols(self, kb: torch.Tensor) -> torch.Tensor:
        """Number of real keys in each key block."""
        return (self.kv_len - kb * self.block_k).clamp(max=self.block_k)

    def tile_coords(self, qb: torch.Tensor, kb: torch.Tensor):
        """Row indices [m, bq, 1], key indices [m, 1, bk] and validity [m, bq, bk] of whole tiles."""
        rows = qb[:, None, None] * self.block_q + torch.arange(self.block_q)[None, :, None]
        cols = kb[:, None, None] * self.block_k + torch.arange(self.block_k)[None, None, :]
        return rows, cols, (rows < self.q_len) & (cols < self.kv_len)


@dataclass(frozen=True)
class ElementGeometry(Geometry):
    """A `Geometry` that also names one batch element (token masks of per-batch, data-dependent patterns)."""

    batch_index: int = 0


@dataclass
class BlockSet:
    """Kept blocks of one pattern node, sorted by key ``(seq * nqb + qb) * nkb + kb``, where the layout
    sequence is ``seq = b * heads + h`` (b = 0 when the set is shared by the batch)."""

    heads: int  # 1 means the same blocks for every head
    key: torch.Tensor  # int64 [n], sorted, unique
    tile_id: torch.Tensor  # int64 [n], FULL or an index into tiles
    tiles: torch.Tensor  # bool [m, bq, bk], False outside the valid region
    batch: int | None = None  # None: shared by every batch element; else one set per element

    def split_key(self, g: Geometry):
        """(layout sequence, query block, key block) of every kept block."""
        nqb, nkb = g.num_q_blocks, g.num_k_blocks
        # Integer division is the slow op here: one per level, remainders by multiply-subtract.
        row = self.key // nkb
        kb = self.key - row * nkb
        seq = row // nqb
        return seq, row - seq * nqb, kb

    def with_heads(self, heads: int, g: Geometry) -> BlockSet:
        """The same blocks repeated for `heads` heads (only from a shared set)."""
        return self.expand(self.batch, heads, g)

    def expand(self, batch: int | None, heads: int, g: Geometry) -> BlockSet:
        """The same blocks for `batch` elements and `heads` heads (from a set shared by either or both)."""
        if (self.batch, self.heads) == (batch, heads):
            return self
        per_seq = g.num_q_blocks * g.num_k_blocks
        seq = self.key // per_seq
        counts = torch.bincount(seq, minlength=(self.batch or 1) * self.heads)
        starts = torch.cumsum(counts, 0) - counts
        zero = torch.zeros(1, 1, dtype=torch.long)
        b = torch.arange(batch or 1)[:, None] if (self.batch or 1) > 1 else zero
        h = torch.arange(heads)[None, :] if self.heads > 1 else zero
        source = (b * self.heads + h).expand(batch or 1, heads).reshape(-1)  # per target sequence
        n = counts[source]
        target = torch.repeat_interleave(torch.arange(len(source)), n)
        within = torch.arange(len(target)) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        entry = starts[source][target] + within
        key = target * per_seq + self.key[entry] % per_seq
        return BlockSet(heads, key, self.tile_id[entry], self.tiles, batch)
