"""How one sequence is cut into the shards of P ranks, and helpers to shard and unshard a tensor.

The sequence of S positions is cut into C equal chunks. Rank r holds the concatenation of its chunks, in
sequence order:
- ``"contiguous"`` (C = P): rank r holds chunk r, positions ``[r * S/P, (r + 1) * S/P)`` (the contract's
  default);
- ``"zigzag"`` (C = 2P): rank r holds chunks r and 2P - 1 - r, as ring-flash-attention's zigzag order. Under
  a causal pattern an early chunk has little work and a late one much, so every rank gets about the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_size

ORDERS = ("contiguous", "zigzag")


def check_order(order) -> str:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return order


@dataclass(frozen=True)
class Sharding:
    """Which chunks of a `seq_len`-position sequence each of `world` ranks holds."""

    seq_len: int
    world: int
    order: str = "contiguous"

    def __post_init__(self):
        check_order(self.order)
        if self.world < 1:
            raise ValueError(f"world size must be >= 1, got {self.world}")
        if self.seq_len < 1 or self.seq_len % self.num_chunks:
            raise ValueError(
                f"order={self.order!r} cuts the sequence into {self.num_chunks} equal chunks over "
                f"{self.world} ranks; seq_len={self.seq_len} is not a positive multiple of {self.num_chunks}"
            )

    @property
    def num_chunks(self) -> int:
        return self.world * (2 if self.order == "zigzag" else 1)

    @property
    def chunk_len(self) -> int:
        return self.seq_len // self.num_chunks

    @property
    def shard_len(self) -> int:
        return self.seq_len // self.world

    def chunks_of(self, rank: int) -> list[int]:
        """The chunks rank `rank` holds, in sequence order (which is also their order in its shard)."""
        if self.order == "zigzag":
            return [rank, self.num_chunks - 1 - rank]
        return [rank]

    def chunk_owner(self) -> torch.Tensor:
        """int64 ``[C]``: the rank holding each chunk."""
        owner = torch.empty(self.num_chunks, dtype=torch.int64)
        for rank in range(self.world):
            owner[self.chunks_of(rank)] = rank
        return owner

    def positions(self, rank: int) -> torch.Tensor:
        """int64 ``[S/P]``: the sequence positions of rank `rank`'s shard, in shard order."""
        n = self.chunk_len
        return torch.cat([torch.arange(c * n, (c + 1) * n) for c in self.chunks_of(rank)])


def _check_rank(rank, world_size):
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, *, order="contiguous", dim: int = 2):
    """Rank `rank`'s shard of the whole-sequence tensor `x` (sequence along `dim`, 2 for ``[B, H, S, D]``)."""
    world_size = check_size("world_size", world_size)
    sharding = Sharding(x.shape[dim], world_size, order)
    _check_rank(rank, world_size)
    n = sharding.chunk_len
    return torch.cat([x.narrow(dim, c * n, n) for c in sharding.chunks_of(rank)], dim)


def unshard_sequence(shards, *, order="contiguous", dim: int = 2) -> torch.Tensor:
    """The whole-sequence tensor from every rank's shard (a list in rank order): inverse of `shard_sequence`."""
    shards = list(shards)
    if not shards:
        raise ValueError("unshard_sequence needs the shards of every rank, got none")
    sharding = Sharding(shards[0].shape[dim] * len(shards), len(shards), order)
    n = sharding.chunk_len
    pieces = [None] * sharding.num_chunks
    for rank, shard in enumerate(shards):
        if shard.shape != shards[0].shape:
            raise ValueError(f"every shard must have one shape; shard {rank} is {tuple(shard.shape)}")
        for k, c in enumerate(sharding.chunks_of(rank)):
            pieces[c] = shard.narrow(dim, k * n, n)
    return torch.cat(pieces, dim)
