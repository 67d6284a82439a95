"""Block-sparse attention kernels, FlashAttention-2 style: forward and a three-pass, atomic-free backward.

Algorithm
- Forward (`_bsattn_fwd_kernel`): one program per (query tile, batch x query head). It walks the layout
  row of its query block twice: the full key blocks with no mask work, then the partial ones with their
  exact token mask, unpacked from the bit-packed ``tiles`` (per row, the int32 word ``col // 32`` is
  loaded once per 32 columns and bit ``col % 32`` tested). Online softmax in base 2 with ``scale * log2(e)`` folded into the scores, an fp32
  accumulator, and the natural-log logsumexp stored for the backward pass.
- Backward: `_bsattn_bwd_preprocess` computes ``delta = rowsum(dO * O) - dlse``; `_bsattn_bwd_dkdv_kernel`
  runs one program per (key tile, batch x kv head), walks the layout *columns* (CSC) of every query head
  that shares its kv head (GQA) and accumulates dK, dV in registers; `_bsattn_bwd_dq_kernel` runs one
  program per (query tile, batch x query head) over the layout rows. No atomics: bitwise deterministic.

Assumptions and limits
- The kernel tile divides the layout block: ``LAYOUT_BQ % BLOCK_M == 0`` and ``LAYOUT_BK % BLOCK_N == 0``;
  a layout block then spans ``LAYOUT_B* // BLOCK_*`` tiles, visited in the same flat loop as the blocks.
- ``HEAD_DIM`` is padded to the power of two ``HEAD_DIM_PAD`` (>= 16); the tail is masked.
- Every tensor comes with its four strides; batch/head bases and tile starts are int64, in-tile offsets
  int32 (a tile spans at most BLOCK rows of one head).
- Partial tiles carry their own bounds (bits outside the sequence are 0); full tiles get the sequence
  bounds mask, and loads/stores their bounds masks, unless ``EVEN_M``/``EVEN_N`` say the lengths divide
  the *layout* block (then no tile, not even a sub-tile of a layout block, crosses the end).
  ``key_mask`` (per batch) is applied to every tile when ``HAS_KEY_MASK``.
- Tiles are at least 32 keys wide and start at multiples of 32 (one packed word per 32 columns).
- A query row with no visible key gets out 0 and lse -inf; the running max is guarded so nothing is NaN.
- ``lse``/``delta`` are contiguous fp32 ``[B, Hq, Sq]``; ``key_mask`` is uint8 ``[B, Skv]`` (batch stride given).
"""

import triton
import triton.language as tl

# Globals a jit function reads must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tile_bits(
    tiles_ptr,
    tile_id,
    rows,
    col0,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    WORDS: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """Visibility of tile rows `rows` x columns ``col0 + arange(BLOCK_N)`` (col0 % 32 == 0): bool
    ``[len(rows), BLOCK_N]``, or ``[BLOCK_N, len(rows)]`` when TRANSPOSED.

    Only one int32 word per row and 32 columns is loaded (a gather per element would hold a 64-bit pointer
    per element in registers); the words are broadcast across their 32 columns, then shifted.
    """
    offs_n = tl.arange(0, BLOCK_N)
    row_words = tiles_ptr + tile_id.to(tl.int64) * (LAYOUT_BQ * WORDS) + rows * WORDS + col0 // 32
    if TRANSPOSED:
        words = tl.zeros([BLOCK_N, rows.shape[0]], tl.int32)
        for j in tl.static_range(BLOCK_N // 32):
            word = tl.load(row_words + j)
            words = tl.where((offs_n // 32 == j)[:, None], word[None, :], words)
        return ((words >> (offs_n % 32)[:, None]) & 1) != 0
    else:
        words = tl.zeros([rows.shape[0], BLOCK_N], tl.int32)
        for j in tl.static_range(BLOCK_N // 32):
            word = tl.load(row_words + j)
            words = tl.where((offs_n // 32 == j)[None, :], word[:, None], words)
        return ((words >> (offs_n % 32)[None, :]) & 1) != 0


@triton.jit
def _fwd_tile(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    km_base,
    tiles_ptr,
    tile_id,
    n_start,
    in_block_rows,
    in_block_col0,
    kv_len,
    qk_scale,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    WORDS: tl.constexpr,
    IS_PARTIAL: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step of the forward pass over keys ``[n_start, n_start + BLOCK_N)``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    cols = n_start + offs_n
    k_ptrs = (
        k_base + n_start.to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    )
    v_ptrs = (
        v_base + n_start.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    )
    if HAS_KEY_MASK:
        # A padding key may hold garbage (NaN): load it as zeros so that no 0 * NaN reaches a dot.
        key_ok = tl.load(km_base + cols, mask=cols < kv_len, other=0) != 0
        k_t = tl.load(k_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & key_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif EVEN_N and HEAD_DIM == HEAD_DIM_PAD:
        # [HEAD_DIM_PAD, BLOCK_N]
        k_t = tl.load(k_ptrs)
        # [BLOCK_N, HEAD_DIM_PAD]
        v = tl.load(v_ptrs)
    else:
        k_t = tl.load(k_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & (cols[None, :] < kv_len), other=0.0)
        v = tl.load(v_ptrs, mask=(cols[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    # [BLOCK_M, BLOCK_N], log2 units
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if IS_PARTIAL:
        visible = _tile_bits(
            tiles_ptr, tile_id, in_block_rows, in_block_col0, BLOCK_N, LAYOUT_BQ, WORDS, False
        )
        if HAS_KEY_MASK:
            visible = visible & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
    elif HAS_KEY_MASK:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    elif not EVEN_N:
        s = tl.where((cols < kv_len)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _bsattn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    KeyMask,
    RowFullPtr,
    RowFullIdx,
    RowPartPtr,
    RowPartIdx,
    RowPartTile,
    Tiles,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_kmb,
    num_q_heads,
    group,
    q_len,
    kv_len,
    num_q_blocks,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    WORDS: tl.constexpr,
    PER_HEAD_LAYOUT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """Forward: out and natural-log lse of one query tile of one (batch, query head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_q_heads
    head = pid_bh % num_q_heads
    kv_head = head // group
    m_start = pid_m * BLOCK_M
    q_block = m_start // LAYOUT_BQ
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows = m_start + offs_m
    in_block_rows = m_start % LAYOUT_BQ + offs_m

    q_ptrs = (
        Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + m_start.to(tl.int64) * stride_qm
    )
    q_ptrs = q_ptrs + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q_mask = (rows[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    # [BLOCK_M, HEAD_DIM_PAD]
    if EVEN_M and HEAD_DIM == HEAD_DIM_PAD:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    km_base = KeyMask + batch.to(tl.int64) * stride_kmb

    layout_row = (head if PER_HEAD_LAYOUT else 0) * (num_q_blocks + 1) + q_block
    # Key tiles per layout block. Each list is walked as one flat loop over (block, sub-tile): a nested,
    # unrolled sub-tile loop lets the scheduler overlap sub-tiles and doubles the live registers.
    subs = LAYOUT_BK // BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    # Full blocks: no token mask.
    lo = tl.load(RowFullPtr + layout_row)
    hi = tl.load(RowFullPtr + layout_row + 1)
    for i in range(lo * subs, hi * subs):
        entry = i // subs
        sub = i % subs
        k_block = tl.load(RowFullIdx + entry)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k_base, v_base, km_base, Tiles, 0,
            k_block * LAYOUT_BK + sub * BLOCK_N, in_block_rows, sub * BLOCK_N, kv_len, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LAYOUT_BQ, WORDS, False, EVEN_N, HAS_KEY_MASK, DOT_PRECISION,
        )  # fmt: skip
    # Partial blocks: the exact token mask from the packed tile.
    lo = tl.load(RowPartPtr + layout_row)
    hi = tl.load(RowPartPtr + layout_row + 1)
    for i in range(lo * subs, hi * subs):
        entry = i // subs
        sub = i % subs
        k_block = tl.load(RowPartIdx + entry)
        tile_id = tl.load(RowPartTile + entry)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k_base, v_base, km_base, Tiles, tile_id,
            k_block * LAYOUT_BK + sub * BLOCK_N, in_block_rows, sub * BLOCK_N, kv_len, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LAYOUT_BQ, WORDS, True, EVEN_N, HAS_KEY_MASK, DOT_PRECISION,
        )  # fmt: skip

    # Empty rows (l = 0): out 0, lse -inf.
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * LN2, float("-inf"))
    o_ptrs = (
        Out
        + batch.to(tl.int64) * stride_ob
        + head.to(tl.int64) * stride_oh
        + m_start.to(tl.int64) * stride_om
    )
    o_ptrs = o_ptrs + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    lse_ptrs = Lse + pid_bh.to(tl.int64) * q_len + rows
    if EVEN_M and HEAD_DIM == HEAD_DIM_PAD:
        tl.store(lse_ptrs, lse)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty))
    else:
        tl.store(lse_ptrs, lse, mask=rows < q_len)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_mask)


@triton.jit
def _bsattn_bwd_preprocess(
    Out,
    DO,
    DLse,
    Lse,
    Delta,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    num_q_heads,
    q_len,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse for one query tile (dlse ignored on rows with lse = -inf)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_q_heads
    head = pid_bh % num_q_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (rows[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    o_ptrs = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    o_ptrs = o_ptrs + rows.to(tl.int64)[:, None] * stride_om + offs_d[None, :] * stride_od
    do_ptrs = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    do_ptrs = do_ptrs + rows.to(tl.int64)[:, None] * stride_dom + offs_d[None, :] * stride_dod
    # [BLOCK_M, HEAD_DIM_PAD]
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row_ptrs = pid_bh.to(tl.int64) * q_len + rows
    if HAS_DLSE:
        lse = tl.load(Lse + row_ptrs, mask=rows < q_len, other=0.0)
        dlse = tl.load(DLse + row_ptrs, mask=rows < q_len, other=0.0)
        delta = delta - tl.where(lse == float("-inf"), 0.0, dlse)
    tl.store(Delta + row_ptrs, delta, mask=rows < q_len)


@triton.jit
def _bwd_dkdv_tile(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    km_ok,
    tiles_ptr,
    tile_id,
    m_start,
    in_block_row0,
    in_block_col0,
    q_len,
    qk_scale,
    stride_qm,
    stride_qd,
    stride_dom,
    stride_dod,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    WORDS: tl.constexpr,
    IS_PARTIAL: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    EVEN_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV of one key tile over queries ``[m_start, m_start + BLOCK_M)`` (transposed math)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows = m_start + offs_m
    row_ok = rows < q_len
    q_ptrs = (
        q_base + m_start.to(tl.int64) * stride_qm + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qm
    )
    do_ptrs = (
        do_base
        + m_start.to(tl.int64) * stride_dom
        + offs_m[:, None] * stride_dom
        + offs_d[None, :] * stride_dod
    )
    if EVEN_M and HEAD_DIM == HEAD_DIM_PAD:
        # [HEAD_DIM_PAD, BLOCK_M]
        q_t = tl.load(q_ptrs)
        # [BLOCK_M, HEAD_DIM_PAD]
        do = tl.load(do_ptrs)
    else:
        q_t = tl.load(q_ptrs, mask=(offs_d[:, None] < HEAD_DIM) & row_ok[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    # Rows past q_len or with no visible key (lse = -inf): lse2 = +inf makes their probabilities 0.
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    # [BLOCK_N, BLOCK_M]
    s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if IS_PARTIAL:
        # [BLOCK_N, BLOCK_M]
        visible = _tile_bits(
            tiles_ptr, tile_id, in_block_row0 + offs_m, in_block_col0, BLOCK_N, LAYOUT_BQ, WORDS, True
        )
        if MASK_KEYS:
            visible = visible & km_ok[:, None]
        p_t = tl.where(visible, p_t, 0.0)
    elif MASK_KEYS:
        p_t = tl.where(km_ok[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    # [BLOCK_N, BLOCK_M]
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bsattn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DK,
    DV,
    KeyMask,
    ColFullPtr,
    ColFullIdx,
    ColPartPtr,
    ColPartIdx,
    ColPartTile,
    Tiles,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    stride_kmb,
    num_q_heads,
    num_kv_heads,
    group,
    q_len,
    kv_len,
    num_k_blocks,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    WORDS: tl.constexpr,
    PER_HEAD_LAYOUT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """dK, dV of one key tile of one (batch, kv head): walks the layout columns of its query heads."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    n_start = pid_n * BLOCK_N
    k_block = n_start // LAYOUT_BK
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    cols = n_start + offs_n
    kv_mask = (cols[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM)

    k_ptrs = (
        K
        + batch.to(tl.int64) * stride_kb
        + kv_head.to(tl.int64) * stride_kh
        + n_start.to(tl.int64) * stride_kn
    )
    v_ptrs = (
        V
        + batch.to(tl.int64) * stride_vb
        + kv_head.to(tl.int64) * stride_vh
        + n_start.to(tl.int64) * stride_vn
    )
    # Keys past kv_len are zero vectors whose rows are never stored, so only key_mask needs masking.
    if HAS_KEY_MASK:
        km_ok = tl.load(KeyMask + batch.to(tl.int64) * stride_kmb + cols, mask=cols < kv_len, other=0) != 0
        # A padding key may hold garbage (NaN): it loads as zeros, so its dK, dV come out 0, not NaN.
        load_mask = kv_mask & km_ok[:, None]
    else:
        km_ok = cols < kv_len
        load_mask = kv_mask
    # [BLOCK_N, HEAD_DIM_PAD]
    k = tl.load(k_ptrs + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=load_mask, other=0.0)
    v = tl.load(v_ptrs + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=load_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)

    # Query tiles per layout block, walked in one flat loop per list (see the forward kernel).
    subs = LAYOUT_BQ // BLOCK_M
    for g in range(group):
        head = kv_head * group + g
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        lse_base = Lse + (batch * num_q_heads + head).to(tl.int64) * q_len
        delta_base = Delta + (batch * num_q_heads + head).to(tl.int64) * q_len
        layout_col = (head if PER_HEAD_LAYOUT else 0) * (num_k_blocks + 1) + k_block
        lo = tl.load(ColFullPtr + layout_col)
        hi = tl.load(ColFullPtr + layout_col + 1)
        for i in range(lo * subs, hi * subs):
            entry = i // subs
            sub = i % subs
            q_block = tl.load(ColFullIdx + entry)
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, km_ok, Tiles, 0,
                q_block * LAYOUT_BQ + sub * BLOCK_M, sub * BLOCK_M, n_start % LAYOUT_BK, q_len, qk_scale,
                stride_qm, stride_qd, stride_dom, stride_dod,
                HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, LAYOUT_BQ, WORDS, False, HAS_KEY_MASK, EVEN_M, DOT_PRECISION,
            )  # fmt: skip
        lo = tl.load(ColPartPtr + layout_col)
        hi = tl.load(ColPartPtr + layout_col + 1)
        for i in range(lo * subs, hi * subs):
            entry = i // subs
            sub = i % subs
            q_block = tl.load(ColPartIdx + entry)
            tile_id = tl.load(ColPartTile + entry)
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, km_ok, Tiles, tile_id,
                q_block * LAYOUT_BQ + sub * BLOCK_M, sub * BLOCK_M, n_start % LAYOUT_BK, q_len, qk_scale,
                stride_qm, stride_qd, stride_dom, stride_dod,
                HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, LAYOUT_BQ, WORDS, True, HAS_KEY_MASK, EVEN_M, DOT_PRECISION,
            )  # fmt: skip

    dk_ptrs = (
        DK
        + batch.to(tl.int64) * stride_dkb
        + kv_head.to(tl.int64) * stride_dkh
        + n_start.to(tl.int64) * stride_dkn
    )
    dv_ptrs = (
        DV
        + batch.to(tl.int64) * stride_dvb
        + kv_head.to(tl.int64) * stride_dvh
        + n_start.to(tl.int64) * stride_dvn
    )
    dk_ptrs = dk_ptrs + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = dv_ptrs + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    if EVEN_N and HEAD_DIM == HEAD_DIM_PAD:
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_tile(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    km_base,
    tiles_ptr,
    tile_id,
    n_start,
    in_block_rows,
    in_block_col0,
    kv_len,
    qk_scale,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    WORDS: tl.constexpr,
    IS_PARTIAL: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ of one query tile over keys ``[n_start, n_start + BLOCK_N)``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    cols = n_start + offs_n
    k_ptrs = (
        k_base + n_start.to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn
    )
    v_ptrs = (
        v_base + n_start.to(tl.int64) * stride_vn + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn
    )
    if HAS_KEY_MASK:
        # Padding keys load as zeros, whatever garbage they hold (see the forward step).
        key_ok = tl.load(km_base + cols, mask=cols < kv_len, other=0) != 0
        load_mask_t = (offs_d[:, None] < HEAD_DIM) & key_ok[None, :]
        k_t = tl.load(k_ptrs, mask=load_mask_t, other=0.0)
        v_t = tl.load(v_ptrs, mask=load_mask_t, other=0.0)
    elif EVEN_N and HEAD_DIM == HEAD_DIM_PAD:
        # [HEAD_DIM_PAD, BLOCK_N]
        k_t = tl.load(k_ptrs)
        v_t = tl.load(v_ptrs)
    else:
        load_mask_t = (offs_d[:, None] < HEAD_DIM) & (cols[None, :] < kv_len)
        k_t = tl.load(k_ptrs, mask=load_mask_t, other=0.0)
        v_t = tl.load(v_ptrs, mask=load_mask_t, other=0.0)
    # [BLOCK_M, BLOCK_N]
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    p = tl.math.exp2(s - lse2[:, None])
    if IS_PARTIAL:
        visible = _tile_bits(
            tiles_ptr, tile_id, in_block_rows, in_block_col0, BLOCK_N, LAYOUT_BQ, WORDS, False
        )
        if HAS_KEY_MASK:
            visible = visible & key_ok[None, :]
        p = tl.where(visible, p, 0.0)
    elif HAS_KEY_MASK:
        p = tl.where(key_ok[None, :], p, 0.0)
    elif not EVEN_N:
        p = tl.where((cols < kv_len)[None, :], p, 0.0)
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bsattn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    DQ,
    KeyMask,
    RowFullPtr,
    RowFullIdx,
    RowPartPtr,
    RowPartIdx,
    RowPartTile,
    Tiles,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dom,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    stride_kmb,
    num_q_heads,
    group,
    q_len,
    kv_len,
    num_q_blocks,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    WORDS: tl.constexpr,
    PER_HEAD_LAYOUT: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    """dQ of one query tile of one (batch, query head): walks the layout row of its query block."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_q_heads
    head = pid_bh % num_q_heads
    kv_head = head // group
    m_start = pid_m * BLOCK_M
    q_block = m_start // LAYOUT_BQ
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows = m_start + offs_m
    in_block_rows = m_start % LAYOUT_BQ + offs_m
    row_ok = rows < q_len
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q_ptrs = (
        Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + m_start.to(tl.int64) * stride_qm
    )
    do_ptrs = (
        DO
        + batch.to(tl.int64) * stride_dob
        + head.to(tl.int64) * stride_doh
        + m_start.to(tl.int64) * stride_dom
    )
    # [BLOCK_M, HEAD_DIM_PAD]
    q = tl.load(q_ptrs + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    do = tl.load(
        do_ptrs + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0
    )
    row_base = pid_bh.to(tl.int64) * q_len
    lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("-inf"))
    # Rows with no visible key (lse = -inf): lse2 = +inf makes their probabilities 0, so dq = 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    km_base = KeyMask + batch.to(tl.int64) * stride_kmb
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    layout_row = (head if PER_HEAD_LAYOUT else 0) * (num_q_blocks + 1) + q_block
    # Key tiles per layout block. Each list is walked as one flat loop over (block, sub-tile): a nested,
    # unrolled sub-tile loop lets the scheduler overlap sub-tiles and doubles the live registers.
    subs = LAYOUT_BK // BLOCK_N
    lo = tl.load(RowFullPtr + layout_row)
    hi = tl.load(RowFullPtr + layout_row + 1)
    for i in range(lo * subs, hi * subs):
        entry = i // subs
        sub = i % subs
        k_block = tl.load(RowFullIdx + entry)
        dq = _bwd_dq_tile(
            dq, q, do, lse2, delta, k_base, v_base, km_base, Tiles, 0,
            k_block * LAYOUT_BK + sub * BLOCK_N, in_block_rows, sub * BLOCK_N, kv_len, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LAYOUT_BQ, WORDS, False, EVEN_N, HAS_KEY_MASK, DOT_PRECISION,
        )  # fmt: skip
    lo = tl.load(RowPartPtr + layout_row)
    hi = tl.load(RowPartPtr + layout_row + 1)
    for i in range(lo * subs, hi * subs):
        entry = i // subs
        sub = i % subs
        k_block = tl.load(RowPartIdx + entry)
        tile_id = tl.load(RowPartTile + entry)
        dq = _bwd_dq_tile(
            dq, q, do, lse2, delta, k_base, v_base, km_base, Tiles, tile_id,
            k_block * LAYOUT_BK + sub * BLOCK_N, in_block_rows, sub * BLOCK_N, kv_len, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LAYOUT_BQ, WORDS, True, EVEN_N, HAS_KEY_MASK, DOT_PRECISION,
        )  # fmt: skip

    dq_ptrs = (
        DQ
        + batch.to(tl.int64) * stride_dqb
        + head.to(tl.int64) * stride_dqh
        + m_start.to(tl.int64) * stride_dqm
    )
    dq_ptrs = dq_ptrs + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    if EVEN_M and HEAD_DIM == HEAD_DIM_PAD:
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)
