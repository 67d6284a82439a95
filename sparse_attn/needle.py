"""A synthetic long-context retrieval task for content-selected blocks (`topk_blocks`).

A few "needle" keys hide among random keys; the queries of the last query blocks each look for one needle
(their direction). A needle is one key of its 64-key block, so its block's mean key carries it diluted
64-fold against the noise of the other keys: whether `topk_blocks(k)` still picks that block, and how much
of dense attention's probability mass the selected blocks keep, is what `selection_quality` measures.
`bench/topk_attention.py` tabulates it for several k; ``notebooks/topk_needle.ipynb`` draws it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .patterns import Pattern, causal, sliding_window, topk_blocks
from .selection import select_layout


@dataclass
class NeedleTask:
    """Inputs ``[1, H, S, D]`` and where the needles are and who looks for them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    needles: torch.Tensor  # int64 [kv_heads, n]: key positions of each KV head's needles
    rows: torch.Tensor  # int64 [m]: the query rows that look for a needle
    target: torch.Tensor  # int64 [m]: the needle (index into needles[g]) row r looks for


def needle_task(
    seq: int = 8192,
    q_heads: int = 4,
    kv_heads: int = 2,
    dim: int = 64,
    needles: int = 8,
    query_tokens: int = 1024,
    strength: float = 2.0,
    block: int = 64,
    seed: int = 0,
) -> NeedleTask:
    """Random keys ~ N(0, 1) with `needles` keys ``strength * u`` per KV head in the first half (``|u|^2 = D``);
    query block b of the last `query_tokens` tokens looks for needle ``b % needles``: its rows are
    ``u + 0.3 * noise`` in every query head of the group. A needle block's mean key scores about `strength`
    standard deviations above a noise block's."""
    gen = torch.Generator().manual_seed(seed)
    group = q_heads // kv_heads
    k = torch.randn(1, kv_heads, seq, dim, generator=gen)
    v = torch.randn(1, kv_heads, seq, dim, generator=gen)
    q = 0.3 * torch.randn(1, q_heads, seq, dim, generator=gen)
    directions = torch.nn.functional.normalize(torch.randn(kv_heads, needles, dim, generator=gen), dim=-1)
    directions *= math.sqrt(dim)
    positions = torch.stack([torch.randperm(seq // 2, generator=gen)[:needles] for _ in range(kv_heads)])
    for g in range(kv_heads):
        k[0, g, positions[g]] = strength * directions[g]
    rows = torch.arange(seq - query_tokens, seq)
    target = (rows // block) % needles
    for g in range(kv_heads):
        q[0, g * group : (g + 1) * group, rows] += directions[g, target]
    return NeedleTask(q, k, v, positions, rows, target)


def selection_quality(task: NeedleTask, pattern: Pattern, *, block_size: int = 64) -> dict:
    """How well `pattern` (e.g. ``topk_blocks(8) & causal()``) serves the task's queries.

    ``mass``: the fraction of dense causal attention's probability mass that falls on the pairs the
    pattern keeps, averaged over the looking rows and query heads; ``recall``: the fraction of (row, head)
    whose needle is kept; ``density``: the layout's density over the whole sequence."""
    q, k = task.q, task.k
    layout = select_layout(pattern, q, k, block_size=block_size)
    group = q.shape[1] // k.shape[1]
    # Dense causal attention of the looking rows only: [H, m, S].
    keys = k[0].repeat_interleave(group, 0)
    scores = q[0, :, task.rows] @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.arange(q.shape[2])[None, None, :] > task.rows[None, :, None], -math.inf)
    probs = scores.softmax(-1)
    kept = layout.to_dense()[0].expand(q.shape[1], -1, -1)[:, task.rows]
    needle = task.needles.repeat_interleave(group, 0)[:, task.target]  # [H, m]
    found = kept.gather(-1, needle[..., None])[..., 0]
    return {
        "mass": float((probs * kept).sum(-1).mean()),
        "recall": float(found.float().mean()),
        "density": layout.density(),
        "dense_mass_on_needle": float(probs.gather(-1, needle[..., None]).mean()),
    }


def quality_table(task: NeedleTask, ks=(4, 8, 16, 32), *, block_size: int = 64) -> list[dict]:
    """`selection_quality` of ``topk_blocks(k) & causal()`` for each k, and of a causal sliding window of
    the same number of keys per query block (the same density, chosen by position instead of content)."""
    table = []
    for kk in ks:
        row = {"k": kk, **selection_quality(task, topk_blocks(kk) & causal(), block_size=block_size)}
        window = selection_quality(task, sliding_window(kk * block_size - 1, 0), block_size=block_size)
        row["window_mass"], row["window_recall"] = window["mass"], window["recall"]
        table.append(row)
    return table
