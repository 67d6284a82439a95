"""Content selection on the device: `select_layout(pattern, q, k)` for patterns holding `topk_blocks`.

Two halves.

Host, from lengths alone (built once per pattern, lengths, block size and heads; trace-time constants under
`torch.compile`). Patterns are monotone in their parts, so the class of a block under any selection is the
class it has in the *static* pattern obtained by replacing each selecting node by every pair (the block is
selected) or by nothing (it is not). With n selecting nodes (at most `MAX_SELECTING_NODES`) that is 2^n
static layouts, kept as dense block grids: the class (empty / partial / full) and tile id of every block for
every combination of selection bits. Each node also gets its candidate grid: the blocks of the static
patterns it is ANDed with. This is where the other side's token masks (a causal diagonal, a window's edge,
their union) are merged, exactly, by the existing static machinery.

Device, from the data (no host synchronisation, every shape fixed by the lengths):
1. Block means in float32: ``mean_q`` over a query block's rows and the group's query heads, ``mean_k`` over
   a key block's real keys (``key_mask`` False keys are left out, whatever they hold; a block with no real
   key is no candidate). ``score = mean_q @ mean_k^T``, ``[B, Hkv, nqb, nkb]``.
2. Each node keeps the top k candidates per row. Ties go to the lower key block: the score's float32 bits
   are mapped to an order-preserving integer and the key block is appended, so `topk` sees no ties.
3. The selection bits index the class and tile grids: the layout's block classes, ``[B, H, nqb, nkb]``.
4. Compressed rows (forward, dQ) and columns (dK/dV) of full and partial blocks: a cumulative sum over the
   grid gives every kept block its slot and ``ptr = cumsum(counts)``; index arrays have a fixed capacity
   from the host half (the blocks kept with nothing selected plus k per node, per row), with unused
   trailing entries (see `sparse_attn.layout`).

Work: O(S * H * D) for the means, O(nqb * nkb * D) for the scores and O(nqb * nkb) for the rest, per KV
head group (per query head only when a static side differs per head); never S x S. The grids are built
per group and the compressed lists repeated for the group's query heads, so every query head of a group
keeps the same blocks. The selection carries no gradient.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from .geometry import Geometry
from .layout import BlockLayout
from .layout_cache import LayoutCache
from .patterns.base import Pattern, check_layout_block_size
from .patterns.topk import leaves, selects, substitute

#: Block size when none is given (both backends' default).
DEFAULT_BLOCK_SIZE = 64
#: Selecting nodes per pattern: the host half builds 2^n static layouts.
MAX_SELECTING_NODES = 4
_TABLE_CACHE_SIZE = 8
_NOT_CANDIDATE = torch.iinfo(torch.int64).min


# -- host half ------------------------------------------------------------------------------------------
def _grid(layout: BlockLayout):
    """Dense block classes int8 and tile ids int32 (-1 where not partial), ``[Bx, Hx, nqb, nkb]``."""
    shape = (layout.batch or 1, layout.num_heads, layout.num_q_blocks, layout.num_k_blocks)
    cls = torch.zeros(shape, dtype=torch.int8).view(-1, *shape[2:])
    tile = torch.full(shape, -1, dtype=torch.int32).view(-1, *shape[2:])
    for kind, value in (("part", 1), ("full", 2)):
        e = layout.entries(kind)
        cls[e.head, e.q_block, e.k_block] = value
        if kind == "part":
            tile[e.head, e.q_block, e.k_block] = e.tile.to(torch.int32)
    return cls.view(shape), tile.view(shape)


class _Tables:
    """The host half of one pattern at one geometry (see the module docstring)."""

    def __init__(self, pattern: Pattern, g: Geometry, heads: int | None):
        nodes = leaves(pattern)
        if len(nodes) > MAX_SELECTING_NODES:
            raise ValueError(
                f"a pattern may hold at most {MAX_SELECTING_NODES} topk_blocks nodes, got {len(nodes)}"
            )
        # k beyond the key blocks keeps them all: clamped, so that no huge k reaches int64 arithmetic.
        self.ks = [min(leaf.node.k, g.num_k_blocks) for leaf in nodes]

        def static_layout(p: Pattern) -> BlockLayout:
            return p.layout(g.q_len, g.kv_len, block_size=(g.block_q, g.block_k), heads=heads)

        grids, tiles, base = [], [], 0
        for bits in itertools.product((False, True), repeat=len(nodes)):
            # Combination c = sum(bit_i << i): node i is the i-th bit, so reverse the product's order.
            chosen = {id(leaf.node): bit for leaf, bit in zip(nodes, reversed(bits), strict=True)}
            layout = static_layout(substitute(pattern, chosen))
            cls, tile = _grid(layout)
            grids.append((cls, torch.where(tile >= 0, tile + base, tile)))
            tiles.append(layout.tiles)
            base += layout.tiles.shape[0]
        among = []
        for leaf in nodes:
            if leaf.among:
                among.append(_grid(static_layout(functools.reduce(lambda a, b: a & b, leaf.among)))[0] != 0)
            else:
                among.append(torch.ones(1, 1, g.num_q_blocks, g.num_k_blocks, dtype=torch.bool))
        shape = torch.broadcast_shapes(*(c.shape for c, _ in grids), *(a.shape for a in among))
        # [Bx, Hx, nqb, nkb, combos]; combination 0 selects nothing, the last everything.
        self.cls = torch.stack([c.expand(shape) for c, _ in grids], -1).contiguous()
        self.tile = torch.stack([t.expand(shape) for _, t in grids], -1).contiguous()
        self.among = torch.stack([a.expand(shape) for a in among]) if among else torch.zeros(0, *shape)
        self.tiles = torch.cat(tiles)
        # Capacity per row: a row keeps its blocks of combination 0 plus at most k per node (monotone), and
        # no more than everything selected keeps; full / partial ones no more than can be full / partial.
        kept = self.cls != 0
        cap = torch.minimum(kept[..., 0].sum(-1) + sum(self.ks), kept[..., -1].sum(-1))
        self.full_width = int(torch.minimum(cap, (self.cls == 2).any(-1).sum(-1)).max())
        self.part_width = int(torch.minimum(cap, (self.cls == 1).any(-1).sum(-1)).max())

    def tensors(self, device) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in (self.cls, self.tile, self.among, self.tiles))

    def ints(self) -> tuple[int, ...]:
        return (*self.cls.shape[:2], self.full_width, self.part_width, *self.ks)


def _tables(pattern: Pattern, g: Geometry, heads: int | None) -> _Tables:
    """`_Tables`, cached on the (immutable) pattern like its layouts."""
    cache = pattern.__dict__.get("_selection_tables")
    if cache is None:
        cache = pattern.__dict__.setdefault("_selection_tables", LayoutCache(_TABLE_CACHE_SIZE))
    return cache.get((g, heads), lambda: _Tables(pattern, g, heads))


def _constant_at_trace_time(fn):
    """Marked for `torch.compile` to run at trace time, its result entering the graph as constants (as
    ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo here)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_at_trace_time
def _traced_table_tensors(pattern, q_len, kv_len, block_q, block_k, heads, device):
    return _tables(pattern, Geometry(q_len, kv_len, block_q, block_k), heads).tensors(device)


@_constant_at_trace_time
def _traced_table_ints(pattern, q_len, kv_len, block_q, block_k, heads):
    return _tables(pattern, Geometry(q_len, kv_len, block_q, block_k), heads).ints()


def _tables_eagerly(pattern, g, heads, device):
    """The tables built outside the graph (`torch.compiler.disable`, applied here: at import it would import
    torch._dynamo, and with it triton)."""

    def build():
        tables = _tables(pattern, g, heads)
        return tables.tensors(device), tables.ints()

    return torch.compiler.disable(build)()


# -- device half ----------------------------------------------------------------------------------------
def _block_sums(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[..., S, D]`` -> sums over blocks of `block` rows ``[..., ceil(S / block), D]`` (zero padded)."""
    pad = -x.shape[-2] % block
    x = F.pad(x, (0, 0, 0, pad)) if pad else x
    return x.unflatten(-2, (-1, block)).sum(-2)


def block_scores(q, k, g: Geometry, key_mask=None):
    """float32 ``score [B, Hkv, nqb, nkb]`` and which key blocks hold a real key ``[B, nkb]``."""
    batch, hq, q_len, dim = q.shape
    hkv = k.shape[1]
    q = q.detach().float().view(batch, hkv, hq // hkv, q_len, dim)
    k = k.detach().float()
    rows = g.valid_rows(torch.arange(g.num_q_blocks, device=q.device)) * (hq // hkv)
    mean_q = _block_sums(q, g.block_q).sum(2) / rows[:, None]
    if key_mask is None:
        count = g.valid_cols(torch.arange(g.num_k_blocks, device=k.device)).expand(batch, -1)
    else:
        # where, not a product: a masked key may hold NaN.
        k = torch.where(key_mask[:, None, :, None], k, 0.0)
        count = _block_sums(key_mask[..., None].float(), g.block_k)[..., 0]
    mean_k = _block_sums(k, g.block_k) / count.clamp(min=1)[:, None, :, None]
    return mean_q @ mean_k.transpose(-1, -2), count > 0


def _order_keys(score: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as the float32 scores, ties broken towards the lower key block (distinct keys)."""
    nkb = score.shape[-1]
    # -0.0 and 0.0 are equal scores: give them one bit pattern.
    bits = torch.where(score == 0, torch.zeros_like(score), score).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    rank = torch.arange(nkb - 1, -1, -1, device=score.device)
    return ordered * nkb + rank


def _select(keys: torch.Tensor, candidate: torch.Tensor, k: int) -> torch.Tensor:
    """bool grid of the `k` highest keys among the candidates of each row (all of them if fewer)."""
    keys = torch.where(candidate, keys, _NOT_CANDIDATE)
    top, index = keys.topk(min(k, keys.shape[-1]), dim=-1)
    return torch.zeros_like(candidate).scatter_(-1, index, top != _NOT_CANDIDATE)


def _compact(valid: torch.Tensor, *values: torch.Tensor) -> list[torch.Tensor]:
    """The entries of `values` where `valid`, moved to the front in order; fixed size (the rest trails)."""
    flat = valid.reshape(-1)
    capacity = flat.shape[0]
    slot = torch.where(flat, torch.cumsum(flat, 0) - 1, capacity)  # invalid ones go to a dropped slot
    return [
        torch.zeros(capacity + 1, dtype=v.dtype, device=v.device).scatter_(0, slot, v.reshape(-1))[:capacity]
        for v in values
    ]


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """Per-sequence counts ``[L, n]`` -> global offsets ``[L, n + 1]`` int32 (see `sparse_attn.layout`)."""
    seqs, n = counts.shape
    starts = F.pad(torch.cumsum(counts.reshape(-1), 0, dtype=torch.int32), (1, 0))
    rows = torch.arange(seqs, device=counts.device)[:, None] * n + torch.arange(n + 1, device=counts.device)
    return starts[rows]


def _lists(cls: torch.Tensor, tile: torch.Tensor, value: int, width: int, partial: bool, repeat: int) -> dict:
    """Row (CSR) and column (CSC) lists of the blocks of class `value` in a grid ``[L, nqb, nkb]``, each
    grid sequence repeated `repeat` times (the query heads of a KV group).

    A row keeps at most `width` such blocks (from the host half), so one `topk` over each row's ranks
    ``nkb - kb`` gives them in ascending kb. A block's place in its column is the count of kept blocks
    above it (a cumulative sum down the grid's columns): a counting sort, no comparison sort."""
    _, nqb, nkb = cls.shape
    device = cls.device
    keep = cls == value
    rank = torch.where(keep, torch.arange(nkb, 0, -1, dtype=torch.int32, device=device), 0)
    top, kb = rank.topk(width, dim=-1)  # [L, nqb, width], kept blocks first, ascending kb
    above = keep.cumsum(1, dtype=torch.int32)  # kept blocks at or above each cell of its column
    in_column = torch.gather(above, -1, kb) - 1
    rep = functools.partial(torch.repeat_interleave, repeats=repeat, dim=0)
    tiles = rep(torch.gather(tile, -1, kb)) if partial else None
    valid, kb, in_column, col_counts = (
        rep(top > 0),
        rep(kb.to(torch.int32)),
        rep(in_column),
        rep(above[:, -1]),
    )
    seqs = valid.shape[0]
    fields = {"row_ptr": _offsets(valid.sum(-1, dtype=torch.int32))}
    row_values = [kb] + ([tiles] if partial else [])
    fields["row_idx"], *rest = _compact(valid, *row_values)
    fields["row_tile"] = rest[0] if partial else None
    fields["col_ptr"] = col_ptr = _offsets(col_counts)
    seq = torch.arange(seqs, device=device)[:, None, None]
    capacity = valid.numel()
    slot = torch.where(valid, col_ptr.view(-1)[seq * (nkb + 1) + kb] + in_column, capacity).reshape(-1)
    qb = torch.arange(nqb, dtype=torch.int32, device=device)[None, :, None].expand(seqs, nqb, width)
    col_values = [qb] + ([tiles] if partial else [])
    cols = [
        torch.zeros(capacity + 1, dtype=v.dtype, device=device).scatter_(0, slot.long(), v.reshape(-1))[
            :capacity
        ]
        for v in col_values
    ]
    fields["col_idx"] = cols[0]
    fields["col_tile"] = cols[1] if partial else None
    return fields


def _device_layout(q, k, key_mask, g: Geometry, tensors, ints) -> BlockLayout:
    """Select and build the layout on q's device (see the module docstring), with no host synchronisation."""
    cls_table, tile_table, among, tiles = tensors
    bx, hx, full_width, part_width, *ks = ints
    batch, hq = q.shape[:2]
    hkv = k.shape[1]
    group = hq // hkv
    # Grid granularity: KV head groups, unless a static side differs per query head.
    heads = hkv if hx == 1 else hq
    score, has_key = block_scores(q, k, g, key_mask)
    if heads != hkv:
        score = score.repeat_interleave(group, 1)
    keys = _order_keys(score)
    chosen = [
        _select(keys, among[i].expand(batch, heads, -1, -1) & has_key[:, None, None, :], kk)
        for i, kk in enumerate(ks)
    ]
    shape = (batch, heads, g.num_q_blocks, g.num_k_blocks)
    if len(chosen) == 1:
        cls = torch.where(chosen[0], cls_table[..., 1], cls_table[..., 0]).expand(shape)
        tile = torch.where(chosen[0], tile_table[..., 1], tile_table[..., 0]).expand(shape)
    else:
        combo = sum(c.long() << i for i, c in enumerate(chosen))[..., None]
        cls = torch.gather(cls_table.expand(*shape, -1), -1, combo).squeeze(-1)
        tile = torch.gather(tile_table.expand(*shape, -1), -1, combo).squeeze(-1)
    cls, tile = cls.flatten(0, 1), tile.flatten(0, 1)
    fields = {"tiles": tiles}
    for kind, value, width in (("full", 2, full_width), ("part", 1, part_width)):
        part = kind == "part"
        # Selected per KV group; one layout head per query head (shared only under MQA).
        repeat = group if heads == hkv and group > 1 and hkv > 1 else 1
        lists = _lists(cls, tile, value, width, part, repeat)
        for side in ("row", "col"):
            fields[f"{side}_{kind}_ptr"], fields[f"{side}_{kind}_idx"] = (
                lists[f"{side}_ptr"],
                lists[f"{side}_idx"],
            )
            if part:
                fields[f"{side}_part_tile"] = lists[f"{side}_tile"]
    layout_heads = hq if heads == hq or (group > 1 and hkv > 1) else 1
    return BlockLayout(g, layout_heads, batch, **fields)


# -- public -----------------------------------------------------------------------------------------------
def select_layout(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, *, block_size=None, key_mask=None):
    """The per-batch, per-head `BlockLayout` that `sparse_attention(q, k, v, pattern)` uses.

    Patterns holding `topk_blocks` select from `q` ``[B, Hq, Sq, D]`` and `k` ``[B, Hkv, Skv, D]`` (and
    `key_mask` ``[B, Skv]``, True for a real key) on their device, with no host synchronisation; other
    patterns give their layout from lengths. `block_size` defaults to the backends' 64. The layout can be
    reused (across layers, or for a later call with the same q/k shapes).
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparse_attn Pattern, got {type(pattern).__name__}")
    _check_qk(q, k, key_mask)
    block_q, block_k = check_layout_block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
    batch, hq, q_len, _ = q.shape
    g = Geometry(q_len, k.shape[2], block_q, block_k)
    if pattern.num_heads is not None and pattern.num_heads != hq:
        raise ValueError(f"pattern defines {pattern.num_heads} heads, but q has {hq} heads")
    batch_size = getattr(pattern, "batch_size", None)
    if batch_size not in (None, 1, batch):
        raise ValueError(f"pattern was built for {batch_size} batch elements, but q has batch size {batch}")
    heads = hq if pattern.num_heads is not None else None
    if not selects(pattern):
        return pattern.layout(q_len, g.kv_len, block_size=(block_q, block_k), heads=heads, device=q.device)
    if torch.compiler.is_compiling() and getattr(pattern, "from_data", False):
        # A static side built from data (documents(ids)) is host work on those ids: built eagerly, outside
        # the graph (a graph break, as for documents alone), never baked in as constants.
        tensors, ints = _tables_eagerly(pattern, g, heads, q.device)
    elif torch.compiler.is_compiling():
        sizes = (q_len, g.kv_len, block_q, block_k, heads)
        tensors = _traced_table_tensors(pattern, *sizes, str(q.device))
        ints = _traced_table_ints(pattern, *sizes)
    else:
        tables = _tables(pattern, g, heads)
        tensors, ints = tables.tensors(q.device), tables.ints()
    with torch.no_grad():
        return _device_layout(q, k, key_mask, g, tensors, ints)


def _check_qk(q, k, key_mask) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype:
        raise TypeError(f"q and k must share a floating dtype, got {q.dtype} and {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must be [B={q.shape[0]}, Hkv, Skv, D={q.shape[3]}], got {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise ValueError(f"q and k must have no empty dimension, got {tuple(q.shape)} and {tuple(k.shape)}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError("key_mask must be a bool tensor [B, Skv] (True marks a real key)")
        if key_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_mask must be [B={k.shape[0]}, Skv={k.shape[2]}], got {tuple(key_mask.shape)}"
            )
        if key_mask.device != q.device:
            raise ValueError(f"key_mask must be on {q.device}, got {key_mask.device}")
