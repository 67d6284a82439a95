"""sparse-attn: exact block-sparse attention with analytic layouts, Triton kernels and a PyTorch backend."""

from .api import sparse_attention
from .layout import BlockLayout
from .merge import merge_attention
from .modules import SparseAttention, SparseMultiheadAttention, replace_attention
from .paged import PagedKVCache, sparse_attention_offloaded, sparse_attention_paged
from .patterns import (
    Pattern,
    bigbird,
    block_sparse,
    causal,
    chunked,
    dilated,
    documents,
    global_tokens,
    longformer,
    neighborhood,
    per_head,
    random_blocks,
    sliding_tile,
    sliding_window,
    tile_major,
    topk_blocks,
)
from .reference import attention_reference
from .selection import select_layout
from .varlen import sparse_attention_varlen

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "PagedKVCache",
    "Pattern",
    "SparseAttention",
    "SparseMultiheadAttention",
    "attention_reference",
    "bigbird",
    "block_sparse",
    "causal",
    "chunked",
    "dilated",
    "documents",
    "global_tokens",
    "longformer",
    "neighborhood",
    "merge_attention",
    "per_head",
    "random_blocks",
    "replace_attention",
    "select_layout",
    "sliding_tile",
    "sliding_window",
    "sparse_attention",
    "sparse_attention_offloaded",
    "sparse_attention_paged",
    "sparse_attention_varlen",
    "tile_major",
    "topk_blocks",
]
