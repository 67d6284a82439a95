"""Decoding over paged KV caches: `sparse_attention_paged`, the `PagedKVCache` that keeps page summaries
for top-k decoding, and attention over host-offloaded pages (`sparse_attention_offloaded`)."""

from .api import sparse_attention_paged

__all__ = ["sparse_attention_paged"]
