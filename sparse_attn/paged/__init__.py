"""Decoding over paged KV caches: `sparse_attention_paged`, the `PagedKVCache` that keeps page summaries
for top-k decoding, and attention over host-offloaded pages (`sparse_attention_offloaded`). Forward only."""

from .api import sparse_attention_paged
from .cache import PagedKVCache
from .offload import sparse_attention_offloaded

__all__ = ["PagedKVCache", "sparse_attention_offloaded", "sparse_attention_paged"]
