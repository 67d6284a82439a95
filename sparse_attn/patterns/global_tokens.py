"""`global_tokens`: a few positions that see everything and are seen by everything."""

from __future__ import annotations

import numbers

import torch

from ..checks import check_int
from ._blockset import from_candidates
from .base import Pattern


def _offset_kinds(index: torch.Tensor, size: int, n_blocks: int):
    """Per block of `size`, 0 if no `index` falls in it, else 1 + an id shared by the blocks holding the
    same in-block offsets; and the number of kinds. Memory: (blocks holding an index) x size."""
    blocks, inverse = torch.unique(index // size, return_inverse=True)
    kinds = torch.zeros(n_blocks, dtype=torch.int64)
    if len(blocks) == 0:
        return kinds, 1
    offsets = torch.zeros(len(blocks), size, dtype=torch.bool)
    offsets[inverse, index % size] = True
    distinct, kind = torch.unique(offsets, dim=0, return_inverse=True)
    kinds[blocks] = kind + 1
    return kinds, len(distinct) + 1


class GlobalTokens(Pattern):
    """Visible iff key `j` is global or query position `qpos` is global."""

    def __init__(self, n_or_positions):
        # An int n means "the first n positions", which a shorter sequence simply has fewer of; explicit
        # positions must exist in the sequence.
        self.is_prefix = isinstance(n_or_positions, numbers.Integral) and not isinstance(n_or_positions, bool)
        if self.is_prefix:
            # Kept as n, not arange(n): only the first kv_len positions ever exist (n may be huge).
            self.n = check_int("global_tokens n", n_or_positions, 0)
            return
        try:
            positions = torch.as_tensor(n_or_positions)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            if isinstance(e, OverflowError) or "Overflow" in str(e):
                raise ValueError(
                    f"global token positions must be < 2**63 (int64), got {n_or_positions!r}"
                ) from e
            raise TypeError(
                f"global_tokens takes an int n or a sequence of int positions, got {n_or_positions!r}"
            ) from e
        if positions.numel() == 0:
            positions = positions.long()
        if positions.dtype.is_floating_point or positions.dtype == torch.bool or positions.dim() != 1:
            raise TypeError("global_tokens positions must be a 1-D sequence of ints")
        if len(positions) and int(positions.min()) < 0:
            raise ValueError(f"global token positions must be >= 0, got {int(positions.min())}")
        self.positions = torch.unique(positions.long().cpu())

    def check_lengths(self, q_len, kv_len):
        if not self.is_prefix and len(self.positions) and int(self.positions[-1]) >= kv_len:
            raise ValueError(
                f"global token position {int(self.positions[-1])} is out of range for kv_len={kv_len}"
            )

    def _positions(self, g):
        return torch.arange(min(self.n, g.kv_len)) if self.is_prefix else self.positions

    def visible(self, g, h, i, j):
        positions = self._positions(g)
        return torch.isin(i + g.offset, positions) | torch.isin(j, positions)

    def blocks(self, g):
        nqb, nkb = g.num_q_blocks, g.num_k_blocks
        positions = self._positions(g)
        rows = positions - g.offset
        rows = rows[(rows >= 0) & (rows < g.q_len)]
        rows_in_block = torch.bincount(rows // g.block_q, minlength=nqb)
        cols_in_block = torch.bincount(positions // g.block_k, minlength=nkb)
        all_rows = rows_in_block == g.valid_rows(torch.arange(nqb))
        all_cols = cols_in_block == g.valid_cols(torch.arange(nkb))
        # Whole key-block columns under global keys, and whole query-block rows of global queries.
        col_kb = torch.nonzero(cols_in_block).squeeze(1)
        row_qb = torch.nonzero(rows_in_block).squeeze(1)
        qb = torch.cat([torch.arange(nqb).repeat_interleave(len(col_kb)), row_qb.repeat_interleave(nkb)])
        kb = torch.cat([col_kb.repeat(nqb), torch.arange(nkb).repeat(len(row_qb))])
        key = torch.unique(qb * nkb + kb)
        qb, kb = key // nkb, key % nkb
        full = all_rows[qb] | all_cols[kb]
        # A tile is fixed by which of its rows and which of its columns are global (from_candidates adds
        # the ragged edges): blocks with the same in-block global offsets share one tile.
        row_kind, _ = _offset_kinds(rows, g.block_q, nqb)
        col_kind, n_col_kinds = _offset_kinds(positions, g.block_k, nkb)
        tile_key = row_kind[qb] * n_col_kinds + col_kind[kb]
        return from_candidates(self, g, 1, torch.zeros_like(qb), qb, kb, full, tile_key)

    def __repr__(self):
        if self.is_prefix:
            return f"global_tokens({self.n})"
        return f"global_tokens({self.positions.tolist()})"


def global_tokens(n_or_positions) -> Pattern:
    """Global positions see and are seen by every position.

    An int n means positions 0..n-1 (all of them when the sequence is shorter); explicit positions must
    be < kv_len.
    """
    return GlobalTokens(n_or_positions)
