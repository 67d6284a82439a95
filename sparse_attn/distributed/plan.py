"""The communication plan of context-parallel attention, computed from the layout before anything runs.

Every rank computes the same plan from (pattern, sharding, block size, heads) alone, with no communication.

Padded grid
    Each chunk of the sharding is padded to a multiple of the block size b, so that every block of the
    global layout lies in one chunk and has one owner. Padded rows and keys are invisible (a padded row
    gets out 0, lse -inf, and is dropped). When b divides the chunk length nothing is padded and the layout
    is the pattern's own; otherwise `_ChunkPadded` maps padded positions to true ones, at a token cost of
    b^2 per kept block (fine for short shards; make shards a multiple of b for long ones).

Pull or push
    A kept block (query block qb of rank r, key block kb of rank p != r) is computed one of two ways:
    - pull: p sends r the K/V of block kb (only for the key/value heads that need it), and r attends;
    - push: r sends p the queries of qb, p attends over its own keys and returns (out, lse), which r merges
      through the logsumexps (`sparse_attn.merge`).
    Pulling is the rule. A row (qb, p) is pushed when its share of the K/V that r pulls from p, each pulled
    block split evenly among the rows of r that keep it, costs more than twice its queries would: a global
    query row keeps every block of every peer but shares none of them, so it is pushed (and no rank ever
    gathers the whole sequence); rows of a causal shard all keep the same earlier blocks, so they pull.

Bytes (``[P, P]``, row = sender): forward, the pulled K/V and pushed queries, then the pushed rows'
(out, lse); backward, the pushed rows' dO, out, lse and dlse, then their dQ and the pulled blocks' dK/dV.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..geometry import BlockSet, ElementGeometry, Geometry
from ..layout import BlockLayout
from ..layout_cache import LayoutCache, build_for_every_mode
from ..patterns import Pattern
from ..patterns._blockset import from_candidates
from .sharding import Sharding

#: A row is pushed when its share of the pulled K/V costs more than PUSH_MARGIN times its queries.
PUSH_MARGIN = 2.0
_PLAN_CACHE_SIZE = 4


class _ChunkPadded(Pattern):
    """`inner` over a sequence whose chunks of `chunk` positions are each padded to `padded` positions."""

    def __init__(self, inner: Pattern, seq_len: int, chunk: int, padded: int):
        self.inner, self.seq_len, self.chunk, self.padded = inner, seq_len, chunk, padded
        self.num_heads, self.batch_size, self.from_data = inner.num_heads, inner.batch_size, inner.from_data

    def check_lengths(self, q_len, kv_len):
        self.inner.check_lengths(self.seq_len, self.seq_len)

    def _true(self, x):
        """True positions of padded positions `x`, and whether each is a real position."""
        offset = x % self.padded
        return (x // self.padded) * self.chunk + offset.clamp(max=self.chunk - 1), offset < self.chunk

    def visible(self, g, h, i, j):
        (ti, real_i), (tj, real_j) = self._true(i), self._true(j)
        # The batch element of a per-batch pattern (documents with [B, S] ids) rides on the geometry.
        true_g = ElementGeometry(self.seq_len, self.seq_len, 1, 1, batch_index=getattr(g, "batch_index", 0))
        return self.inner.visible(true_g, h, ti, tj) & real_i & real_j

    def _padded_blocks(self, first, last, block):
        """First and last padded block of the true position ranges [first, last]."""
        pad = lambda x: (x // self.chunk) * self.padded + x % self.chunk  # noqa: E731
        return pad(first) // block, pad(last) // block

    def blocks(self, g):
        true_g = Geometry(self.seq_len, self.seq_len, g.block_q, g.block_k)
        s = self.inner.blocks(true_g)
        h, qb, kb = s.split_key(true_g)
        q0, q1 = self._padded_blocks(qb * g.block_q, qb * g.block_q + true_g.valid_rows(qb) - 1, g.block_q)
        k0, k1 = self._padded_blocks(kb * g.block_k, kb * g.block_k + true_g.valid_cols(kb) - 1, g.block_k)
        # Each true block becomes the rectangle of padded blocks its rows and keys fall in.
        nq, nk = q1 - q0 + 1, k1 - k0 + 1
        per = nq * nk
        src = torch.repeat_interleave(torch.arange(len(h)), per)
        local = torch.arange(len(src)) - torch.repeat_interleave(torch.cumsum(per, 0) - per, per)
        ph, pq, pk = h[src], q0[src] + local // nk[src], k0[src] + local % nk[src]
        key = torch.unique((ph * g.num_q_blocks + pq) * g.num_k_blocks + pk)
        ph, pq, pk = (
            key // (g.num_q_blocks * g.num_k_blocks),
            (key // g.num_k_blocks) % g.num_q_blocks,
            key % g.num_k_blocks,
        )
        # Every candidate gets its own tile, evaluated token by token and re-classified exactly.
        full = torch.zeros(len(key), dtype=torch.bool)
        if s.batch is None:
            return from_candidates(self, g, s.heads, ph, pq, pk, full, key)
        # A per-batch set: layout sequence b * heads + h; each element's tiles from its own token mask.
        parts, per_element = [], s.heads * g.num_q_blocks * g.num_k_blocks
        for b in range(s.batch):
            sel = ph // s.heads == b
            g_b = ElementGeometry(g.q_len, g.kv_len, g.block_q, g.block_k, batch_index=b)
            parts.append(
                from_candidates(self, g_b, s.heads, ph[sel] % s.heads, pq[sel], pk[sel], full[sel], key[sel])
            )
        keys, ids, base = [], [], 0
        for b, part in enumerate(parts):
            keys.append(part.key + b * per_element)
            ids.append(torch.where(part.tile_id >= 0, part.tile_id + base, part.tile_id))
            base += part.tiles.shape[0]
        tiles = torch.cat([part.tiles for part in parts])
        return BlockSet(s.heads, torch.cat(keys), torch.cat(ids), tiles, s.batch)

    def __repr__(self):
        return f"chunk_padded({self.inner!r}, chunk={self.chunk}, padded={self.padded})"


def layout_entries(layout: BlockLayout):
    """(head, query block, key block, tile id) of every kept block, int64 on the CPU; tile -1 = full."""
    full, part = layout.entries("full"), layout.entries("part")
    tiles = torch.cat([torch.full_like(full.k_block, -1), part.tile])
    return (*(torch.cat([a, b]) for a, b in zip(full[:3], part[:3], strict=True)), tiles)


def _by_pair(pair: torch.Tensor, value: torch.Tensor, n_values: int) -> dict:
    """``{pair: sorted unique values}`` for the (pair, value) couples given."""
    key = torch.unique(pair * n_values + value)
    pairs, values = key // n_values, key % n_values
    uniq, counts = torch.unique_consecutive(pairs, return_counts=True)
    return dict(zip(uniq.tolist(), torch.split(values, counts.tolist()), strict=True))


class Plan:
    """What every rank pulls, pushes and computes, for one pattern, sharding, block size and head counts."""

    def __init__(self, pattern: Pattern, sharding: Sharding, block: int, q_heads: int, kv_heads: int):
        self.sharding, self.block, self.q_heads, self.kv_heads = sharding, block, q_heads, kv_heads
        world, chunk = sharding.world, sharding.chunk_len
        self.padded_chunk = -(-chunk // block) * block
        self.blocks_per_chunk = self.padded_chunk // block
        padded_len = self.padded_chunk * sharding.num_chunks
        per_head = pattern.num_heads is not None
        if per_head and pattern.num_heads != q_heads:
            raise ValueError(f"pattern defines {pattern.num_heads} heads, but q has {q_heads} heads")
        source = pattern
        if self.padded_chunk != chunk:
            source = _ChunkPadded(pattern, sharding.seq_len, chunk, self.padded_chunk)
        self.layout = source.layout(
            padded_len, padded_len, block_size=block, heads=q_heads if per_head else None
        )
        n_blocks = self.layout.num_q_blocks
        # Owner and position in the owner's shard of every padded block (chunks sit in sequence order).
        chunk_of = torch.arange(n_blocks) // self.blocks_per_chunk
        slot = torch.zeros(sharding.num_chunks, dtype=torch.int64)
        for rank in range(world):
            for k, c in enumerate(sharding.chunks_of(rank)):
                slot[c] = k
        self.owner = sharding.chunk_owner()[chunk_of]
        self.local = slot[chunk_of] * self.blocks_per_chunk + torch.arange(n_blocks) % self.blocks_per_chunk
        # K/V travels in units (kv head group, key block): one group of all kv heads for a layout shared by
        # all heads, one kv head each for a per-head layout (a head's blocks go only to the heads needing them).
        self.kv_groups = kv_heads if per_head else 1
        # h is the layout sequence (b * heads + head for a per-batch layout: documents with [B, S] ids); a
        # K/V unit carries every batch element, so only the head picks its group.
        h, qb, kb, tile = layout_entries(self.layout)
        head = h % self.layout.num_heads
        unit = (head // (q_heads // kv_heads) if per_head else torch.zeros_like(h)) * n_blocks + kb
        rq, rk = self.owner[qb], self.owner[kb]
        remote = self._pushed(qb, unit, rq, rk)
        self.entries = (h, qb, kb, tile, remote)
        pulled = (rq != rk) & ~remote
        n_units = self.kv_groups * n_blocks
        self.pull = _by_pair(rq[pulled] * world + rk[pulled], unit[pulled], n_units)  # (r, p) -> units
        self.push = _by_pair(rq[remote] * world + rk[remote], qb[remote], n_blocks)  # (r, p) -> q blocks
        self._views = LayoutCache(sharding.world)

    @property
    def num_blocks(self) -> int:
        return self.layout.num_q_blocks

    def _pushed(self, qb, unit, rq, rk) -> torch.Tensor:
        """Which kept blocks are computed by the key's owner (push) rather than by the query's (pull)."""
        world, n_blocks = self.sharding.world, self.num_blocks
        n_units = self.kv_groups * n_blocks
        cross = rq != rk
        # (row, unit) couples across ranks, and how many rows of the row's rank need each unit.
        couples = torch.unique(qb[cross] * n_units + unit[cross])
        row, u = couples // n_units, couples % n_units
        _, which, users = torch.unique(self.owner[row] * n_units + u, return_inverse=True, return_counts=True)
        share = torch.zeros(n_blocks * world, dtype=torch.float64)
        share.index_add_(0, row * world + self.owner[u % n_blocks], 1.0 / users[which].double())
        # A unit carries kv_heads / kv_groups heads of K and V; a pushed row carries q_heads heads of Q.
        pushed = share * (self.kv_heads / self.kv_groups) > PUSH_MARGIN * self.q_heads
        return cross & pushed[qb * world + rk]

    def volume(self, batch: int, head_dim: int, elem_size: int, lse_size: int = 4):
        """Bytes ``(forward [P, P], backward [P, P])``, row = sender, column = receiver."""
        world, b = self.sharding.world, self.block
        unit_bytes = 2 * batch * (self.kv_heads // self.kv_groups) * b * head_dim * elem_size  # K and V
        q_bytes = batch * self.q_heads * b * head_dim * elem_size
        result_bytes = batch * self.q_heads * b * (head_dim * elem_size + lse_size)  # out and lse
        # dO, out, lse and dlse of a pushed row, for its backward where it was computed.
        d_result_bytes = 2 * result_bytes
        fwd = torch.zeros(world, world, dtype=torch.int64)
        bwd = torch.zeros(world, world, dtype=torch.int64)
        for pair, units in self.pull.items():
            r, p = divmod(pair, world)
            fwd[p, r] += len(units) * unit_bytes
            bwd[r, p] += len(units) * unit_bytes
        for pair, blocks in self.push.items():
            r, p = divmod(pair, world)
            fwd[r, p] += len(blocks) * q_bytes
            fwd[p, r] += len(blocks) * result_bytes
            bwd[r, p] += len(blocks) * d_result_bytes
            bwd[p, r] += len(blocks) * q_bytes
        return fwd, bwd

    def blocks_computed(self) -> torch.Tensor:
        """int64 ``[P]``: kept (layout head, query block, key block) triples each rank attends over."""
        _, qb, kb, _, remote = self.entries
        where = torch.where(remote, self.owner[kb], self.owner[qb])
        return torch.bincount(where, minlength=self.sharding.world)

    def rank_view(self, rank: int) -> RankPlan:
        return self._views.get(rank, lambda: RankPlan(self, rank))


def _sub_layout(h, rows, cols, tile, heads, batch, n_rows, n_cols, block, tiles) -> BlockLayout:
    """A layout over `n_rows` x `n_cols` blocks holding the given entries (tile ids into `tiles`; `h` the
    layout sequence, of `batch` elements or None)."""
    g = Geometry(n_rows * block, n_cols * block, block, block)
    key = (h * n_rows + rows) * n_cols + cols
    order = torch.argsort(key)
    has_tile = tile >= 0
    used, new_id = torch.unique(tile[has_tile], return_inverse=True)
    tile = tile.clone()
    tile[has_tile] = new_id
    return BlockLayout.from_block_set(BlockSet(heads, key[order], tile[order], tiles[used], batch), g)


class RankPlan:
    """One rank's part of a `Plan`: what it sends and receives, and the sub-layouts it attends with.

    Indices of K/V units are flat over ``[kv_groups, blocks]`` of the tensor they index; peers are ranks
    of the group. Every list is in the order both sides of an exchange derive alike."""

    def __init__(self, plan: Plan, rank: int):
        self.plan, self.rank = plan, rank
        world, n_blocks, b = plan.sharding.world, plan.num_blocks, plan.block
        self.world, self.block, self.kv_groups = world, b, plan.kv_groups
        own = torch.nonzero(plan.owner == rank).squeeze(1)
        self.num_own = len(own)
        peers = [p for p in range(world) if p != rank]
        pull_from = {p: plan.pull[rank * world + p] for p in peers if rank * world + p in plan.pull}
        pull_to = {p: plan.pull[p * world + rank] for p in peers if p * world + rank in plan.pull}
        push_to = {p: plan.push[rank * world + p] for p in peers if rank * world + p in plan.push}
        push_from = {p: plan.push[p * world + rank] for p in peers if p * world + rank in plan.push}
        # Pulled key blocks (any peer), in sequence order: the keys of the pulled sub-problem.
        pulled = [u % n_blocks for u in pull_from.values()]
        self.gathered = torch.unique(torch.cat(pulled)) if pulled else torch.zeros(0, dtype=torch.int64)
        self.num_gathered = len(self.gathered)
        self.recv_units = {  # peer -> flat slots of the pulled K/V its units fill
            p: (u // n_blocks) * self.num_gathered + torch.searchsorted(self.gathered, u % n_blocks)
            for p, u in pull_from.items()
        }
        self.send_units = {
            p: (u // n_blocks) * self.num_own + plan.local[u % n_blocks] for p, u in pull_to.items()
        }
        self.push_blocks = {p: plan.local[qb] for p, qb in push_to.items()}  # own query blocks sent to p
        self.pushed_in = {p: len(qb) for p, qb in push_from.items()}  # query blocks p sends here
        self.holes = plan.kv_groups > 1  # a per-head plan leaves (head, block) slots nobody needs
        self._push_from = push_from
        h, qb, kb, tile, remote = plan.entries
        mine = plan.owner[qb] == rank
        self._own = mine & (plan.owner[kb] == rank)
        self._pulled = mine & (plan.owner[kb] != rank) & ~remote
        # Own query blocks that keep a pulled block: the rows of the pulled sub-problem.
        self.pulled_rows = torch.unique(plan.local[qb[self._pulled]])

    def _layout(self, sel, rows, cols, n_rows, n_cols) -> BlockLayout:
        h, _, _, tile, _ = self.plan.entries
        layout = self.plan.layout
        # Built on first use, maybe under inference mode, and kept: normal tensors, as every cache keeps.
        return build_for_every_mode(
            lambda: _sub_layout(
                h[sel],
                rows,
                cols,
                tile[sel],
                layout.num_heads,
                layout.batch,
                n_rows,
                n_cols,
                self.block,
                layout.tile_masks().cpu(),
            )  # fmt: skip
        )

    @cached_property
    def own_layout(self) -> BlockLayout:
        """Own query blocks over own key blocks (no copy of K/V: the backend reads the shard itself)."""
        _, qb, kb, _, _ = self.plan.entries
        sel = self._own
        return self._layout(
            sel, self.plan.local[qb[sel]], self.plan.local[kb[sel]], self.num_own, self.num_own
        )

    @cached_property
    def pulled_layout(self) -> BlockLayout | None:
        """`pulled_rows` over the pulled key blocks; None if nothing is pulled."""
        if not self.num_gathered:
            return None
        _, qb, kb, _, _ = self.plan.entries
        sel = self._pulled
        rows = torch.searchsorted(self.pulled_rows, self.plan.local[qb[sel]])
        cols = torch.searchsorted(self.gathered, kb[sel])
        return self._layout(sel, rows, cols, len(self.pulled_rows), self.num_gathered)

    @cached_property
    def remote_layout(self) -> BlockLayout | None:
        """Query blocks pushed here (by peer, in rank order) over own key blocks; None if none are."""
        if not self._push_from:
            return None
        p = self.plan
        _, qb, kb, _, remote = p.entries
        sel = remote & (p.owner[kb] == self.rank)
        qb_sel = qb[sel]
        rows = torch.empty_like(qb_sel)
        start = 0
        for peer, blocks in self._push_from.items():
            mine = p.owner[qb_sel] == peer
            rows[mine] = start + torch.searchsorted(blocks, qb_sel[mine])
            start += len(blocks)
        return self._layout(sel, rows, p.local[kb[sel]], start, self.num_own)


def get_plan(pattern: Pattern, sharding: Sharding, block: int, q_heads: int, kv_heads: int) -> Plan:
    """The plan, kept on the pattern for reuse (patterns are immutable), in a thread-safe `LayoutCache`."""
    cache = pattern.__dict__.get("_cp_plans")
    if cache is None:
        cache = pattern.__dict__.setdefault("_cp_plans", LayoutCache(_PLAN_CACHE_SIZE))
    key = (sharding, block, q_heads, kv_heads)
    return cache.get(key, lambda: Plan(pattern, sharding, block, q_heads, kv_heads))


@dataclass(frozen=True)
class CommVolume:
    """Bytes that context-parallel attention exchanges, per ordered pair of ranks (row sends to column).

    `all_gather` is what each rank receives in the forward pass when K/V are all-gathered instead (as
    PyTorch's context parallelism does), for comparison; `blocks_computed` how many kept blocks each rank
    attends over (the zigzag order evens it out under a causal pattern)."""

    forward: torch.Tensor  # int64 [P, P]
    backward: torch.Tensor  # int64 [P, P]
    all_gather: int
    blocks_computed: torch.Tensor  # int64 [P]: the work of each rank, in kept blocks (load balance)

    def received(self, which: str = "forward") -> torch.Tensor:
        """int64 ``[P]``: bytes each rank receives in the ``"forward"``, ``"backward"`` or ``"total"``."""
        return self._matrix(which).sum(0)

    def sent(self, which: str = "forward") -> torch.Tensor:
        """int64 ``[P]``: bytes each rank sends."""
        return self._matrix(which).sum(1)

    def _matrix(self, which):
        if which not in ("forward", "backward", "total"):
            raise ValueError(f"which must be 'forward', 'backward' or 'total', got {which!r}")
        return {"forward": self.forward, "backward": self.backward}.get(which, self.forward + self.backward)
