"""Pattern generators: small, pure token predicates that enumerate their own blocks."""

from .base import Pattern, per_head
from .block_sparse import block_sparse, random_blocks
from .chunked import chunked
from .compositions import bigbird, longformer
from .documents import documents
from .global_tokens import global_tokens
from .grid import neighborhood, sliding_tile, tile_major
from .token_mask import TokenMask
from .topk import topk_blocks
from .window import causal, dense, dilated, sliding_window, top_left_causal

__all__ = [
    "Pattern",
    "TokenMask",
    "bigbird",
    "block_sparse",
    "causal",
    "chunked",
    "dense",
    "dilated",
    "documents",
    "global_tokens",
    "longformer",
    "neighborhood",
    "per_head",
    "random_blocks",
    "sliding_tile",
    "sliding_window",
    "tile_major",
    "topk_blocks",
    "top_left_causal",
]
