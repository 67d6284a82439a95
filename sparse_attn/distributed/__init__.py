"""Context parallelism: sparse attention over one sequence sharded across a `torch.distributed` group.

A rank receives only the K/V blocks its query rows keep, as the pattern's layout says before anything
runs (a sliding window needs its neighbours' edges, not the whole sequence); rows that keep many blocks
of a peer but share them with no other row (global queries) send their queries instead and merge the
partial results through their logsumexps. See `plan` for the rules, `attention` for the exchanges.
"""

from .attention import (
    ContextParallelAttention,
    communication_plan,
    context_parallel_attention,
    reset_traffic,
    traffic,
)
from .plan import CommVolume
from .sharding import ORDERS, shard_sequence, unshard_sequence

__all__ = [
    "ORDERS",
    "CommVolume",
    "ContextParallelAttention",
    "communication_plan",
    "context_parallel_attention",
    "reset_traffic",
    "shard_sequence",
    "traffic",
    "unshard_sequence",
]
