"""The `Pattern` base class: a token predicate plus an analytic enumeration of the blocks it keeps.

A new pattern subclasses `Pattern` and implements two public hooks (see CONTRIBUTING.md):
- ``visible(g, h, i, j)``: may query row `i` (absolute position ``i + g.offset``) of head `h` see key `j`?
  Broadcasting int64 tensors in, a bool tensor out. The token-level truth, used by `mask()` and to fill
  the few distinct partial tiles (rows and keys past the sequence are masked by the caller).
- ``blocks(g)``: the kept blocks as a `BlockSet` (`sparse_attn.geometry`), enumerated without an S x S
  mask; `from_candidates` turns candidate blocks into one, exactly classified.

and, optionally, ``check_lengths(q_len, kv_len)`` (raise ValueError for lengths it cannot apply to),
``intersection(other)`` (one pattern equal to ``self & other``, or None) and, with
``classifies_blocks = True``, ``blocks_among(g, other)`` (classify exactly the blocks of another set).
"""

from __future__ import annotations

import functools

import torch

from ..checks import check_size
from ..geometry import BlockSet, ElementGeometry, Geometry
from ..layout_cache import LayoutCache
from ._blockset import combine, common_batch

#: Layouts each pattern keeps for reuse (per lengths, block size and device).
LAYOUT_CACHE_SIZE = 8
#: Largest block_q * block_k a layout may have (a partial tile is a token mask of that many pairs).
MAX_TILE_PAIRS = 1 << 22


def check_block_size(block_size) -> tuple[int, int]:
    """An int or a (block_q, block_k) pair of positive ints (sizes of tensor dimensions)."""
    if isinstance(block_size, tuple | list):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a (block_q, block_k) pair, got {block_size!r}")
        return check_size("block_size[0]", block_size[0]), check_size("block_size[1]", block_size[1])
    size = check_size("block_size", block_size)
    return size, size


def check_layout_block_size(block_size) -> tuple[int, int]:
    """`check_block_size` for a layout's blocks, whose partial tiles (block_q x block_k token masks) must
    stay below `MAX_TILE_PAIRS`; checked before anything is allocated."""
    block_q, block_k = check_block_size(block_size)
    if block_q * block_k > MAX_TILE_PAIRS:
        raise ValueError(
            f"block_size {block_q} x {block_k} gives tiles of {block_q * block_k:,} token pairs; at most "
            f"{MAX_TILE_PAIRS:,} (e.g. 2048 x 2048) are supported, and the kernels use 64 to 128"
        )
    return block_q, block_k


class Pattern:
    """Which query-key pairs may interact. Compose with ``|`` (union) and ``&`` (intersection)."""

    #: None for a pattern shared by all heads, else the number of heads it defines.
    num_heads: int | None = None
    #: None for a pattern shared by the batch (every pattern of lengths alone), else the number of batch
    #: elements its data defines (`documents` with ``[B, S]`` ids): its layouts are then per batch.
    batch_size: int | None = None
    #: True when the layout depends on data (document ids), not on lengths alone.
    from_data: bool = False
    #: True for a pattern in another token order than the user's (`tile_major`): it does not compose.
    reorders_tokens: bool = False

    # -- the hooks a pattern implements (see the module docstring) -----------------------------------
    def visible(self, g: Geometry, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """May query row `i` of head `h` see key `j` (broadcasting tensors, bool result)?"""
        raise NotImplementedError

    def blocks(self, g: Geometry) -> BlockSet:
        """The kept blocks for geometry `g`, exactly classified, in time proportional to them."""
        raise NotImplementedError

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise ValueError if the pattern cannot apply to these lengths."""

    def intersection(self, other: Pattern) -> Pattern | None:
        """A single pattern equal to ``self & other`` when one exists (so that, say, causal & window
        enumerates only the window's blocks instead of all causal ones), else None."""
        return None

    #: True if `_blocks_among` can classify any given blocks analytically (the diagonal bands).
    classifies_blocks = False

    def blocks_among(self, g: Geometry, other: BlockSet) -> BlockSet:
        """The kept blocks among `other`'s (for ``self & other``), in time proportional to `other`."""
        raise NotImplementedError

    # -- public API ----------------------------------------------------------------------------------
    def mask(self, q_len: int, kv_len: int | None = None, *, heads: int | None = None, device=None):
        """Token-level truth, bool ``[q_len, kv_len]`` (``[H, q_len, kv_len]`` with heads; a leading ``[B]`` for a
        per-batch pattern). O(S^2): tests and plots only."""
        q_len, kv_len, heads = self._check_call(q_len, kv_len, heads)
        h = torch.arange(heads or 1)[:, None, None]
        i = torch.arange(q_len)[None, :, None]
        j = torch.arange(kv_len)[None, None, :]

        def element(b: int) -> torch.Tensor:
            g = ElementGeometry(q_len, kv_len, 1, 1, batch_index=b)
            m = self.visible(g, h, i, j).expand(heads or 1, q_len, kv_len)
            return m if heads is not None else m[0]

        # A per-batch pattern gives [B, ...]: one mask per batch element.
        m = (
            element(0)
            if self.batch_size is None
            else torch.stack([element(b) for b in range(self.batch_size)])
        )
        return m.contiguous().to(device) if device is not None else m.contiguous()

    def layout(self, q_len: int, kv_len: int | None = None, *, block_size=128, heads=None, device=None):
        """The exact `BlockLayout`, built in time and memory proportional to the kept blocks.

        A pattern shared by all heads gives a one-head layout whatever `heads` says (the kernels broadcast
        it); a `per_head` pattern gives one layout head per pattern head."""
        from ..layout import BlockLayout

        q_len, kv_len, heads = self._check_call(q_len, kv_len, heads)
        block_q, block_k = check_layout_block_size(block_size)
        device = torch.device("cpu") if device is None else torch.device(device)
        # Patterns are immutable, so a few recent layouts are kept: calling sparse_attention with the same
        # pattern and shapes again does not rebuild (or re-upload) the layout.
        cache = self.__dict__.get("_layouts")
        if cache is None:
            cache = self.__dict__.setdefault("_layouts", LayoutCache(LAYOUT_CACHE_SIZE))
        g = Geometry(q_len, kv_len, block_q, block_k)
        return cache.get((g, device), lambda: BlockLayout.from_block_set(self.blocks(g), g).to(device))

    def _check_call(self, q_len, kv_len, heads):
        q_len = check_size("q_len", q_len)
        kv_len = q_len if kv_len is None else check_size("kv_len", kv_len)
        if heads is not None:
            heads = check_size("heads", heads)
            if self.num_heads is not None and heads != self.num_heads:
                raise ValueError(
                    f"this pattern defines {self.num_heads} heads, but heads={heads} was asked for"
                )
        elif self.num_heads is not None:
            heads = self.num_heads
        self.check_lengths(q_len, kv_len)
        return q_len, kv_len, heads

    def __or__(self, other: Pattern) -> Pattern:
        return Union(self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return Intersection(self, other)


class _Binary(Pattern):
    symbol = "?"

    def __init__(self, left: Pattern, right: Pattern):
        for side in (left, right):
            if not isinstance(side, Pattern):
                raise TypeError(f"patterns compose only with patterns, got {type(side).__name__}")
            if side.reorders_tokens:
                raise TypeError(f"compose patterns before reordering them: {side!r} is in tile-major order")
        if None not in (left.num_heads, right.num_heads) and left.num_heads != right.num_heads:
            raise ValueError(
                f"cannot combine per-head patterns of {left.num_heads} and {right.num_heads} heads"
            )
        self.left, self.right = left, right
        self.num_heads = left.num_heads if left.num_heads is not None else right.num_heads
        self.batch_size = common_batch(left.batch_size, right.batch_size)
        self.from_data = left.from_data or right.from_data

    def check_lengths(self, q_len, kv_len):
        self.left.check_lengths(q_len, kv_len)
        self.right.check_lengths(q_len, kv_len)

    def __repr__(self):
        return f"({self.left!r} {self.symbol} {self.right!r})"


class Union(_Binary):
    """Visible where either side is."""

    symbol = "|"

    def visible(self, g, h, i, j):
        return self.left.visible(g, h, i, j) | self.right.visible(g, h, i, j)

    def blocks(self, g):
        return combine(self.left.blocks(g), self.right.blocks(g), g, "or")


class Intersection(_Binary):
    """Visible where both sides are."""

    symbol = "&"

    def visible(self, g, h, i, j):
        return self.left.visible(g, h, i, j) & self.right.visible(g, h, i, j)

    def blocks(self, g):
        simpler = self.left.intersection(self.right)
        if simpler is None:
            simpler = self.right.intersection(self.left)
        if simpler is not None:
            return simpler.blocks(g)
        # A band (causal, a window) is classified only on the other side's blocks: causal & (window | globals)
        # then costs what the window and globals keep, not every causal block.
        for band, other in ((self.left, self.right), (self.right, self.left)):
            if band.classifies_blocks:
                theirs = other.blocks(g)
                return combine(band.blocks_among(g, theirs), theirs, g, "and")
        return combine(self.left.blocks(g), self.right.blocks(g), g, "and")


class PerHead(Pattern):
    """Head `h` uses ``patterns[h]``."""

    def __init__(self, patterns):
        if isinstance(patterns, Pattern) or not hasattr(patterns, "__iter__"):
            raise TypeError(
                f"per_head takes a sequence of Patterns, one per head, got {type(patterns).__name__}"
            )
        patterns = list(patterns)
        if not patterns:
            raise ValueError("per_head needs at least one pattern")
        for k, p in enumerate(patterns):
            if not isinstance(p, Pattern):
                raise TypeError(f"per_head expects Patterns, item {k} is {type(p).__name__}")
            if p.num_heads is not None:
                raise ValueError(f"per_head items must be shared patterns; item {k} is already per-head")
            if p.reorders_tokens:
                raise TypeError(f"per_head item {k} is in tile-major order: use tile_major(per_head([...]))")
        self.patterns = patterns
        self.num_heads = len(patterns)
        self.batch_size = functools.reduce(common_batch, (p.batch_size for p in patterns))
        self.from_data = any(p.from_data for p in patterns)

    def check_lengths(self, q_len, kv_len):
        for p in self.patterns:
            p.check_lengths(q_len, kv_len)

    def visible(self, g, h, i, j):
        out = None
        for k, p in enumerate(self.patterns):
            part = p.visible(g, h, i, j) & (h == k)
            out = part if out is None else out | part
        return out

    def blocks(self, g):
        sets = [p.blocks(g) for p in self.patterns]
        batch = functools.reduce(common_batch, (s.batch for s in sets))
        sets = [s.expand(batch, 1, g) for s in sets]
        per_seq, heads = g.num_q_blocks * g.num_k_blocks, len(sets)
        keys, ids, tiles, base = [], [], [], 0
        for k, s in enumerate(sets):
            # Sequence b of head k's set becomes sequence b * heads + k.
            keys.append((s.key // per_seq * heads + k) * per_seq + s.key % per_seq)
            ids.append(torch.where(s.tile_id >= 0, s.tile_id + base, s.tile_id))
            tiles.append(s.tiles)
            base += s.tiles.shape[0]
        key, tile_id = torch.cat(keys), torch.cat(ids)
        order = torch.argsort(key) if batch is not None else slice(None)
        return BlockSet(heads, key[order], tile_id[order], torch.cat(tiles), batch)

    def __repr__(self):
        return f"per_head([{', '.join(map(repr, self.patterns))}])"


def nodes_of(pattern: Pattern, kind: type):
    """The nodes of type `kind` in `pattern`'s tree (through ``|``, ``&`` and `per_head`), in tree order."""
    if isinstance(pattern, kind):
        yield pattern
    elif isinstance(pattern, _Binary):
        yield from nodes_of(pattern.left, kind)
        yield from nodes_of(pattern.right, kind)
    elif isinstance(pattern, PerHead):
        for p in pattern.patterns:
            yield from nodes_of(p, kind)


def per_head(patterns) -> Pattern:
    """Give head `h` the pattern ``patterns[h]``; the number of heads is ``len(patterns)``."""
    return PerHead(patterns)
