"""Backends: each module offers ``attention(q, k, v, layout, scale, key_mask) -> (out, lse)`` and
``DEFAULT_BLOCK_SIZE``; `sparse_attn.api` picks one."""
