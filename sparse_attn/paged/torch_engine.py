"""Split-KV decode on the CPU (or any device) with ATen ops: the listed pages are cut into `num_splits`
groups, every (batch, KV head, split) is one matrix product in a batched matmul (ATen runs those batches
on its threads, so a batch of one with a long cache still uses every core), and each split returns its
partial output and logsumexp for the merge (`sparse_attn.merge`).

Only the listed pages are gathered (read); a key whose bias is -inf for every query row of its KV head
is zeroed before it is used, so garbage (NaN) past a sequence's end never reaches an output.
"""

from __future__ import annotations

import torch

from ..api import _constant_at_trace_time


def decode_partials(q, k_cache, v_cache, phys, bias, scale: float, softcap, num_splits: int):
    """Partial attention per split: ``(out [B, Hq, S, Sq, D], lse [B, Hq, S, Sq])`` in float32 (float64
    for float64 inputs). `phys` int ``[B, Hp, P]``: physical pages (-1: none); `bias` float32
    ``[B, Hb, Sq, P * page_size]`` (-inf: not visible)."""
    batch, hq, q_len, dim = q.shape
    _, page_size, hkv, _ = k_cache.shape
    group = hq // hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    count = phys.shape[-1]
    splits = max(1, min(num_splits, count))
    per_split = -(-count // splits)
    pad = splits * per_split - count
    phys = torch.nn.functional.pad(phys, (0, pad), value=-1)
    bias = torch.nn.functional.pad(bias, (0, pad * page_size), value=float("-inf"))
    k, v = _gather(k_cache, phys), _gather(v_cache, phys)  # the read: [B, Hkv, S * C * page_size, D]
    keys = per_split * page_size
    k = k.unflatten(2, (splits, keys)).to(acc)
    v = v.unflatten(2, (splits, keys)).to(acc)
    bias = _rows_by_split(bias, batch, hkv, group, q_len, splits, keys)  # [B, Hkv|1, S, G*Sq, keys]
    # A page of -1 is not read: its keys are invisible whatever the bias says.
    listed = (phys >= 0).repeat_interleave(page_size, -1).view(batch, phys.shape[1], splits, 1, keys)
    visible = (bias > float("-inf")) & listed
    seen = visible.any(-2)[..., None]  # [B, Hkv|1, S, keys, 1]
    if torch.compiler.is_compiling() or not bool(seen.all()):
        # Values no row sees may be garbage (NaN past a sequence's end): zeroed in the gathered copy, so
        # that 0 * NaN never happens (a garbage key only makes a score that `where` below replaces).
        v = v.masked_fill(~seen, 0.0)
    rows = q.reshape(batch, hkv, 1, group * q_len, dim).to(acc)
    scores = torch.matmul(rows, k.transpose(-1, -2)) * scale  # [B, Hkv, S, G*Sq, keys]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = torch.where(visible, scores + bias, float("-inf"))
    peak = scores.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    probs = torch.exp(scores - peak)
    total = probs.sum(-1, keepdim=True)
    out = torch.matmul(probs, v) / total.clamp(min=torch.finfo(acc).tiny)
    lse = torch.where(total > 0, peak + torch.log(total), float("-inf"))[..., 0]
    out = out.view(batch, hkv, splits, group, q_len, dim).permute(0, 1, 3, 2, 4, 5)
    lse = lse.view(batch, hkv, splits, group, q_len).permute(0, 1, 3, 2, 4)
    return out.reshape(batch, hq, splits, q_len, dim), lse.reshape(batch, hq, splits, q_len)


def _gather(cache, phys):
    """The listed pages of `cache` ``[num_pages, ps, Hkv, D]`` as ``[B, Hkv, P * ps, D]`` (a strided view
    of one copy): whole pages by `index_select` (row copies) when every KV head reads the same pages."""
    batch, listed = phys.shape[0], phys.shape[-1]
    _, page_size, hkv, dim = cache.shape
    index = phys.clamp(min=0)
    if phys.shape[1] == 1:
        pages = cache.index_select(0, index.reshape(-1))  # [B * P, ps, Hkv, D]
        return pages.view(batch, listed * page_size, hkv, dim).transpose(1, 2)
    heads = torch.arange(hkv, device=cache.device)[None, :, None]
    return cache.transpose(1, 2)[index, heads].flatten(2, 3)


def _rows_by_split(bias, batch, hkv, group, q_len, splits, keys):
    """``[B, Hb, Sq, S * keys]`` -> ``[B, Hkv or 1, S, G * Sq, keys]`` (rows ordered head-major as q's)."""
    per_head = bias.shape[1] > 1
    heads, g = (hkv, group) if per_head else (1, 1)
    bias = bias.view(batch, heads, g, q_len, splits, keys).permute(0, 1, 4, 2, 3, 5)
    bias = bias.expand(batch, heads, splits, group, q_len, keys)
    return bias.reshape(batch, heads, splits, group * q_len, keys)


@_constant_at_trace_time  # torch.compile cannot trace get_num_threads; the count is fixed per graph
def default_splits(batch: int, kv_heads: int, pages: int) -> int:
    """Enough splits that ``batch * kv_heads * splits`` covers the threads."""
    want = torch.get_num_threads()
    return max(1, min(pages, -(-want // (batch * kv_heads))))
