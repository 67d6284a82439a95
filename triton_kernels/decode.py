"""Split-KV decode attention over a paged KV cache: kernel and launcher.

Algorithm. One program per (split, batch element x KV head). It holds the KV head's queries, the G query
heads of its group times the Sq query rows (``M = G * Sq``, padded to BLOCK_M >= 16 for `tl.dot`), and
walks its share of the listed pages: for each page, the physical page id from `Pages` (-1: skipped, never
read), then the page's keys in tiles of BLOCK_N rows, an online softmax in log2 units with an fp32
accumulator. It writes its partial output and logsumexp; the caller merges the splits by lse
(`sparse_attn.merge`). Splitting the pages over programs is what lets a batch of one with
a long cache fill the GPU.

Assumes: the pages and the score bias were planned from the pattern (`sparse_attn.paged.plan`): `Bias` is
float32 ``[B, Hb, Sq, P * PAGE_SIZE]`` (Hb 1 or Hq) and -inf where a pair is not visible, so the kernel
knows nothing of patterns. A softcap (`c * tanh(s / c)`) applies before the bias. A key no row of the
program sees is loaded as 0 (garbage past a sequence's end never reaches an output). Forward only.
Limits: head dims up to 256; PAGE_SIZE any (tiles are masked); no autotuning (decode is bandwidth-bound
and the tile is fixed by the group size).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# One tanh for every kernel (exp2-based: the interpreter has no libdevice).
from .bsattn import _tanh

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@triton.jit
def _decode_fwd_kernel(
    Q, stride_qb, stride_qh, stride_qs, stride_qd,
    K, stride_kp, stride_kr, stride_kh, stride_kd,
    V, stride_vp, stride_vr, stride_vh, stride_vd,
    Pages, stride_pb, stride_ph, stride_pp,
    Bias, stride_bb, stride_bh, stride_bs, stride_bk,
    Out, stride_ob, stride_oh, stride_os, stride_or, stride_od,
    Lse, stride_lb, stride_lh, stride_ls, stride_lr,
    kv_heads, q_len, num_listed, pages_per_split, scale2, softcap2, HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, BIAS_PER_HEAD: tl.constexpr, PAGES_PER_HEAD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Partial attention of one KV head's queries over one split of the listed pages."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    hkv = bh % kv_heads
    m = tl.arange(0, BLOCK_M)
    head = hkv * GROUP + m // q_len  # [BLOCK_M] query head of each row
    row = m % q_len
    m_ok = m < GROUP * q_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM  # all True when BLOCK_D == HEAD_DIM (then the loads vectorise)
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + row[:, None] * stride_qs + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    bias_head = head if BIAS_PER_HEAD else head * 0
    page_head = hkv if PAGES_PER_HEAD else 0
    # Scalar 64-bit bases, 32-bit tile offsets: a tile of 64-bit pointers costs two registers an element.
    bias_base = Bias + b * stride_bb
    bias_rows = bias_head * stride_bh + row * stride_bs  # [BLOCK_M]
    kv_tile = tl.arange(0, BLOCK_N)[:, None] * stride_kr + d[None, :] * stride_kd  # [BLOCK_N, BLOCK_D]
    v_tile = tl.arange(0, BLOCK_N)[:, None] * stride_vr + d[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = split * pages_per_split
    last = tl.minimum(first + pages_per_split, num_listed)
    for p in range(first, last):
        phys = tl.load(Pages + b * stride_pb + page_head * stride_ph + p * stride_pp).to(tl.int64)
        if phys >= 0:
            k_page = K + phys * stride_kp + hkv * stride_kh
            v_page = V + phys * stride_vp + hkv * stride_vh
            bias_page = bias_base + p * PAGE_SIZE * stride_bk  # within one bias row: int32 suffices
            for t in range(0, PAGE_SIZE, BLOCK_N):
                n = t + tl.arange(0, BLOCK_N)
                n_ok = n < PAGE_SIZE
                # [BLOCK_M, BLOCK_N], -inf where not visible (and on padding)
                bias = tl.load(bias_page + bias_rows[:, None] + n[None, :] * stride_bk,
                               mask=m_ok[:, None] & n_ok[None, :], other=float("-inf"))  # fmt: skip
                seen = tl.max(bias, 0) > float("-inf")  # [BLOCK_N] keys some row sees
                kv_mask = seen[:, None] & d_ok[None, :]
                k = tl.load(k_page + t * stride_kr + kv_tile, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
                s = tl.dot(q, tl.trans(k)) * scale2  # [BLOCK_M, BLOCK_N], log2 units
                if HAS_SOFTCAP:
                    s = softcap2 * _tanh(s * (1.0 / softcap2))
                s = tl.where(bias > float("-inf"), s + bias * 1.4426950408889634, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
                alpha = tl.math.exp2(m_i - m_safe)
                prob = tl.math.exp2(s - m_safe[:, None])
                l_i = l_i * alpha + tl.sum(prob, 1)
                v = tl.load(v_page + t * stride_vr + v_tile, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
                acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
                m_i = m_new
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(
        has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf")
    )
    o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + split * stride_os + row[:, None] * stride_or
    tl.store(o_ptrs + d[None, :] * stride_od, out, mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * stride_lb + head * stride_lh + split * stride_ls + row * stride_lr, lse, mask=m_ok)


def decode_partials(q, k_cache, v_cache, phys, bias, scale: float, softcap, num_splits: int):
    """Launch the kernel: ``(out [B, Hq, S, Sq, D], lse [B, Hq, S, Sq])`` float32, one entry per split.

    `phys` int ``[B, Hp, P]`` physical pages (-1: none), Hp 1 or Hkv; `bias` float32 ``[B, Hb, Sq, P *
    page_size]``, Hb 1 or Hq. Only the last dimension of q and the caches needs to be contiguous."""
    batch, hq, q_len, dim = q.shape
    _, page_size, hkv, _ = k_cache.shape
    group = hq // hkv
    listed = phys.shape[-1]
    splits = max(1, min(num_splits, listed))
    per_split = -(-listed // splits)
    splits = -(-listed // per_split)
    phys = phys.to(torch.int32)
    bias = bias.float()
    out = torch.empty(batch, hq, splits, q_len, dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, hq, splits, q_len, device=q.device, dtype=torch.float32)
    block_m = max(16, triton.next_power_of_2(group * q_len))
    block_d = max(16, triton.next_power_of_2(dim))
    block_n, num_warps = tile_config(block_m, block_d, page_size)
    _decode_fwd_kernel[(splits, batch * hkv)](
        q, *q.stride(),
        k_cache, *k_cache.stride(),
        v_cache, *v_cache.stride(),
        phys, *phys.stride(),
        bias, *bias.stride(),
        out, *out.stride(),
        lse, *lse.stride(),
        hkv, q_len, listed, per_split, scale * LOG2E, (softcap or 1.0) * LOG2E, HEAD_DIM=dim,
        GROUP=group, PAGE_SIZE=page_size, BIAS_PER_HEAD=bias.shape[1] > 1, PAGES_PER_HEAD=phys.shape[1] > 1,
        HAS_SOFTCAP=softcap is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=2,
    )  # fmt: skip
    return out, lse


def tile_config(block_m: int, block_d: int, page_size: int) -> tuple[int, int]:
    """``(BLOCK_N, num_warps)``: 64-key tiles and 4 warps; 8 warps for 64+ query rows or head dim 256, whose
    tiles are 32 keys (16 with 64+ rows). Chosen so the compiled kernel does not spill on sm_80 or sm_90a
    (`sparse_attn.kernel_report.decode_report`)."""
    widest = 64 if block_d < 256 else (16 if block_m >= 64 else 32)
    block_n = max(16, min(widest, triton.next_power_of_2(page_size)))
    num_warps = 8 if block_m >= 64 or block_d >= 256 else 4
    return block_n, num_warps


def default_splits(batch: int, kv_heads: int, pages: int, device) -> int:
    """Splits so that ``batch * kv_heads * splits`` covers the GPU's SMs about twice (two under the
    interpreter, which runs one program at a time: enough to exercise the merge)."""
    if device.type != "cuda":
        return max(1, min(pages, 2))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(pages, -(-2 * sms // (batch * kv_heads))))


# torch.compile runs the device query at trace time and keeps the split count as a constant of the graph
# (what ``torch.compiler.assume_constant_result`` marks, without importing torch._dynamo here).
default_splits._dynamo_marked_constant = True
