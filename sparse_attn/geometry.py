"""The geometry of a block layout and the exact set of blocks a pattern keeps: the vocabulary shared by
`sparse_attn.patterns` (which build `BlockSet`s) and `sparse_attn.layout` (which compresses one into a
`BlockLayout`). It imports neither.

A `BlockSet` holds the sorted linear keys ``(head * nqb + qb) * nkb + kb`` of the kept (head, query block,
key block) triples, each with a tile id: `FULL` for a full block, otherwise an index into `tiles`, the token
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


@dataclass
class BlockSet:
    """Kept blocks of one pattern node, sorted by key ``(head * nqb + qb) * nkb + kb``."""

    heads: int  # 1 means the same blocks for every head
    key: torch.Tensor  # int64 [n], sorted, unique
    tile_id: torch.Tensor  # int64 [n], FULL or an index into tiles
    tiles: torch.Tensor  # bool [m, bq, bk], False outside the valid region

    def split_key(self, g: Geometry):
        """(head, query block, key block) of every kept block."""
        nqb, nkb = g.num_q_blocks, g.num_k_blocks
        return self.key // (nqb * nkb), (self.key // nkb) % nqb, self.key % nkb

    def with_heads(self, heads: int, g: Geometry) -> BlockSet:
        """The same blocks repeated for `heads` heads (only from a shared set)."""
        if self.heads == heads:
            return self
        per_head = g.num_q_blocks * g.num_k_blocks
        offsets = torch.arange(heads, dtype=torch.int64)[:, None] * per_head
        return BlockSet(
            heads,
            (offsets + self.key[None, :]).reshape(-1),
            self.tile_id.repeat(heads),
            self.tiles,
        )
