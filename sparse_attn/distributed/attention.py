"""`context_parallel_attention`: exact sparse attention over a sequence sharded across a process group.

One autograd node per call, so that every rank runs the same exchanges in the same order, forward and
backward (two rounds of batched point-to-point messages each way; a pair of ranks that shares no kept
block posts no message):

forward   1. pull K/V units and push query blocks, as the `Plan` says;
          2. attend, with the usual backend: own rows over own keys (the shard itself, no copy); the own
             rows that keep pulled blocks over those blocks; query blocks pushed here over own keys;
          3. return the pushed rows' (out, lse) to their owners, who merge every partial result into
             their rows through the logsumexps (`sparse_attn.merge`).
backward  1. send dO, out, lse and dlse of pushed rows to where they were computed;
          2. the backend's backward for each sub-problem, fed the rows' final out and lse (exact: no
             merge backward);
          3. send dQ of pushed rows home and dK/dV of pulled units to their owners, who add them to their
             own in rank order (bitwise deterministic for a given world size).
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import api, backends
from ..checks import check_size
from ..merge import merge_attention
from ..modules import SparseAttention
from ..patterns import Pattern
from ..patterns.base import check_layout_block_size
from .plan import CommVolume, RankPlan, get_plan
from .sharding import ORDERS, Sharding, check_order

_traffic_lock = threading.Lock()
_traffic = {"sent": {}, "received": {}}


def traffic() -> dict:
    """Bytes this process has sent to / received from each peer (group rank) since `reset_traffic`."""
    with _traffic_lock:
        return {side: dict(counts) for side, counts in _traffic.items()}


def reset_traffic() -> None:
    with _traffic_lock:
        for counts in _traffic.values():
            counts.clear()


def _count(side: str, peer: int, tensor: torch.Tensor) -> None:
    with _traffic_lock:
        _traffic[side][peer] = _traffic[side].get(peer, 0) + tensor.numel() * tensor.element_size()


def _exchange(sends: dict, recvs: dict, group) -> dict:
    """Post every message at once: ``sends`` {peer: [tensor]}, ``recvs`` {peer: [(shape, dtype, device)]}.

    Returns {peer: [received tensor]}. Empty tensors are not sent (both sides know the sizes from the plan),
    so ranks that share nothing exchange nothing. Messages between two ranks pair up in list order."""
    ops, received = [], {}
    for peer in sorted(set(sends) | set(recvs)):
        target = dist.get_global_rank(group, peer) if group is not None else peer
        for t in sends.get(peer, []):
            if t.numel():
                t = t.contiguous()
                ops.append(dist.P2POp(dist.isend, t, target, group))
                _count("sent", peer, t)
        for shape, dtype, dev in recvs.get(peer, []):
            buf = torch.empty(shape, dtype=dtype, device=dev)
            received.setdefault(peer, []).append(buf)
            if buf.numel():
                ops.append(dist.P2POp(dist.irecv, buf, target, group))
                _count("received", peer, buf)
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return received


# -- shapes ----------------------------------------------------------------------------------------------
def _pad(x: torch.Tensor, chunks: int, chunk: int, padded: int) -> torch.Tensor:
    """Pad every chunk of the sequence dim (dim 2) of `x` to `padded` positions (zeros)."""
    if padded == chunk:
        return x
    shape = x.shape
    x = x.reshape(*shape[:2], chunks, chunk, *shape[3:])
    pad = [0, 0] * (len(shape) - 3) + [0, padded - chunk]
    return F.pad(x, pad).reshape(*shape[:2], chunks * padded, *shape[3:])


def _unpad(x: torch.Tensor, chunks: int, chunk: int, padded: int) -> torch.Tensor:
    if padded == chunk:
        return x
    shape = x.shape
    x = x.reshape(*shape[:2], chunks, padded, *shape[3:])[:, :, :, :chunk]
    return x.reshape(*shape[:2], chunks * chunk, *shape[3:])


def _units(x: torch.Tensor, groups: int, blocks: int, block: int) -> torch.Tensor:
    """``[B, H, blocks * block, D]`` viewed as ``[B, groups, H / groups, blocks, block, D]``."""
    batch, heads, _, dim = x.shape
    return x.view(batch, groups, heads // groups, blocks, block, dim)


def _pick(x6: torch.Tensor, flat: torch.Tensor, blocks: int) -> torch.Tensor:
    """Units ``flat = group * blocks + block`` of `x6` as ``[n, B, H / groups, block, D]``."""
    flat = flat.to(x6.device)
    return x6[:, flat // blocks, :, flat % blocks]


def _rows(blocks: torch.Tensor, block: int) -> torch.Tensor:
    """Token rows of query blocks."""
    return (blocks[:, None] * block + torch.arange(block)).reshape(-1)


def _merge_partials(out, lse, partials):
    """`out`/`lse` (rows of own keys) merged with each partial result ``(positions, out_i, lse_i)`` over
    other keys, in list order (fixed: pulled keys first, then peers in rank order)."""
    for positions, o_part, l_part in partials:
        o, l = merge_attention([out[:, :, positions], o_part], [lse[:, :, positions], l_part])
        out, lse = out.index_copy(2, positions, o), lse.index_copy(2, positions, l)
    return out, lse


class _Run:
    """What one call needs besides the tensors: the rank's plan, the group and the attention settings."""

    def __init__(self, view: RankPlan, group, scale: float, spec, sharding: Sharding, padded: int):
        self.view, self.group, self.scale, self.backend = view, group, scale, spec.module
        self.block = view.block
        self.chunks = len(sharding.chunks_of(view.rank))
        self.chunk, self.padded = sharding.chunk_len, padded
        # Token rows of every partial result: the pulled sub-problem's rows, then those pushed to each peer.
        self.part_rows = {}
        if view.num_gathered:
            self.part_rows["pulled"] = _rows(view.pulled_rows, view.block)
        for p, blocks in view.push_blocks.items():
            self.part_rows[p] = _rows(blocks, view.block)
        rows = list(self.part_rows.values())
        self.merged_rows = torch.unique(torch.cat(rows)) if rows else None
        self.positions = {key: torch.searchsorted(self.merged_rows, r) for key, r in self.part_rows.items()}

    def pad(self, x):
        return _pad(x, self.chunks, self.chunk, self.padded)

    def unpad(self, x):
        return _unpad(x, self.chunks, self.chunk, self.padded)

    # The backend's own forward and backward, not the custom ops: this autograd node already is the
    # boundary (and the custom ops' dispatch imports torch._dynamo, seconds in every fresh process).
    def attend(self, q, k, v, layout):
        out, lse = self.backend.forward(q, k, v, layout.to(q.device), self.scale, None)
        return out.contiguous(), lse.contiguous()

    def attend_backward(self, do, dlse, q, k, v, out, lse, layout):
        """``(dq, dk, dv)`` (no score modifiers here: the backend's d_rel_bias slot is None)."""
        dq, dk, dv, _ = self.backend.backward(
            do.contiguous(), dlse, q, k, v, out, lse, layout.to(q.device), self.scale, None
        )
        return dq, dk, dv

    def pulled_kv(self, pieces: dict, like: torch.Tensor):
        """The pulled K and V, ``[B, Hkv, gathered * block, D]`` each, blocks in sequence order."""
        view, b = self.view, self.block
        batch, heads, _, dim = like.shape
        make = torch.zeros if view.holes else torch.empty
        out = []
        for which in range(2):
            g = make(batch, heads, view.num_gathered * b, dim, dtype=like.dtype, device=like.device)
            g6 = _units(g, view.kv_groups, view.num_gathered, b)
            for peer, slots in view.recv_units.items():
                slots = slots.to(like.device)
                # A piece is [n, B, H / groups, block, 2D]: K then V.
                g6[:, slots // view.num_gathered, :, slots % view.num_gathered] = pieces[peer][
                    ..., which * dim : (which + 1) * dim
                ]
            out.append(g)
        return out

    def pulled_q(self, qp):
        """The own query rows that keep pulled blocks."""
        return qp.index_select(2, self.part_rows["pulled"].to(qp.device))


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, run: _Run):
        view, b = run.view, run.block
        # Contiguous: blocks are taken through views (any input strides work; this copies only if needed).
        qp, kp, vp = (run.pad(t).contiguous() for t in (q, k, v))
        batch, hq, _, dim = qp.shape
        hkv, dev = kp.shape[1], qp.device
        k6 = _units(kp, view.kv_groups, view.num_own, b)
        v6 = _units(vp, view.kv_groups, view.num_own, b)
        q5 = qp.view(batch, hq, view.num_own, b, dim)
        hs = hkv // view.kv_groups
        # 1. K/V units (K and V side by side in one message) to the peers that pull them; queries pushed.
        sends, recvs = {}, {}
        for peer, flat in view.send_units.items():
            pair = [_pick(k6, flat, view.num_own), _pick(v6, flat, view.num_own)]
            sends.setdefault(peer, []).append(torch.cat(pair, -1))
        for peer, blocks in view.push_blocks.items():
            sends.setdefault(peer, []).append(q5[:, :, blocks.to(dev)])
        for peer, slots in view.recv_units.items():
            recvs.setdefault(peer, []).append(((len(slots), batch, hs, b, 2 * dim), kp.dtype, dev))
        for peer, n in view.pushed_in.items():
            recvs.setdefault(peer, []).append(((batch, hq, n, b, dim), qp.dtype, dev))
        received = _exchange(sends, recvs, run.group)
        pieces = {p: received[p][0] for p in view.recv_units}
        # 2. Attention: own rows over own keys, in place; the rows that keep pulled blocks over those
        # blocks; rows pushed here over own keys.
        out_own, lse_own = run.attend(qp, kp, vp, view.own_layout)
        partials = {}
        if view.num_gathered:
            kg, vg = run.pulled_kv(pieces, kp)
            partials["pulled"] = run.attend(run.pulled_q(qp), kg, vg, view.pulled_layout)
            del kg, vg
        q_in = None
        if view.pushed_in:
            q_in = torch.cat([received[p][-1].reshape(batch, hq, -1, dim) for p in view.pushed_in], 2)
            out_r, lse_r = run.attend(q_in, kp, vp, view.remote_layout)
        # 3. Pushed rows' results go home.
        sends, recvs, start = {}, {}, 0
        for peer, n in view.pushed_in.items():
            rows = slice(start * b, (start + n) * b)
            sends[peer] = [out_r[:, :, rows], lse_r[:, :, rows]]
            start += n
        for peer in view.push_blocks:
            n = len(run.part_rows[peer])
            recvs[peer] = [((batch, hq, n, dim), out_own.dtype, dev), ((batch, hq, n), lse_own.dtype, dev)]
        partials.update(_exchange(sends, recvs, run.group))
        out, lse = out_own, lse_own  # fresh tensors from the backend: the merged rows are written in place
        if run.merged_rows is not None:
            rows = run.merged_rows.to(dev)
            parts = [(run.positions[key].to(dev), *partials[key]) for key in run.part_rows]
            o, l = _merge_partials(out[:, :, rows], lse[:, :, rows], parts)
            out[:, :, rows], lse[:, :, rows] = o, l
        ctx.save_for_backward(qp, kp, vp, out, lse, *pieces.values(), *([q_in] if q_in is not None else []))
        ctx.set_materialize_grads(False)
        ctx.run = run
        return run.unpad(out), run.unpad(lse)

    @staticmethod
    def backward(ctx, dout, dlse):
        # Every sub-problem's backward is fed its rows' final (out, lse), not its partial ones: the backend
        # then recomputes the probabilities of the whole row restricted to the sub-problem's keys, and
        # delta = rowsum(dO * out) - dlse of the whole row, so its dQ, dK, dV are exactly the whole
        # attention's, restricted to those keys (as ring attention's backward does). No merge backward.
        run = ctx.run
        view, b = run.view, run.block
        qp, kp, vp, out, lse, *rest = ctx.saved_tensors
        pieces = dict(zip(view.recv_units, rest[: len(view.recv_units)], strict=True))
        q_in = rest[-1] if view.pushed_in else None
        batch, hq, _, dim = qp.shape
        dev = qp.device
        # Gradients are not materialised: None where an output does not reach the loss (lse, typically).
        dout = run.pad(dout) if dout is not None else torch.zeros_like(out)
        dlse = run.pad(dlse) if dlse is not None else None
        # 1. The rows pushed to each peer: their dO, out, lse and dlse (zeros if None), to where they were computed.
        sends = {}
        for peer in view.push_blocks:
            rows = run.part_rows[peer].to(dev)
            d_l = dlse[:, :, rows] if dlse is not None else torch.zeros_like(lse[:, :, rows])
            sends[peer] = [dout[:, :, rows], out[:, :, rows], lse[:, :, rows], d_l]
        recvs = {}
        for p, n in view.pushed_in.items():
            rows_shape, dtypes = (batch, hq, n * b), (out.dtype, out.dtype, lse.dtype, lse.dtype)
            recvs[p] = [(rows_shape + (dim,) * (i < 2), dt, dev) for i, dt in enumerate(dtypes)]
        d_in = _exchange(sends, recvs, run.group)
        # 2. The backend's backward for each sub-problem; fp32 (or wider) accumulation of the pieces.
        acc = torch.promote_types(qp.dtype, torch.float32)
        grads = run.attend_backward(dout, dlse, qp, kp, vp, out, lse, view.own_layout)
        dq, dk, dv = (g.to(acc) for g in grads)
        sends = {}
        if view.pushed_in:
            d_out_r, out_r, lse_r, d_lse_r = (
                torch.cat([d_in[p][i] for p in view.pushed_in], 2) for i in range(4)
            )
            dq_in, dk_r, dv_r = run.attend_backward(
                d_out_r, d_lse_r, q_in, kp, vp, out_r, lse_r, view.remote_layout
            )
            dk += dk_r
            dv += dv_r
            start = 0
            for peer, n in view.pushed_in.items():
                sends.setdefault(peer, []).append(dq_in[:, :, start * b : (start + n) * b])
                start += n
        if view.num_gathered:
            rows = run.part_rows["pulled"].to(dev)
            kg, vg = run.pulled_kv(pieces, kp)
            d_l = dlse[:, :, rows] if dlse is not None else None
            dq_p, dkg, dvg = run.attend_backward(
                dout[:, :, rows],
                d_l,
                run.pulled_q(qp),
                kg,
                vg,
                out[:, :, rows],
                lse[:, :, rows],
                view.pulled_layout,
            )
            del kg, vg
            dq.index_add_(2, rows, dq_p.to(acc))
            dk6 = _units(dkg, view.kv_groups, view.num_gathered, b)
            dv6 = _units(dvg, view.kv_groups, view.num_gathered, b)
            # 3. dK/dV of pulled units back to their owners (after the dQ of pushed rows, as received).
            for peer, slots in view.recv_units.items():
                pair = [_pick(dk6, slots, view.num_gathered), _pick(dv6, slots, view.num_gathered)]
                sends.setdefault(peer, []).append(torch.cat(pair, -1))
        recvs = {}
        for peer in view.push_blocks:
            recvs.setdefault(peer, []).append(((batch, hq, len(run.part_rows[peer]), dim), qp.dtype, dev))
        for peer, flat in view.send_units.items():
            shape = (len(flat), batch, kp.shape[1] // view.kv_groups, b, 2 * dim)
            recvs.setdefault(peer, []).append((shape, kp.dtype, dev))
        back = _exchange(sends, recvs, run.group)
        for peer in view.push_blocks:
            dq.index_add_(2, run.part_rows[peer].to(dev), back[peer][0].to(acc))
        dk6 = _units(dk, view.kv_groups, view.num_own, b)
        dv6 = _units(dv, view.kv_groups, view.num_own, b)
        for peer, flat in view.send_units.items():
            piece = back[peer][-1].to(acc)
            flat = flat.to(dev)
            units = (flat // view.num_own, flat % view.num_own)
            # Units first: [groups, blocks, B, H / groups, block, D] views, added in place, in rank order.
            dk6.permute(1, 3, 0, 2, 4, 5).index_put_(units, piece[..., :dim], accumulate=True)
            dv6.permute(1, 3, 0, 2, 4, 5).index_put_(units, piece[..., dim:], accumulate=True)
        grads = (dq.to(qp.dtype), dk.to(kp.dtype), dv.to(vp.dtype))
        return (*(run.unpad(g) for g in grads), None)


# -- public API ------------------------------------------------------------------------------------------
def _group_geometry(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attention needs an initialised torch.distributed process group")
    return dist.get_world_size(group), dist.get_rank(group)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_same_shards(q, k, order: str, group, world: int) -> None:
    """Every rank's shard shapes, dtype and order, gathered before any exchange (one small all-gather): a
    rank whose shard differs would make the exchanges abort or hang, so every rank raises the same error."""
    shaped = all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k))
    if world == 1 or not shaped:
        return  # (wrong types or ranks fail the local checks that follow, on every rank alike)
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES and k.dtype == q.dtype else -1
    mine = [*q.shape, *k.shape, dtype, ORDERS.index(order)]
    gathered = [torch.empty(len(mine), dtype=torch.int64, device=q.device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor(mine, dtype=torch.int64, device=q.device), group=group)
    table = [t.tolist() for t in gathered]
    if all(row == table[0] for row in table):
        return
    described = "; ".join(
        f"rank {r}: q {row[:4]}, k {row[4:8]}, {_DTYPES[row[8]] if row[8] >= 0 else 'other dtypes'}, "
        f"order={ORDERS[row[9]]!r}"
        for r, row in enumerate(table)
    )
    raise ValueError(
        "context_parallel_attention needs the same shard shapes, dtype and order on every rank (each rank "
        f"holds S/P positions of one sequence); got {described}"
    )


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    *,
    group=None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    order: str = "contiguous",
):
    """This rank's rows of `sparse_attention` over a sequence sharded across the ranks of `group`, exactly.

    Args:
        q: this rank's shard ``[B, Hq, S/P, D]``; k, v: ``[B, Hkv, S/P, D]`` (self-attention: every rank
            passes the same shapes). With ``order="contiguous"`` rank r holds positions
            ``[r * S/P, (r + 1) * S/P)``; with ``"zigzag"`` it holds chunks r and 2P - 1 - r of 2P
            (`shard_sequence` cuts a whole-sequence tensor either way).
        pattern: a `Pattern` (its layout over the whole sequence decides what travels).
        group: the process group (default: the world).
        scale, return_lse, backend: as in `sparse_attention`.

    Differentiable: gradients land on each rank's own q, k, v. Every rank of the group must call it (and
    its backward) with the same pattern, shapes and settings; shapes, dtype and order are compared across
    ranks first (one small all-gather), and a mismatch raises the same ValueError on every rank. Per-batch
    patterns (`documents` with ``[B, S]`` ids) work as they do in `sparse_attention`.
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparse_attn Pattern, got {type(pattern).__name__}")
    world, rank = _group_geometry(group)
    check_order(order)
    # First, so that a rank whose shard differs fails with the others instead of leaving them waiting.
    _check_same_shards(q, k, order, group, world)
    spec = backends.resolve(backend, q.device if isinstance(q, torch.Tensor) else None)
    scale = api._check_inputs(q, k, v, None, scale, spec)
    if k.shape[2] != q.shape[2]:
        raise ValueError(
            f"context parallelism is self-attention: q and k shards must have one length, got {q.shape[2]} and {k.shape[2]}"
        )
    if pattern.batch_size not in (None, 1, q.shape[0]):
        raise ValueError(
            f"pattern was built for {pattern.batch_size} batch elements, but q has batch size {q.shape[0]}"
        )
    sharding = Sharding(q.shape[2] * world, world, order)
    plan = get_plan(pattern, sharding, spec.default_block_size, q.shape[1], k.shape[1])
    run = _Run(plan.rank_view(rank), group, scale, spec, sharding, plan.padded_chunk)
    out, lse = _ContextParallel.apply(q, k, v, run)
    return (out, lse) if return_lse else out


def communication_plan(
    pattern: Pattern,
    seq_len: int,
    world_size: int,
    *,
    heads: int,
    head_dim: int,
    kv_heads: int | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    order: str = "contiguous",
    block_size: int = 64,
) -> CommVolume:
    """Bytes `context_parallel_attention` will exchange, per pair of ranks, without running anything.

    `block_size` is the layout's (64 for both backends). The result's ``received()`` / ``sent()`` give
    per-rank totals; ``all_gather`` is what each rank would receive if K/V were all-gathered instead."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparse_attn Pattern, got {type(pattern).__name__}")
    heads, head_dim, batch = (
        check_size("heads", heads),
        check_size("head_dim", head_dim),
        check_size("batch", batch),
    )
    kv_heads = heads if kv_heads is None else check_size("kv_heads", kv_heads)
    seq_len, world_size = check_size("seq_len", seq_len), check_size("world_size", world_size)
    block_size = check_layout_block_size(check_size("block_size", block_size))[0]
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
    sharding = Sharding(seq_len, world_size, check_order(order))
    plan = get_plan(pattern, sharding, block_size, heads, kv_heads)
    elem = torch.empty(0, dtype=dtype).element_size()
    lse_size = 8 if dtype == torch.float64 else 4
    fwd, bwd = plan.volume(batch, head_dim, elem, lse_size)
    gathered = (world_size - 1) * sharding.shard_len * 2 * batch * kv_heads * head_dim * elem
    return CommVolume(fwd, bwd, gathered, plan.blocks_computed())


class ContextParallelAttention(SparseAttention):
    """`SparseAttention` that runs context-parallel across `group` (its inputs are this rank's shards).

    With ``group=None`` and no initialised process group it is plain `SparseAttention`; otherwise
    ``forward(q, k, v)`` calls `context_parallel_attention` over the group (the world by default)."""

    def __init__(
        self, pattern: Pattern, *, group=None, order: str = "contiguous", scale=None, backend="auto"
    ):
        super().__init__(pattern, scale=scale, backend=backend)
        self.group, self.order = group, check_order(order)

    def forward(self, q, k, v, key_mask=None, *, return_lse: bool = False):
        if self.group is None and not (dist.is_available() and dist.is_initialized()):
            return super().forward(q, k, v, key_mask, return_lse=return_lse)
        if key_mask is not None:
            raise ValueError("ContextParallelAttention takes no key_mask (shards hold real tokens only)")
        return context_parallel_attention(
            q, k, v, self.pattern, group=self.group, scale=self.scale, return_lse=return_lse,
            backend=self.backend, order=self.order,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return super().extra_repr() + f", order={self.order!r}"
