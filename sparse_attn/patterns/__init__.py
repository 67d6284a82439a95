"""Pattern generators: small, pure token predicates that enumerate their own blocks."""

from .base import Pattern, per_head
from .block_sparse import block_sparse, random_blocks
from .compositions import bigbird, longformer
from .global_tokens import global_tokens
from .window import causal, dilated, sliding_window

__all__ = [
    "Pattern",
    "bigbird",
    "block_sparse",
    "causal",
    "dilated",
    "global_tokens",
    "longformer",
    "per_head",
    "random_blocks",
    "sliding_window",
]
