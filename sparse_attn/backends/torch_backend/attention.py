"""Forward and backward of the PyTorch backend, chunk by chunk, on the fused CPU flash-attention kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...layout import BlockLayout
from ...merge import merge_pair
from ...score_mods import ScoreMods
from .. import cpu_kernel
from .. import get as backend_spec
from .calls import Call
from .modifiers import SegmentModifiers, backward_segment, forward_segment
from .planning import passes
from .pool import ordered_map
from .views import Problem, Rows, _masked_rows, per_kv_head

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _segment(qg, kseg, vseg, mask, hidden, scale):
    """(out, lse) of one segment; rows that see no key get lse -inf (the kernel reports 0)."""
    out, lse = _flash_fwd(qg, kseg, vseg, attn_mask=mask, scale=scale)
    if hidden is not None:
        lse = lse.masked_fill(hidden, float("-inf"))
    return out, lse


# -- forward --------------------------------------------------------------------------------------------
def forward(q, k, v, layout, scale, key_mask, mods=None):
    """``(out [B, Hq, Sq, D] like q, lse [B, Hq, Sq])``; rows with no visible key: out 0, lse -inf."""
    if q.device.type != "cpu":
        return _on_cpu(forward, q.device, q, k, v, layout, scale, key_mask, mods)
    if cpu_kernel.active(q.dtype):
        return cpu_kernel.forward(q, k, v, layout, scale, key_mask, mods)
    return aten_forward(q, k, v, layout, scale, key_mask, mods)


def aten_forward(q, k, v, layout, scale, key_mask, mods=None):
    """`forward` by the ATen-composition engine (CPU tensors)."""
    layout = layout.cached("per_kv_head", lambda: per_kv_head(layout, q.shape[1], k.shape[1]))
    problem = Problem(q, k, v, layout, scale, key_mask, mods)
    rows_total = problem.batch * problem.hq * problem.nqb
    out = torch.zeros(rows_total, problem.bq * problem.dim, dtype=q.dtype)
    lse = torch.full((rows_total, problem.bq), float("-inf"), dtype=backend_spec("torch").lse_dtype(q.dtype))
    for tasks in passes(layout, problem, backward=False):
        for _ in ordered_map(lambda chunk: _forward_rows(chunk, problem, out, lse), tasks):
            pass
    out = out.view(problem.batch, problem.hq, -1, problem.dim)[:, :, : problem.q_len]
    lse = lse.view(problem.batch, problem.hq, -1)[:, :, : problem.q_len]
    return out.contiguous(), lse.contiguous()


def _forward_rows(call: Call, problem: Problem, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Attention of one chunk of rows, written into the `out` and `lse` block buffers."""
    rows = Rows(call, problem)
    qg = rows.read(problem.q, problem.dim, "q")
    segments = []
    if call.full.shape[1]:
        mask = problem.full_mask(call)
        if problem.mods is None:
            segments.append(_segment(qg, *problem.full_kv(call), mask, _masked_rows(mask), problem.scale))
        else:
            seg = SegmentModifiers(problem.mods, problem, call, call.full, call.full_len)
            segments.append(forward_segment(qg, *problem.full_kv(call), mask, seg))
    if call.part.shape[1]:
        if problem.mods is None:
            segments.append(_segment(qg, *problem.part_kv(call), *problem.part_mask(call), problem.scale))
        else:
            seg = SegmentModifiers(problem.mods, problem, call, call.part, call.part.shape[1] * problem.bk)
            segments.append(forward_segment(qg, *problem.part_kv(call), problem.part_mask(call)[0], seg))
    if call.merge:  # what an earlier pass wrote for these rows (views of out / lse, or gathered copies)
        segments.append((rows.read(out, problem.dim, "o_prev"), rows.read(lse, 1, "lse_prev").squeeze(-1)))
    o_dest, l_dest = rows.target(out, problem.dim, "o"), rows.target(lse, 1, "lse").squeeze(-1)
    if len(segments) == 1:
        o_dest.copy_(segments[0][0])
        l_dest.copy_(segments[0][1])
    else:
        o_acc, l_acc = segments[0]
        for o_seg, l_seg in segments[1:-1]:
            o_acc, l_acc = merge_pair(
                o_acc, l_acc, o_seg, l_seg, torch.empty_like(o_acc), torch.empty_like(l_acc)
            )
        # The last segment may be a view of the destination: merging reads each element before writing it.
        merge_pair(o_acc, l_acc, *segments[-1], o_dest, l_dest)
    rows.commit(out, o_dest)
    rows.commit(lse, l_dest)


# -- backward -------------------------------------------------------------------------------------------
def backward(do, dlse, q, k, v, out, lse, layout, scale, key_mask, mods=None):
    """``(dq, dk, dv, d_rel_bias)``, recomputed from `lse` chunk by chunk; ``delta = rowsum(dO * O) - dlse``.
    d_rel_bias is None unless `mods` has a rel_bias."""
    if q.device.type != "cpu":
        return _on_cpu(backward, q.device, do, dlse, q, k, v, out, lse, layout, scale, key_mask, mods)
    if cpu_kernel.active(q.dtype):
        return cpu_kernel.backward(do, dlse, q, k, v, out, lse, layout, scale, key_mask, mods)
    if dlse is not None:
        live_dlse = torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
        if bool(live_dlse.any()):
            return _backward_with_dlse(do, live_dlse, q, k, v, out, lse, layout, scale, key_mask, mods)
    layout = layout.cached("per_kv_head", lambda: per_kv_head(layout, q.shape[1], k.shape[1]))
    problem = Problem(q, k, v, layout, scale, key_mask, mods)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    saved = (
        problem.q,
        problem.seq_blocks(do, problem.bq),
        problem.seq_blocks(out, problem.bq),
        _lse_blocks(lse, problem),
    )
    dq = torch.zeros(problem.q.shape, dtype=acc)
    dk = torch.zeros(problem.k.shape, dtype=acc)
    dv = torch.zeros(problem.v.shape, dtype=acc)
    has_rel_bias = mods is not None and mods.rel_bias is not None
    d_rel_bias = (
        torch.zeros(problem.hq * (problem.q_len + problem.kv_len - 1), dtype=acc) if has_rel_bias else None
    )
    # Workers compute; dK, dV (and d_rel_bias) are added here, in task order, so the result is deterministic.
    for tasks in passes(layout, problem, backward=True):
        for adds in ordered_map(lambda chunk: _backward_rows(chunk, problem, saved, dq), tasks):
            for grad_k, grad_v, chunk, blocks, grad_rel in adds:
                _add_blocks(dk, grad_k.to(dk.dtype), chunk, blocks, problem)
                _add_blocks(dv, grad_v.to(dv.dtype), chunk, blocks, problem)
                if grad_rel is not None:
                    d_rel_bias += grad_rel
    return (
        _unblock(dq, problem.batch, problem.hq, problem.q_len, problem.dim, q.dtype),
        _unblock(dk, problem.batch, problem.hkv, k.shape[2], problem.dim, q.dtype),
        _unblock(dv, problem.batch, problem.hkv, k.shape[2], problem.dim, q.dtype),
        d_rel_bias.view(mods.rel_bias.shape).to(mods.rel_bias.dtype) if has_rel_bias else None,
    )


def _lse_blocks(lse: torch.Tensor, problem: Problem) -> torch.Tensor:
    """lse as ``[B * Hq * nqb, bq]``; empty and padding rows get +inf, so exp(s - lse) recomputes to 0."""
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    pad = problem.nqb * problem.bq - problem.q_len
    lse = F.pad(lse, (0, pad), value=float("inf")) if pad else lse.contiguous()
    return lse.view(-1, problem.bq)


def _backward_rows(call: Call, problem: Problem, saved, dq) -> list:
    """Gradients of one chunk of rows: dQ into its rows of `dq`; returns the per-segment
    ``(dK, dV, call, key blocks, d_rel_bias or None)`` for the caller to add into the key blocks."""
    rows = Rows(call, problem)
    q_blocks, do_blocks, out_blocks, lse_blocks = saved
    qg, dog, og = (
        rows.read(t, problem.dim, n) for t, n in ((q_blocks, "q"), (do_blocks, "do"), (out_blocks, "o"))
    )
    lg = rows.read(lse_blocks, 1, "lse").squeeze(-1)
    if rows.index is None:
        dq_dest = rows.target(dq, problem.dim, "dq")  # a view: adds accumulate onto earlier passes
    elif call.merge:
        dq_dest = rows.read(dq, problem.dim, "dq")  # a copy of what earlier passes added, committed back
    else:
        dq_dest = rows.target(dq, problem.dim, "dq").zero_()
    segments = []
    if call.full.shape[1]:
        segments.append((*problem.full_kv(call), problem.full_mask(call), call.full, call.full_len))
    if call.part.shape[1]:
        part_len = call.part.shape[1] * problem.bk
        segments.append((*problem.part_kv(call), problem.part_mask(call)[0], call.part, part_len))
    adds = []
    for kseg, vseg, mask, blocks, n_keys in segments:
        if problem.mods is None:
            dq_s, dk_s, dv_s = _flash_bwd(
                dog, qg, kseg, vseg, og, lg, 0.0, False, attn_mask=mask, scale=problem.scale
            )
            grad_rel = None
        else:
            seg = SegmentModifiers(problem.mods, problem, call, blocks, n_keys)
            dq_s, dk_s, dv_s, grad_rel = backward_segment(dog, qg, kseg, vseg, og, lg, mask, seg)
        dq_dest.add_(dq_s)
        adds.append((dk_s, dv_s, call, blocks, grad_rel))
    rows.commit(dq, dq_dest)
    return adds


def _add_blocks(buffer: torch.Tensor, grad: torch.Tensor, call: Call, blocks: torch.Tensor, problem) -> None:
    """Add a segment's gradient ``[X, kernel_heads, keys, D]`` into its key blocks `blocks` ``[X, n]``.

    A block column that advances by a fixed step >= 1 from row to row (every column of a window) is one
    strided ``add_`` with no copy; the other columns go through one ``index_add_``.
    """
    rows, n = blocks.shape
    keys = grad.shape[2]
    flat = buffer.view(-1, problem.dim)
    steps = torch.arange(rows)
    scattered = []
    for j in range(n):
        column = blocks[:, j]
        step = int(column[1] - column[0]) if rows > 1 else 1
        if step >= 1 and bool((column == column[0] + step * steps).all()):
            lo, hi = j * problem.bk, min((j + 1) * problem.bk, keys)
            # Distinct rows hit distinct blocks (step >= 1), so this in-place add never overlaps itself.
            problem.window(flat, call, int(column[0]), step, hi - lo, problem.dim).add_(grad[:, :, lo:hi])
        else:
            scattered.append(j)
    if not scattered:
        return
    if keys < n * problem.bk:
        grad = F.pad(grad, (0, 0, 0, n * problem.bk - keys))
    cols = torch.tensor(scattered)
    values = grad.reshape(rows, problem.frame.kernel_heads, n, problem.bk * problem.dim)[:, :, cols]
    index = problem.kv_index(call, blocks[:, cols]).reshape(-1)
    buffer.index_add_(0, index, values.reshape(-1, problem.bk * problem.dim))


def _unblock(blocks: torch.Tensor, batch: int, heads: int, length: int, dim: int, dtype) -> torch.Tensor:
    """``[B * H * nblocks, block * D]`` -> ``[B, H, length, D]`` in `dtype`."""
    return blocks.view(batch, heads, -1, dim)[:, :, :length].to(dtype).contiguous()


def _backward_with_dlse(do, dlse, q, k, v, out, lse, layout, scale, key_mask, mods):
    """Fold ``delta -= dlse`` into one extra head-dim column: q, k, v get 0, out gets 1, dO gets -dlse.

    Scores and dO @ V^T are unchanged by a zero column, while rowsum(dO * O) picks up exactly -dlse.
    """
    zero_col = lambda t: F.pad(t, (0, 1))
    out_aug = torch.cat([out, torch.ones_like(out[..., :1])], -1)
    do_aug = torch.cat([do, -dlse.to(do.dtype)[..., None]], -1)
    *grads, d_rel_bias = backward(
        do_aug, None, zero_col(q), zero_col(k), zero_col(v), out_aug, lse, layout, scale, key_mask, mods
    )
    return (*(g[..., :-1].contiguous() for g in grads), d_rel_bias)


def _on_cpu(fn, device, *args):
    """Run `fn` on CPU copies of its tensor arguments (the fused kernel is CPU-only), results back on `device`."""
    moved = [
        a.cpu()
        if isinstance(a, torch.Tensor)
        else a.to("cpu")
        if isinstance(a, BlockLayout)
        else _mods_on_cpu(a)
        if isinstance(a, ScoreMods)
        else a
        for a in args
    ]
    return tuple(None if t is None else t.to(device) for t in fn(*moved))


def _mods_on_cpu(mods: ScoreMods) -> ScoreMods:
    cpu = lambda t: None if t is None else t.cpu()
    return ScoreMods(mods.softcap, cpu(mods.alibi_slopes), cpu(mods.rel_bias))
