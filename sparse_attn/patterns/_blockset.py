"""Exact sets of kept blocks, built and combined without an S x S mask.

A pattern node turns into a `BlockSet`: the sorted linear keys of the (head, query block, key block) triples
it keeps, each with a tile id (-1 for a full block, otherwise an index into `tiles`, the token masks of the
node's partial blocks). Tiles are deduplicated: primitives give each partial block a key such that equal
keys imply equal token masks (a sliding window has a handful of distinct tiles however long the sequence),
so the token-level work is proportional to the distinct partial tiles, not to the sequence length.

Union and intersection combine two sets block by block; only where both sides are partial are tiles
combined token by token, and the result is re-classified, so every block ends up exactly empty (dropped),
partial or full.
"""

from __future__ import annotations

import torch

from ..geometry import FULL, BlockSet, Geometry


def empty_tiles(g: Geometry) -> torch.Tensor:
    return torch.zeros(0, g.block_q, g.block_k, dtype=torch.bool)


def from_candidates(pattern, g: Geometry, heads, h, qb, kb, full, tile_key) -> BlockSet:
    """Build a node's set from analytically enumerated candidate blocks.

    `full` must only be True for blocks whose valid region is entirely visible. Other candidates are
    treated as partial: their tiles are evaluated once per distinct `tile_key` with the pattern's token
    predicate, and re-classified, so a candidate that turns out full or empty is labelled exactly.
    """
    nqb, nkb = g.num_q_blocks, g.num_k_blocks
    key = (h * nqb + qb) * nkb + kb
    order = torch.argsort(key)
    key, h, qb, kb, full, tile_key = (t[order] for t in (key, h, qb, kb, full, tile_key))
    tile_id = torch.full_like(key, FULL)
    partial = torch.nonzero(~full).squeeze(1)
    if partial.numel() == 0:
        return BlockSet(heads, key, tile_id, empty_tiles(g))
    # Tiles at the ragged end of either axis differ from interior ones with the same key.
    ragged_q, ragged_k = g.q_len % g.block_q != 0, g.kv_len % g.block_k != 0
    edge = ((qb[partial] == nqb - 1) & ragged_q).long() * 2 + ((kb[partial] == nkb - 1) & ragged_k).long()
    unique_keys, inverse = torch.unique(tile_key[partial] * 4 + edge, return_inverse=True)
    first = torch.full((len(unique_keys),), len(partial), dtype=torch.int64)
    first.scatter_reduce_(0, inverse, torch.arange(len(partial)), reduce="amin")
    rep = partial[first]
    rows, cols, valid = g.tile_coords(qb[rep], kb[rep])
    tiles = pattern.visible(g, h[rep][:, None, None], rows, cols) & valid
    tile_id[partial] = inverse
    return _reclassify(BlockSet(heads, key, tile_id, tiles), g, qb[rep], kb[rep])


def _reclassify(s: BlockSet, g: Geometry, tile_qb, tile_kb) -> BlockSet:
    """Mark blocks whose tile is entirely visible as full, drop empty ones, and compact the tiles."""
    if s.tiles.shape[0] == 0:
        return s
    _, _, valid = g.tile_coords(tile_qb, tile_kb)
    # Tiles are False outside their valid region: full iff True wherever valid. (any/all, not bool sums,
    # which widen every element to int64: seconds for many tiles.)
    is_full = (s.tiles | ~valid).flatten(1).all(1)
    is_empty = ~s.tiles.flatten(1).any(1)
    keep_tile = ~(is_full | is_empty)
    new_id = torch.full((len(keep_tile),), FULL, dtype=torch.int64)
    new_id[keep_tile] = torch.arange(int(keep_tile.sum()))
    has_tile = s.tile_id >= 0
    tid = s.tile_id.clamp(min=0)
    drop = has_tile & is_empty[tid]
    tile_id = torch.where(has_tile, new_id[tid], s.tile_id)
    keep = ~drop
    return BlockSet(s.heads, s.key[keep], tile_id[keep], s.tiles[keep_tile], s.batch)


def common_batch(a: int | None, b: int | None) -> int | None:
    """The batch of a combination of sets (or patterns) with batches `a` and `b` (None: shared)."""
    if a is not None and b is not None and a != b and 1 not in (a, b):
        raise ValueError(f"cannot combine patterns built for {a} and {b} batch elements")
    if a is None or b is None:
        return a if b is None else b
    return max(a, b)


def _broadcast_heads(a: BlockSet, b: BlockSet, g: Geometry):
    if a.heads != b.heads and 1 not in (a.heads, b.heads):
        raise ValueError(f"cannot combine patterns with {a.heads} and {b.heads} heads")
    heads = max(a.heads, b.heads)
    batch = common_batch(a.batch, b.batch)
    return a.expand(batch, heads, g), b.expand(batch, heads, g), heads


def combine(a: BlockSet, b: BlockSet, g: Geometry, op: str) -> BlockSet:
    """Union (``op="or"``) or intersection (``op="and"``) of two sets, exactly classified."""
    a, b, heads = _broadcast_heads(a, b, g)
    keys, inverse = torch.unique(torch.cat([a.key, b.key]), return_inverse=True)
    n = len(keys)
    ia = torch.full((n,), -1, dtype=torch.int64)
    ib = torch.full((n,), -1, dtype=torch.int64)
    ia[inverse[: len(a.key)]] = torch.arange(len(a.key))
    ib[inverse[len(a.key) :]] = torch.arange(len(b.key))
    in_a, in_b = ia >= 0, ib >= 0
    # Tile ids in a shared table: a's tiles first, then b's; ABSENT where a side does not keep the block.
    ta, tb = _lookup(a.tile_id, ia), _lookup(b.tile_id, ib)
    tb = torch.where(tb >= 0, tb + a.tiles.shape[0], tb)
    tiles = torch.cat([a.tiles, b.tiles])
    if op == "or":
        keep = in_a | in_b
        full = (ta == FULL) | (tb == FULL)
        # Blocks kept by one side only, or full on a side, need no token work.
        tile_id = torch.where(full, FULL, torch.where(in_a, ta, tb))
    else:
        keep = in_a & in_b
        full = (ta == FULL) & (tb == FULL)
        tile_id = torch.where(full, FULL, torch.where(ta == FULL, tb, ta))
    both_partial = keep & (ta >= 0) & (tb >= 0)
    keys, tile_id, ta, tb, both_partial = (t[keep] for t in (keys, tile_id, ta, tb, both_partial))
    result = BlockSet(heads, keys, tile_id, tiles, a.batch)
    return _merge_partial_pairs(result, g, ta, tb, both_partial, op)


ABSENT = -2


def _lookup(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]``, ABSENT where index is -1 (works when `values` is empty)."""
    padded = torch.cat([values, torch.tensor([ABSENT])])
    return padded[torch.where(index >= 0, index, len(values))]


def _merge_partial_pairs(s: BlockSet, g: Geometry, ta, tb, both, op) -> BlockSet:
    """Give blocks that are partial on both sides the OR/AND of the two tiles, then re-classify."""
    idx = torch.nonzero(both).squeeze(1)
    m = s.tiles.shape[0]
    if len(idx):
        pairs, inverse = torch.unique(ta[idx] * m + tb[idx], return_inverse=True)
        left, right = s.tiles[pairs // m], s.tiles[pairs % m]
        merged = (left | right) if op == "or" else (left & right)
        s.tile_id[idx] = inverse + m
        s.tiles = torch.cat([s.tiles, merged])
    # Compact: keep only referenced tiles, then re-classify them against their block's valid region.
    used, new_id = torch.unique(s.tile_id[s.tile_id >= 0], return_inverse=True)
    rep_pos = torch.full((len(used),), len(s.key), dtype=torch.int64)
    has = torch.nonzero(s.tile_id >= 0).squeeze(1)
    rep_pos.scatter_reduce_(0, new_id, has, reduce="amin")
    s.tile_id[has] = new_id
    s.tiles = s.tiles[used]
    _, qb, kb = s.split_key(g)
    return _reclassify(s, g, qb[rep_pos], kb[rep_pos])
