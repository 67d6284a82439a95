"""`TokenMask`: an explicit token mask as a pattern (what `SparseMultiheadAttention` intersects nn's masks with)."""

from __future__ import annotations

import torch

from ._blockset import from_candidates
from .base import Pattern


class TokenMask(Pattern):
    """An explicit token mask as a pattern: visible iff ``mask[h, i, j]`` (row index i), O(S^2)."""

    def __init__(self, mask: torch.Tensor):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() not in (2, 3):
            raise TypeError("TokenMask takes a bool tensor [q_len, kv_len] or [H, q_len, kv_len]")
        self.num_heads = mask.shape[0] if mask.dim() == 3 else None
        self.cells = (mask if mask.dim() == 3 else mask[None]).detach().cpu()

    def check_lengths(self, q_len, kv_len):
        if tuple(self.cells.shape[1:]) != (q_len, kv_len):
            raise ValueError(
                f"mask of shape {tuple(self.cells.shape[1:])} does not fit q_len={q_len}, kv_len={kv_len}"
            )

    def visible(self, g, h, i, j):
        h = h if self.num_heads is not None else torch.zeros_like(h)
        # Clamped: rows and keys past the sequence (padding of ragged tiles) are masked by the caller.
        return self.cells[h, i.clamp(max=g.q_len - 1), j.clamp(max=g.kv_len - 1)]

    def blocks(self, g):
        heads = self.cells.shape[0]
        nqb, nkb = g.num_q_blocks, g.num_k_blocks
        padded = torch.zeros(heads, nqb * g.block_q, nkb * g.block_k, dtype=torch.int32)
        padded[:, : g.q_len, : g.kv_len] = self.cells
        counts = padded.view(heads, nqb, g.block_q, nkb, g.block_k).sum((2, 4))
        h, qb, kb = torch.nonzero(counts, as_tuple=True)
        full = counts[h, qb, kb] == g.valid_rows(qb) * g.valid_cols(kb)
        return from_candidates(self, g, heads, h, qb, kb, full, (h * nqb + qb) * nkb + kb)

    def __repr__(self):
        return f"TokenMask({tuple(self.cells.shape)})"
