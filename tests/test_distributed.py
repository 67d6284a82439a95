"""Context parallelism: 2 and 4 gloo processes (CPU, loopback) against single-process `sparse_attention`.

One spawn per world size runs every case of that size (a fresh process costs seconds to import torch).
Each case checks, on every rank: out, lse and the gradients of the rank's q, k, v shards against the rank's
rows of one process attending over the whole sequence; the bytes actually sent to and received from each
peer, forward and backward, against `communication_plan`; and no byte at all between ranks whose rows
share no visible (query, key) pair, from the token mask itself. A child's failure fails the test with its
traceback (and stops the other children); a hang hits the process group's and the spawn's timeouts.
"""

from __future__ import annotations

import os
import re
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparse_attn as sa
from sparse_attn.distributed import (
    ContextParallelAttention,
    communication_plan,
    context_parallel_attention,
    reset_traffic,
    shard_sequence,
    traffic,
    unshard_sequence,
)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

README = Path(__file__).resolve().parent.parent / "README.md"
F32, BF16 = torch.float32, torch.bfloat16


def _case(
    pattern, shard_len, *, heads=2, kv_heads=2, dim=16, dtype=F32, order="contiguous", batch=1, **flags
):
    return dict(
        pattern=pattern, shard_len=shard_len, heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype,
        order=order, batch=batch, **flags,
    )  # fmt: skip


def _cases(world: int) -> list[dict]:
    """Built in the child (patterns hold tensors); shard lengths of 64 are whole blocks, others are padded."""
    g = torch.Generator().manual_seed(3)
    if world == 2:
        cells = torch.rand(2, 8, 8, generator=g) < 0.3
        return [
            _case(
                sa.sliding_window(20), 96, kv_heads=1, batch=2, module=True, strided=True
            ),  # GQA, padded shards
            _case(sa.dilated(6, dilation=3), 128, dtype=BF16),
            _case(sa.causal(), 100, kv_heads=1, dtype=BF16, order="zigzag"),
            _case(sa.longformer(16, 3), 256),  # the global query row is pushed
            _case(sa.block_sparse(cells, 32), 128, order="zigzag"),  # per-head user layout
            _case(sa.per_head([sa.sliding_window(8, 0), sa.causal()]), 128, kv_heads=1),
            _case(sa.global_tokens([5, 200]), 160, dtype=BF16),
        ]
    return [
        _case(sa.sliding_window(20), 64, deterministic=True),
        _case(sa.causal(), 128, kv_heads=1, order="zigzag"),
        _case(sa.causal(), 96, dtype=BF16),
        _case(sa.bigbird(16, 4, 2, block_size=16, heads=2), 96, kv_heads=1, dtype=BF16),
        _case(sa.longformer(16, [5, 300]), 128, order="zigzag"),
        _case(sa.random_blocks(2, 32, seed=1) & sa.causal(), 80),
    ]


def _visible_between(pattern, sharding_positions, heads) -> torch.Tensor:
    """bool [P, P]: does any row of rank r see any key of rank p (token level, any head)?"""
    seq_len = sum(len(p) for p in sharding_positions)
    mask = pattern.mask(seq_len, heads=heads if pattern.num_heads else None)
    mask = mask.any(0) if mask.dim() == 3 else mask
    world = len(sharding_positions)
    return torch.tensor(
        [
            [bool(mask[sharding_positions[r]][:, sharding_positions[p]].any()) for p in range(world)]
            for r in range(world)
        ]
    )


def _traffic_matches(rank, world, matrix):
    seen = traffic()
    for peer in range(world):
        if peer != rank:
            assert seen["sent"].get(peer, 0) == int(matrix[rank, peer]), (peer, seen, matrix)
            assert seen["received"].get(peer, 0) == int(matrix[peer, rank]), (peer, seen, matrix)


def _reference(world: int, c: dict) -> dict:
    """Inputs, and one process's out, lse and gradients over the whole sequence (computed by the parent:
    a child's first `sparse_attention` call would import torch._dynamo, seconds per process)."""
    seq_len = c["shard_len"] * world
    g = torch.Generator().manual_seed(seq_len)
    b, hq, hkv, d, dtype = c["batch"], c["heads"], c["kv_heads"], c["dim"], c["dtype"]
    r = {"q": torch.randn(b, hq, seq_len, d, generator=g).to(dtype)}
    r["k"], r["v"] = (torch.randn(b, hkv, seq_len, d, generator=g).to(dtype) for _ in range(2))
    r["d_out"] = torch.randn(b, hq, seq_len, d, generator=g).to(dtype)
    r["d_lse"] = torch.randn(b, hq, seq_len, generator=g)
    full = [r[n].clone().requires_grad_() for n in "qkv"]
    out, lse = sa.sparse_attention(*full, c["pattern"], return_lse=True)
    _loss(out, lse, r, lambda t: t).backward()
    r["out"], r["lse"] = out.detach(), lse.detach()
    for n, t in zip("qkv", full, strict=True):
        r[f"d{n}"] = t.grad
    return r


def _loss(out, lse, r, rows):
    # A gradient into lse too (it reaches the backward as dlse); rows with no key have lse -inf.
    return (out.float() * rows(r["d_out"]).float()).sum() + (
        torch.where(lse.isfinite(), lse, 0) * rows(r["d_lse"])
    ).sum()


def _check(rank: int, world: int, group, c: dict, r: dict) -> None:
    pattern, seq_len, order = c["pattern"], c["shard_len"] * world, c["order"]
    b, hq, hkv, d, dtype = c["batch"], c["heads"], c["kv_heads"], c["dim"], c["dtype"]
    mine = lambda t: shard_sequence(t, rank, world, order=order)  # noqa: E731
    loss = lambda out, lse, rows: _loss(out, lse, r, rows)  # noqa: E731

    volume = communication_plan(
        pattern, seq_len, world, heads=hq, kv_heads=hkv, head_dim=d, batch=b, dtype=dtype, order=order
    )
    shards = [mine(r[n]).clone() for n in "qkv"]
    if c.get("strided"):  # [B, S, H, D] memory seen as [B, H, S, D], as a model's projections give
        shards = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in shards]
    shards = [t.requires_grad_() for t in shards]
    reset_traffic()
    if c.get("module"):
        out_s, lse_s = ContextParallelAttention(pattern, group=group, order=order)(*shards, return_lse=True)
    else:
        out_s, lse_s = context_parallel_attention(*shards, pattern, group=group, return_lse=True, order=order)
    _traffic_matches(rank, world, volume.forward)
    reset_traffic()
    loss(out_s, lse_s, mine).backward()
    _traffic_matches(rank, world, volume.backward)

    def close(got, want, name):
        # bf16: partial sums (a peer's dK/dV of a shared key, a pushed row's partial output) are rounded to
        # bf16 before they are added, so the error scales with the tensor's magnitude, as in any bf16 reduction.
        rtol, atol = (2e-5, 2e-5) if dtype == F32 else (2e-2, 2e-2 * max(1.0, float(want.abs().max())))
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")

    close(out_s, mine(r["out"]), "out")
    close(lse_s, mine(r["lse"]), "lse")
    for name, got in zip("qkv", shards, strict=True):
        close(got.grad, mine(r[f"d{name}"]), f"d{name}")

    # Ranks that share no visible pair exchange nothing, either way.
    positions = [
        shard_sequence(torch.arange(seq_len)[None, None, :, None], p, world, order=order).flatten()
        for p in range(world)
    ]
    sees = _visible_between(pattern, positions, hq)
    for peer in range(world):
        if peer != rank and not (sees[rank, peer] or sees[peer, rank]):
            assert volume.forward[rank, peer] == volume.forward[peer, rank] == 0
            assert volume.backward[rank, peer] == volume.backward[peer, rank] == 0

    if c.get("deterministic"):
        grads = [t.grad.clone() for t in shards]
        for t in shards:
            t.grad = None
        again = context_parallel_attention(*shards, pattern, group=group, return_lse=True, order=order)
        loss(*again, mine).backward()
        assert all(torch.equal(a, t.grad) for a, t in zip(grads, shards, strict=True))


def _readme_script() -> str:
    section = README.read_text().split("## Context parallelism", 1)[1]
    return re.search(r"```py\n(.*?)```", section, flags=re.S).group(1)


def _worker(rank: int, store: str, refs: str, readme_port: int, log: str) -> None:
    """4 processes: the 4-rank cases on the world, then the 2-rank cases on the subgroups {0, 2} and {1, 3}
    at once (group ranks differ from global ranks), then the README's example on 2 of them."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)  # several processes on a small machine: no oversubscription
    timeout = timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=4, timeout=timeout)
    try:
        pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        references = torch.load(refs)
        for world, group in ((4, None), (2, pairs[rank % 2])):
            group_rank = dist.get_rank(group)
            for number, (c, r) in enumerate(zip(_cases(world), references[world], strict=True)):
                start = time.perf_counter()
                try:
                    _check(group_rank, world, group, c, r)
                except Exception as error:
                    raise AssertionError(
                        f"world {world}, case {number} ({c['pattern']!r}, {c}) failed"
                    ) from error
                with open(f"{log}.{rank}", "a") as f:
                    f.write(
                        f"{world} ranks, case {number} {c['pattern']!r}: {time.perf_counter() - start:.2f} s\n"
                    )
    finally:
        dist.destroy_process_group()
    # The README's example as `torchrun --nproc-per-node 2` runs it (env:// rendezvous from the environment),
    # on ranks 0 and 1.
    if rank < 2:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(readme_port), RANK=str(rank), WORLD_SIZE="2"
        )
        exec(
            compile(_readme_script(), "README.md context parallelism example", "exec"),
            {"__name__": "__main__"},
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_context_parallel_matches_one_process(tmp_path):
    """Run `_worker` on 4 processes; a child's exception fails the test with its traceback (mp.spawn then
    stops the others); on a timeout every child is killed."""
    store, refs, log = (str(tmp_path / name) for name in ("store", "refs.pt", "log"))
    torch.save({world: [_reference(world, c) for c in _cases(world)] for world in (2, 4)}, refs)
    # A fork server imports torch (and what the children import first) once; the 4 children fork from it
    # instead of each importing torch afresh (seconds each on this machine). Nothing in it has run threads.
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "sparse_attn.distributed"])
    context = mp.start_processes(
        _worker, args=(store, refs, _free_port(), log), nprocs=4, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + 240
    try:
        while not context.join(timeout=1.0):  # raises ProcessRaisedException with the child's traceback
            if time.monotonic() > deadline:
                pytest.fail("the context-parallel processes did not finish within 240 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    print(Path(f"{log}.0").read_text())


# -- no processes needed ---------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["contiguous", "zigzag"])
def test_shard_unshard_round_trip(order):
    x = torch.arange(2 * 3 * 24 * 2).view(2, 3, 24, 2)
    shards = [shard_sequence(x, r, 3, order=order) for r in range(3)]
    assert all(s.shape == (2, 3, 8, 2) for s in shards)
    assert torch.equal(unshard_sequence(shards, order=order), x)
    if order == "zigzag":  # rank 0 holds the first and the last of 6 chunks
        assert shards[0][0, 0, :, 0].tolist() == [0, 2, 4, 6, 40, 42, 44, 46]


def test_window_accounting_is_a_sliver_of_an_all_gather():
    seq_len, world = 1 << 14, 4
    volume = communication_plan(sa.sliding_window(128), seq_len, world, heads=4, head_dim=32)
    # A rank receives K and V of the 128 keys past each shard edge it borders (two blocks of 64).
    edge = 2 * 4 * 32 * 4 * 128  # K and V, 4 heads, head dim 32, fp32, 128 keys
    assert volume.received().tolist() == [edge, 2 * edge, 2 * edge, edge]
    assert volume.all_gather == 2 * 4 * 32 * 4 * seq_len * (world - 1) // world
    assert volume.backward.T.equal(volume.forward)  # dK/dV go back the way K/V came
    zigzag = communication_plan(sa.causal(), seq_len, world, heads=4, head_dim=32, order="zigzag")
    # Causal: the rank holding the last chunk needs every earlier key, whatever the order; zigzag evens the work.
    contiguous = communication_plan(sa.causal(), seq_len, world, heads=4, head_dim=32)
    assert int(zigzag.received().max()) == int(contiguous.received().max()) == volume.all_gather
    assert contiguous.blocks_computed.tolist() == [2080 + 4096 * r for r in range(world)]  # 64 blocks a rank
    assert zigzag.blocks_computed.max() - zigzag.blocks_computed.min() <= 64
    assert zigzag.blocks_computed.sum() == contiguous.blocks_computed.sum()


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 6"):
        communication_plan(sa.causal(), 100, 3, heads=1, head_dim=16, order="zigzag")
    with pytest.raises(ValueError, match="order must be"):
        shard_sequence(torch.zeros(1, 1, 8, 1), 0, 2, order="ring")
    with pytest.raises(TypeError, match="Pattern"):
        communication_plan("causal", 64, 2, heads=1, head_dim=16)
    with pytest.raises(RuntimeError, match="process group"):
        context_parallel_attention(*torch.zeros(3, 1, 1, 8, 16), sa.causal())


def test_one_rank_in_process_inference_mode_and_module():
    """A one-process group (no messages): the module and the function under inference mode equal
    `sparse_attention`, with padded shards; without a process group the module is plain `SparseAttention`."""
    q, k, v = torch.randn(3, 1, 2, 100, 16, generator=torch.Generator().manual_seed(0)).unbind(0)
    pattern = sa.longformer(8, 2)
    want = sa.sparse_attention(q, k, v, pattern)
    assert torch.equal(ContextParallelAttention(pattern)(q, k, v), want)
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with torch.inference_mode():
            got = context_parallel_attention(q, k, v, pattern)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ContextParallelAttention(pattern)(q, k, v), want, rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="key_mask"):
            ContextParallelAttention(pattern)(q, k, v, torch.ones(1, 100, dtype=torch.bool))
        with pytest.raises(ValueError, match="one length"):
            context_parallel_attention(q, k[:, :, :50], v[:, :, :50], pattern)
    finally:
        dist.destroy_process_group()
