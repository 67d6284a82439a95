"""PyTorch backend. Interim: dense math over the layout's token mask (exact, O(S^2) memory)."""

from __future__ import annotations

import torch

from .._ops import lse_dtype
from ..reference import attention_reference, dense_mask

DEFAULT_BLOCK_SIZE = 64


def forward(q, k, v, layout, scale, key_mask):
    out, lse = attention_reference(q, k, v, layout, scale=scale, key_mask=key_mask)
    return out, lse.to(lse_dtype(q.dtype))


def backward(do, dlse, q, k, v, out, lse, layout, scale, key_mask):
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    visible = dense_mask(layout, q.shape[2], k.shape[2], q.shape[1], q.device)[None]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    lse = lse.to(q.dtype)
    probs = torch.exp(
        torch.matmul(q, kr.transpose(-1, -2)) * scale - lse.masked_fill(lse.isinf(), 0)[..., None]
    )
    probs = probs * visible
    delta = (do * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(q.dtype).masked_fill(lse.isinf(), 0)
    dp = torch.matmul(do, vr.transpose(-1, -2))
    ds = probs * (dp - delta[..., None]) * scale
    dq = torch.matmul(ds, kr)
    dk = torch.matmul(ds.transpose(-1, -2), q).unflatten(1, (-1, group)).sum(2)
    dv = torch.matmul(probs.transpose(-1, -2), do).unflatten(1, (-1, group)).sum(2)
    return dq, dk, dv
