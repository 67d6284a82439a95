"""`context_parallel_attention`: exact sparse attention over a sequence sharded across a process group.

One autograd node per call, so that every rank runs the same exchanges in the same order, forward and
backward (two rounds of batched point-to-point messages each way; a pair of ranks that shares no kept
block posts no message):

forward   1. pull K/V units and push query blocks, as the `Plan` says;
          2. attend: own query blocks over own + pulled keys (the local sub-layout), and the query blocks
             pushed here over own keys (the remote sub-layout), with the usual backend;
          3. return the pushed rows' (out, lse) to their owners, who merge them into their own rows.
backward  1. send d(out, lse) of pushed rows to where they were computed (from the merge's backward);
          2. the backend's backward for both sub-layouts;
          3. send dQ of pushed rows home and dK/dV of pulled units to their owners, who add them to their
             own in rank order (bitwise deterministic for a given world size).
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import api
from ..merge import merge_attention
from ..modules import SparseAttention
from ..patterns import Pattern
from .plan import CommVolume, RankPlan, get_plan
from .sharding import Sharding, check_order

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
    """Post every message at once: ``sends`` {peer: [tensor]}, ``recvs`` {peer: [(shape, dtype)]}.

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


def _merge_pushed(out, lse, partials):
    """`out`/`lse` (the pushed rows) merged with each peer's partial result, peers in rank order."""
    for positions, o_peer, l_peer in partials:
        o, l = merge_attention([out[:, :, positions], o_peer], [lse[:, :, positions], l_peer])
        out, lse = out.index_copy(2, positions, o), lse.index_copy(2, positions, l)
    return out, lse


class _Run:
    """What one call needs besides the tensors: the rank's plan, the group and the attention settings."""

    def __init__(self, view: RankPlan, group, scale: float, backend: str, sharding: Sharding, padded: int):
        self.view, self.group, self.scale, self.backend = view, group, scale, backend
        self.chunks = len(sharding.chunks_of(view.rank))
        self.chunk, self.padded = sharding.chunk_len, padded
        # Token rows of own query blocks pushed to each peer, and their union (sorted).
        self.push_rows = {p: _rows(blocks, view.block) for p, blocks in view.push_blocks.items()}
        self.merged_rows = torch.unique(torch.cat(list(self.push_rows.values()))) if self.push_rows else None
        self.positions = {
            p: torch.searchsorted(self.merged_rows, rows).to(torch.int64)
            for p, rows in self.push_rows.items()
        }

    def pad(self, x):
        return _pad(x, self.chunks, self.chunk, self.padded)

    def unpad(self, x):
        return _unpad(x, self.chunks, self.chunk, self.padded)

    # The backend's own forward and backward, not the custom ops: this autograd node already is the
    # boundary (and the custom ops' dispatch imports torch._dynamo, seconds in every fresh process).
    def attend(self, q, k, v, layout):
        out, lse = api._backend_module(self.backend).forward(q, k, v, layout.to(q.device), self.scale, None)
        return out.contiguous(), lse.contiguous()

    def attend_backward(self, do, dlse, q, k, v, out, lse, layout):
        module = api._backend_module(self.backend)
        return module.backward(
            do.contiguous(), dlse, q, k, v, out, lse, layout.to(q.device), self.scale, None
        )

    def gather_kv(self, kp, vp, pulled):
        """Own + pulled K and V, blocks in sequence order: ``[B, Hkv, gathered * block, D]`` each."""
        view, b = self.view, self.block
        batch, heads, _, dim = kp.shape
        make = torch.zeros if view.holes else torch.empty
        out = []
        for which, own in enumerate((kp, vp)):
            g = make(batch, heads, view.num_gathered * b, dim, dtype=own.dtype, device=own.device)
            g6 = _units(g, view.kv_groups, view.num_gathered, b)
            g6[:, :, :, view.own_slots.to(own.device)] = _units(own, view.kv_groups, view.num_own, b)
            for peer, slots in view.recv_units.items():
                piece = pulled[peer]  # [n, B, H / groups, block, 2D]: K then V
                slots = slots.to(own.device)
                g6[:, slots // view.num_gathered, :, slots % view.num_gathered] = piece[
                    ..., which * dim : (which + 1) * dim
                ]
            out.append(g)
        return out

    @property
    def block(self):
        return self.view.block


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
            sends.setdefault(peer, []).append(
                torch.cat([_pick(k6, flat, view.num_own), _pick(v6, flat, view.num_own)], -1)
            )
        for peer, blocks in view.push_blocks.items():
            sends.setdefault(peer, []).append(q5[:, :, blocks.to(dev)])
        for peer, slots in view.recv_units.items():
            recvs.setdefault(peer, []).append(((len(slots), batch, hs, b, 2 * dim), kp.dtype, dev))
        for peer, n in view.pushed_in.items():
            recvs.setdefault(peer, []).append(((batch, hq, n, b, dim), qp.dtype, dev))
        received = _exchange(sends, recvs, run.group)
        pulled = {p: received[p][0] for p in view.recv_units}
        # 2. Attention: own rows over own + pulled keys; rows pushed here over own keys.
        kg, vg = run.gather_kv(kp, vp, pulled)
        out_l, lse_l = run.attend(qp, kg, vg, view.local_layout)
        del kg, vg
        q_in = None
        if view.pushed_in:
            pushed = [received[p][-1].reshape(batch, hq, -1, dim) for p in view.pushed_in]
            q_in = torch.cat(pushed, 2)
            out_r, lse_r = run.attend(q_in, kp, vp, view.remote_layout)
        # 3. Pushed rows' results go home and are merged there.
        sends, recvs, start = {}, {}, 0
        for peer, n in view.pushed_in.items():
            rows = slice(start * b, (start + n) * b)
            sends[peer] = [out_r[:, :, rows], lse_r[:, :, rows]]
            start += n
        for peer, rows in run.push_rows.items():
            recvs[peer] = [
                ((batch, hq, len(rows), dim), out_l.dtype, dev),
                ((batch, hq, len(rows)), lse_l.dtype, dev),
            ]
        partials = _exchange(sends, recvs, run.group)
        out, lse = out_l, lse_l
        if run.merged_rows is not None:
            rows = run.merged_rows.to(dev)
            merged = _merge_pushed(
                out_l[:, :, rows], lse_l[:, :, rows],
                [(run.positions[p].to(dev), *partials[p]) for p in run.push_rows],
            )  # fmt: skip
            out, lse = out_l.index_copy(2, rows, merged[0]), lse_l.index_copy(2, rows, merged[1])
        saved = [qp, kp, vp, out_l, lse_l, *pulled.values()]
        saved += [q_in, out_r, lse_r] if q_in is not None else []
        saved += [t for p in run.push_rows for t in partials[p]]
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)
        ctx.run = run
        return run.unpad(out), run.unpad(lse)

    @staticmethod
    def backward(ctx, dout, dlse):
        run = ctx.run
        view, b = run.view, run.block
        qp, kp, vp, out_l, lse_l, *rest = ctx.saved_tensors
        pulled = dict(zip(view.recv_units, rest[: len(view.recv_units)], strict=True))
        rest = rest[len(view.recv_units) :]
        if view.pushed_in:
            q_in, out_r, lse_r, *rest = rest
        batch, hq, _, dim = qp.shape
        dev = qp.device
        # Gradients are not materialised: None where an output does not reach the loss (lse, typically).
        dout = run.pad(dout) if dout is not None else torch.zeros_like(out_l)
        dlse = run.pad(dlse) if dlse is not None else None
        # 1. Through the merge: gradients of own rows' local part and of each peer's partial.
        d_partials = {}
        if run.merged_rows is not None:
            rows = run.merged_rows.to(dev)
            with torch.enable_grad():
                o0 = out_l[:, :, rows].detach().requires_grad_()
                l0 = lse_l[:, :, rows].detach().requires_grad_()
                parts = [t.detach().requires_grad_() for t in rest]
                triples = [
                    (run.positions[p].to(dev), parts[2 * i], parts[2 * i + 1])
                    for i, p in enumerate(run.push_rows)
                ]
                o, l = _merge_pushed(o0, l0, triples)
                g_lse = dlse[:, :, rows] if dlse is not None else torch.zeros_like(l)
                grads = torch.autograd.grad(
                    (o, l), [o0, l0, *parts], (dout[:, :, rows], g_lse), allow_unused=True
                )
            grads = [
                torch.zeros_like(t) if g is None else g for g, t in zip(grads, [o0, l0, *parts], strict=True)
            ]
            dout = dout.index_copy(2, rows, grads[0].to(dout.dtype))
            dlse = (dlse if dlse is not None else torch.zeros_like(lse_l)).index_copy(2, rows, grads[1])
            for i, p in enumerate(run.push_rows):
                d_partials[p] = [grads[2 + 2 * i].to(out_l.dtype), grads[3 + 2 * i].to(lse_l.dtype)]
        recvs = {
            p: [((batch, hq, n * b, dim), out_l.dtype, dev), ((batch, hq, n * b), lse_l.dtype, dev)]
            for p, n in view.pushed_in.items()
        }
        d_in = _exchange(d_partials, recvs, run.group)
        # 2. The backend's backward for both sub-layouts.
        kg, vg = run.gather_kv(kp, vp, pulled)
        dq, dkg, dvg = run.attend_backward(dout, dlse, qp, kg, vg, out_l, lse_l, view.local_layout)
        del kg, vg
        sends = {}
        acc = torch.promote_types(qp.dtype, torch.float32)
        dk6 = _units(dkg, view.kv_groups, view.num_gathered, b)
        dv6 = _units(dvg, view.kv_groups, view.num_gathered, b)
        own_slots = view.own_slots.to(dev)
        dk = dk6[:, :, :, own_slots].to(acc)
        dv = dv6[:, :, :, own_slots].to(acc)
        if view.pushed_in:
            d_out_r = torch.cat([d_in[p][0] for p in view.pushed_in], 2)
            d_lse_r = torch.cat([d_in[p][1] for p in view.pushed_in], 2)
            dq_in, dk_r, dv_r = run.attend_backward(
                d_out_r, d_lse_r, q_in, kp, vp, out_r, lse_r, view.remote_layout
            )
            dk += _units(dk_r, view.kv_groups, view.num_own, b)
            dv += _units(dv_r, view.kv_groups, view.num_own, b)
            start = 0
            for peer, n in view.pushed_in.items():
                sends.setdefault(peer, []).append(dq_in[:, :, start * b : (start + n) * b])
                start += n
        # 3. dQ of pushed rows home, dK/dV of pulled units to their owners (after the dQ, as received).
        for peer, slots in view.recv_units.items():
            pieces = [_pick(dk6, slots, view.num_gathered), _pick(dv6, slots, view.num_gathered)]
            sends.setdefault(peer, []).append(torch.cat(pieces, -1))
        recvs = {}
        for peer, rows in run.push_rows.items():
            recvs.setdefault(peer, []).append(((batch, hq, len(rows), dim), qp.dtype, dev))
        for peer, flat in view.send_units.items():
            shape = (len(flat), batch, kp.shape[1] // view.kv_groups, b, 2 * dim)
            recvs.setdefault(peer, []).append((shape, kp.dtype, dev))
        back = _exchange(sends, recvs, run.group)
        dq = dq.to(acc)
        for peer, rows in run.push_rows.items():
            dq.index_add_(2, rows.to(dev), back[peer][0].to(acc))
        for peer, flat in view.send_units.items():
            piece = back[peer][-1].to(acc)
            flat = flat.to(dev)
            units = (flat // view.num_own, flat % view.num_own)
            # Units first: [groups, blocks, B, H / groups, block, D] views, added in place, in rank order.
            dk.permute(1, 3, 0, 2, 4, 5).index_put_(units, piece[..., :dim], accumulate=True)
            dv.permute(1, 3, 0, 2, 4, 5).index_put_(units, piece[..., dim:], accumulate=True)
        shape = kp.shape
        dk, dv = dk.reshape(shape).to(kp.dtype), dv.reshape(shape).to(vp.dtype)
        return run.unpad(dq.to(qp.dtype)), run.unpad(dk), run.unpad(dv), None


# -- public API ------------------------------------------------------------------------------------------
def _group_geometry(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel_attention needs an initialised torch.distributed process group")
    return dist.get_world_size(group), dist.get_rank(group)


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
    its backward) with the same pattern, shapes and settings.
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a sparse_attn Pattern, got {type(pattern).__name__}")
    world, rank = _group_geometry(group)
    backend = api._resolve_backend(backend, q)
    scale = api._check_inputs(q, k, v, None, scale, backend)
    if k.shape[2] != q.shape[2]:
        raise ValueError(
            f"context parallelism is self-attention: q and k shards must have one length, got {q.shape[2]} and {k.shape[2]}"
        )
    sharding = Sharding(q.shape[2] * world, world, check_order(order))
    block = api._backend_module(backend).DEFAULT_BLOCK_SIZE
    plan = get_plan(pattern, sharding, block, q.shape[1], k.shape[1])
    run = _Run(plan.rank_view(rank), group, scale, backend, sharding, plan.padded_chunk)
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
    kv_heads = heads if kv_heads is None else kv_heads
    if heads < 1 or kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
    sharding = Sharding(seq_len, world_size, check_order(order))
    plan = get_plan(pattern, sharding, block_size, heads, kv_heads)
    elem = torch.empty(0, dtype=dtype).element_size()
    lse_size = 8 if dtype == torch.float64 else 4
    fwd, bwd = plan.volume(batch, head_dim, elem, lse_size)
    gathered = (world_size - 1) * sharding.shard_len * 2 * batch * kv_heads * head_dim * elem
    return CommVolume(fwd, bwd, gathered)


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
