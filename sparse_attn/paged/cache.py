"""`PagedKVCache`: a paged KV cache that keeps a summary of every page beside it, for top-k decoding.

The summary of a page is the float32 sum of its keys (per KV head), updated on `append`; with the number
of keys a page holds (known from the lengths) it gives the page's mean key, which is `topk_blocks`' key
block score term. A `topk_blocks` pattern then scores ``max_pages`` page means instead of reading every key
(Quest and MoBA score pages the same way, by min/max or mean keys): a step reads the summaries and only
the pages it selects.
"""

from __future__ import annotations

import torch

from ..checks import check_int
from ..patterns.topk import selects
from .api import paged_attention


class PagedKVCache:
    """Pages of keys and values for `batch` sequences of up to `capacity` positions each.

    Each sequence owns ``ceil(capacity / page_size)`` pages; `block_table` maps its logical pages to them
    (sequence b gets pages ``b * max_pages ...``, a permutation any allocator may replace by writing
    `block_table` before the first append). `k_cache`/`v_cache` are ``[num_pages, page_size, Hkv, D]``,
    `cache_seqlens` int32 ``[B]``, `key_sums` float32 ``[num_pages, Hkv, D]``.
    """

    def __init__(
        self, batch, capacity, kv_heads, head_dim, *, page_size=64, dtype=torch.float16, device=None
    ):
        batch, capacity = check_int("batch", batch, 1), check_int("capacity", capacity, 1)
        kv_heads, head_dim = check_int("kv_heads", kv_heads, 1), check_int("head_dim", head_dim, 1)
        self.page_size = check_int("page_size", page_size, 1)
        max_pages = -(-capacity // page_size)
        shape = (batch * max_pages, page_size, kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.key_sums = torch.zeros(shape[0], kv_heads, head_dim, dtype=torch.float32, device=device)
        self.block_table = torch.arange(shape[0], dtype=torch.int32, device=device).view(batch, max_pages)
        self.cache_seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def capacity(self) -> int:
        return self.block_table.shape[1] * self.page_size

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ``[B, Hkv, T, D]`` (SDPA's layout) at positions ``cache_seqlens[b] ...`` of
        every sequence, add the keys to their pages' sums and advance the lengths by T."""
        want = (self.block_table.shape[0], self.k_cache.shape[2], k.shape[2], self.k_cache.shape[3])
        if k.shape != v.shape or tuple(k.shape) != want:
            raise ValueError(
                f"k and v must be [B, Hkv, T, D] = {list(want)}, got {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if k.dtype != self.k_cache.dtype or v.dtype != self.k_cache.dtype:
            raise TypeError(f"k and v must be {self.k_cache.dtype}, got {k.dtype}, {v.dtype}")
        steps = k.shape[2]
        if not torch.compiler.is_compiling() and int(self.cache_seqlens.max()) + steps > self.capacity:
            raise ValueError(f"appending {steps} positions overflows the cache's capacity of {self.capacity}")
        pos = self.cache_seqlens.long()[:, None] + torch.arange(steps, device=k.device)  # [B, T]
        page = torch.gather(self.block_table.long(), 1, pos // self.page_size)
        row = pos % self.page_size
        keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [B, T, Hkv, D]
        self.k_cache[page, row] = keys
        self.v_cache[page, row] = values
        self.key_sums.index_put_((page,), keys.float(), accumulate=True)
        self.cache_seqlens += steps

    def page_means(self) -> torch.Tensor:
        """float32 ``[B, Hkv, max_pages, D]``: each page's mean key (0 for an empty page)."""
        max_pages = self.block_table.shape[1]
        starts = torch.arange(max_pages, device=self.block_table.device) * self.page_size
        counts = (self.cache_seqlens.long()[:, None] - starts).clamp(0, self.page_size)  # [B, max_pages]
        sums = self.key_sums[self.block_table.long()]  # [B, max_pages, Hkv, D]
        return (sums / counts.clamp(min=1)[..., None, None]).permute(0, 2, 1, 3)

    def attention(self, q, pattern, **kwargs):
        """`sparse_attention_paged` over this cache (``q [B, Hq, Sq, D]``, the queries' keys already appended);
        a `topk_blocks` pattern scores the kept page means instead of reading the keys."""
        return paged_attention(
            q, self.k_cache, self.v_cache, self.block_table, self.cache_seqlens, pattern,
            page_means=self.page_means() if selects(pattern) else None, **kwargs,
        )  # fmt: skip
