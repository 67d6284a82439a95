"""`FlexBlocks`: a FlexAttention `BlockMask` seen as a pattern (what `sparse_attn.interop.from_flex` reads)."""

from __future__ import annotations

import torch

from ..geometry import BlockSet
from ._blockset import from_candidates
from .base import Pattern


class FlexBlocks(Pattern):
    """A BlockMask seen as a pattern: its block lists, and its mask_mod inside partial blocks."""

    def __init__(self, block_mask):
        if block_mask.kv_num_blocks.shape[0] != 1:
            raise ValueError(
                f"from_flex reads batch-1 block masks, got batch {block_mask.kv_num_blocks.shape[0]}"
            )
        self.block_mask = block_mask
        heads = block_mask.kv_num_blocks.shape[1]
        self.num_heads = None if heads == 1 else heads

    def visible(self, g, h, i, j):
        from torch.nn.attention.flex_attention import noop_mask

        mask_mod = self.block_mask.mask_mod or noop_mask
        h, i, j = torch.broadcast_tensors(h, i, j)
        # Clamped: tokens past the sequence are masked by the caller; a mask_mod may index by position.
        flat = [t.reshape(-1) for t in (h, i.clamp(max=g.q_len - 1), j.clamp(max=g.kv_len - 1))]
        zero = torch.zeros((), dtype=torch.int64)
        visible = torch.vmap(lambda hh, ii, jj: mask_mod(zero, hh, ii, jj))(*flat)
        return visible.reshape(h.shape).bool()

    def blocks(self, g):
        bm = self.block_mask
        if tuple(bm.BLOCK_SIZE) != (g.block_q, g.block_k):
            raise ValueError(
                f"block size {(g.block_q, g.block_k)} differs from the BlockMask's {tuple(bm.BLOCK_SIZE)}"
            )
        heads = bm.kv_num_blocks.shape[1]
        parts = []
        for num, idx, full in (
            (bm.kv_num_blocks, bm.kv_indices, False),
            (bm.full_kv_num_blocks, bm.full_kv_indices, True),
        ):
            if num is None:
                continue
            num, idx = num[0].cpu().long(), idx[0].cpu().long()  # [H, nqb], [H, nqb, nkb_stored]
            nqb = min(num.shape[1], g.num_q_blocks)
            used = torch.arange(idx.shape[-1])[None, None, :] < num[:, :nqb, None]
            h, qb, slot = torch.nonzero(used, as_tuple=True)
            kb = idx[h, qb, slot]
            keep = kb < g.num_k_blocks
            parts.append((h[keep], qb[keep], kb[keep], torch.full((int(keep.sum()),), full)))
        h, qb, kb, is_full = (torch.cat(t) for t in zip(*parts, strict=True))
        key = (h * g.num_q_blocks + qb) * g.num_k_blocks + kb
        return _shared_tiles(from_candidates(self, g, heads, h, qb, kb, is_full, key))


def _shared_tiles(s: BlockSet) -> BlockSet:
    """`s` with equal tiles stored once. A BlockMask says nothing about which partial blocks share a
    mask, so each got its own tile; a window's diagonal blocks, for example, all share one."""
    if s.tiles.shape[0] < 2:
        return s
    tiles, inverse = torch.unique(s.tiles.flatten(1), dim=0, return_inverse=True)
    tile_id = torch.where(s.tile_id >= 0, inverse[s.tile_id.clamp(min=0)], s.tile_id)
    return BlockSet(s.heads, s.key, tile_id, tiles.view(-1, *s.tiles.shape[1:]))
