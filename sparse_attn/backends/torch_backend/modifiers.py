"""Score modifiers on the ATen engine: a segment's attention computed explicitly (scores, modifiers, mask,
softmax) in place of the fused kernel, which takes only an additive mask.

Used only when a call has modifiers. The math is `sparse_attn.score_mods.modify_scores` on each segment's
scores ``[X, kernel_heads, stacked_heads * bq, keys]``, viewed as ``[X, kernel_heads, stacked_heads, bq, keys]``
so that every stacked query head gets its own slope and bias row. The backward recomputes the scores from
the row's final lse and out (as the fused backward does), and returns the segment's per-diagonal sums of
dS for `rel_bias`.
"""

from __future__ import annotations

import torch

from ...score_mods import ScoreMods, modify_scores
from .calls import Call


class SegmentModifiers:
    """Where one segment's scores sit: query heads, batch elements and ``j - qpos`` of every score."""

    def __init__(self, mods: ScoreMods, problem, call: Call, blocks: torch.Tensor, n_keys: int):
        self.mods = mods
        self.problem = problem
        seq = problem.frame.q_seq[call.rows // problem.nqb]  # [X, kernel_heads, stacked_heads]
        self.heads, self.batch = seq % problem.hq, seq // problem.hq
        rows = (call.rows % problem.nqb)[:, None] * problem.bq + torch.arange(problem.bq)  # [X, bq]
        keys = (blocks[:, :, None] * problem.bk + torch.arange(problem.bk)).reshape(len(blocks), -1)
        keys = keys[:, :n_keys]  # [X, n_keys]
        rel = keys[:, None, :] - (rows[:, :, None] + (problem.kv_len - problem.q_len))
        # Padding rows and keys past the end (hidden by the mask) would index outside rel_bias.
        self.rel = rel.clamp(-(problem.kv_len - 1), problem.q_len - 1)[:, None, None]  # [X, 1, 1, bq, N]

    def scores(self, qg: torch.Tensor, kseg: torch.Tensor, mask, acc) -> tuple[torch.Tensor, torch.Tensor]:
        """(modified and masked scores, raw scaled scores) ``[X, kernel_heads, M, N]`` in `acc`."""
        raw = torch.matmul(qg.to(acc), kseg.to(acc).transpose(-1, -2)) * self.problem.scale
        x, kh, m, n = raw.shape
        five = raw.view(x, kh, -1, self.problem.bq, n)
        batch = None if self.mods.alibi_slopes is None else self.batch
        s = modify_scores(five, self.rel, self.mods, self.heads, self.problem.kv_len, batch).view(x, kh, m, n)
        return (s if mask is None else s + mask.to(acc)), raw

    def diagonal_sums(self, ds: torch.Tensor) -> torch.Tensor:
        """Per-diagonal sums of dS ``[X, kernel_heads, M, N]``: ``[Hq * (Sq + Skv - 1)]`` (flat)."""
        x, kh, m, n = ds.shape
        width = self.problem.q_len + self.problem.kv_len - 1
        diag = self.rel + (self.problem.kv_len - 1)
        index = self.heads[..., None, None] * width + diag  # [X, kernel_heads, stacked_heads, bq, N]
        index = index.expand(x, kh, m // self.problem.bq, self.problem.bq, n).reshape(-1)
        return ds.new_zeros(self.problem.hq * width).index_add_(0, index, ds.reshape(-1))


def forward_segment(qg, kseg, vseg, mask, seg: SegmentModifiers):
    """``(out like qg, lse)`` of one segment with modifiers; rows that see no key get out 0, lse -inf."""
    acc = torch.float64 if qg.dtype == torch.float64 else torch.float32
    s, _ = seg.scores(qg, kseg, mask, acc)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0)[..., None])
    return torch.matmul(p, vseg.to(acc)).to(qg.dtype), lse


def backward_segment(dog, qg, kseg, vseg, og, lg, mask, seg: SegmentModifiers):
    """``(dq, dk, dv, d_rel_bias or None)`` of one segment, from the row's final out `og` and lse `lg`
    (+inf on rows with no key, whose probabilities then recompute to 0)."""
    acc = torch.float64 if qg.dtype == torch.float64 else torch.float32
    s, raw = seg.scores(qg, kseg, mask, acc)
    p = torch.exp(s - lg.to(acc)[..., None])
    dog, vseg = dog.to(acc), vseg.to(acc)
    delta = (dog * og.to(acc)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(dog, vseg.transpose(-1, -2)) - delta)
    d_rel_bias = seg.diagonal_sums(ds) if seg.mods.rel_bias is not None else None
    if seg.mods.softcap is not None:
        ds = ds * (1 - torch.tanh(raw / seg.mods.softcap) ** 2)
    scale = seg.problem.scale
    dq = torch.matmul(ds, kseg.to(acc)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qg.to(acc)) * scale
    dv = torch.matmul(p.transpose(-1, -2), dog)
    return dq, dk, dv, d_rel_bias
