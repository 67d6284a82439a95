"""The oracle: dense, masked attention in plain PyTorch. Every backend is tested against it.

Imports nothing optional and runs anywhere. It computes in the inputs' dtype, so the same function gives
both the float64 truth (pass float64 inputs) and the error the plain math has in fp16/bf16.
"""

from __future__ import annotations

import math

import torch


def dense_mask(pattern_or_mask, q_len: int, kv_len: int, heads: int, device) -> torch.Tensor:
    """A bool ``[H or 1, q_len, kv_len]`` mask from a Pattern, a BlockLayout, a bool tensor or None;
    ``[B, H or 1, q_len, kv_len]`` for per-batch ones (a per-batch pattern or layout, a 4-D tensor)."""
    from .layout import BlockLayout
    from .patterns import Pattern

    if pattern_or_mask is None:
        return torch.ones(1, q_len, kv_len, dtype=torch.bool, device=device)
    if isinstance(pattern_or_mask, Pattern):
        per_head = pattern_or_mask.num_heads is not None
        m = pattern_or_mask.mask(q_len, kv_len, heads=heads if per_head else None)
        if pattern_or_mask.batch_size is not None and not per_head:
            m = m[:, None]
    elif isinstance(pattern_or_mask, BlockLayout):
        m = pattern_or_mask.to_dense()
    else:
        m = torch.as_tensor(pattern_or_mask)
    if m.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {m.dtype}")
    m = m if m.dim() >= 3 else m[None]
    if m.dim() > 4 or m.shape[-2:] != (q_len, kv_len) or m.shape[-3] not in (1, heads):
        raise ValueError(
            f"mask of shape {tuple(m.shape)} does not fit [B, {heads} or 1, {q_len}, {kv_len}] or "
            f"[{heads} or 1, {q_len}, {kv_len}]"
        )
    return m.to(device)


def attention_reference(
    q, k, v, mask=None, *, scale=None, key_mask=None, softcap=None, alibi_slopes=None, rel_bias=None
):
    """Dense masked attention: ``(out [B, Hq, Sq, D], lse [B, Hq, Sq])`` in q's dtype, natural-log lse.

    `softcap`, `alibi_slopes` and `rel_bias` modify the scores as `sparse_attn.score_mods` says (after
    `scale`, before the mask); the reference is differentiable in `rel_bias` too.
    A query with no visible key gets output 0 and lse -inf; its gradients are 0 and nothing is NaN.
    """
    from .score_mods import check_score_mods, modify_scores, relative_positions

    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[-2]
    group = heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    visible = dense_mask(mask, q_len, kv_len, heads, q.device)
    visible = visible if visible.dim() == 4 else visible[None]  # [B|1, H|1, Sq, Skv]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :].to(q.device)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mods = check_score_mods(softcap, alibi_slopes, rel_bias, q, k)
    if mods is not None:
        rel = relative_positions(
            torch.arange(q_len, device=q.device), torch.arange(kv_len, device=q.device), q_len, kv_len
        )
        heads_idx = torch.arange(heads, device=q.device)[None, :]
        batch_idx = torch.arange(batch, device=q.device)[:, None]
        scores = modify_scores(scores, rel, mods, heads_idx, kv_len, batch_idx)
    scores = scores.masked_fill(~visible, float("-inf"))
    has_key = visible.any(-1)
    # Empty rows: score 0 keeps logsumexp and its gradient finite; the mask then zeroes their weights.
    lse = torch.logsumexp(torch.where(has_key[..., None], scores, torch.zeros_like(scores)), dim=-1)
    probs = torch.exp(scores - lse[..., None]) * visible
    out = torch.matmul(probs.to(v.dtype), v)
    lse = torch.where(has_key, lse, torch.full_like(lse, float("-inf")))
    return out, lse
