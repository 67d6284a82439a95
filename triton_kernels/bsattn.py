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
- Score modifiers (`sparse_attn.score_mods`), each a constexpr flag (off: the code of a call without them):
  HAS_SOFTCAP (``c * tanh(s / c)``, in log2 units with cap ``c * log2(e)``), HAS_ALIBI (``-slope * |j - qpos|``)
  and HAS_REL_BIAS (``rel_bias[h, j - i + Sq - 1]``), applied to every kept tile, full or partial, from the
  tile's row and column indices, before the mask. The backward recomputes the modified score; dQ/dK take
  ``dS * (1 - tanh**2)`` with a softcap. d rel_bias (the per-diagonal sums of dS) comes from the dQ pass:
  each tile stores its diagonal sums per (layout entry, sub-tile), and `_bsattn_rel_bias_reduce` adds them
  up per 32-diagonal chunk in a fixed order (see ``launch._RelBiasGrad``): no atomics there either.

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
- The layout sequence of (batch b, query head h) is ``(b * layout_heads if PER_BATCH_LAYOUT else 0) +
  (h if PER_HEAD_LAYOUT else 0)`` (see `sparse_attn.layout`); a layout shared by the batch compiles to
  exactly the code it had before per-batch layouts existed.
- ``lse``/``delta`` are contiguous fp32 ``[B, Hq, Sq]``; ``key_mask`` is uint8 ``[B, Skv]`` (batch stride given).
"""

import triton
import triton.language as tl

# Globals a jit function reads must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: rel_bias gradient: the per-tile diagonal sums are added up in aligned chunks of this many diagonals.
DIAG_CHUNK = tl.constexpr(32)


# -- loads and stores of one head's rows ---------------------------------------------------------------
@triton.jit
def _head_base(ptr, batch, head, stride_b, stride_h):
    """Pointer to the first row of one (batch, head) of a ``[B, H, S, D]`` tensor (int64 offsets)."""
    return ptr + batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h


@triton.jit
def _load_rows(
    base, start, stride_row, stride_d, n_rows,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    EVEN: tl.constexpr, TRANSPOSED: tl.constexpr, rows_ok=None, USE_ROWS_OK: tl.constexpr = False,
):  # fmt: skip
    """Rows ``[start, start + BLOCK)`` of one head: ``[BLOCK, HEAD_DIM_PAD]``, or ``[HEAD_DIM_PAD, BLOCK]``
    when TRANSPOSED; 0 past `n_rows` and HEAD_DIM (no masks when EVEN and the head dim is a power of 2).
    With USE_ROWS_OK, the rows to load are `rows_ok` ``[BLOCK]`` instead (the others load as 0)."""
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    if USE_ROWS_OK:
        row_mask = rows_ok
    else:
        row_mask = start + offs < n_rows
    base = base + start.to(tl.int64) * stride_row
    if TRANSPOSED:
        ptrs = base + offs_d[:, None] * stride_d + offs[None, :] * stride_row
        mask = (offs_d[:, None] < HEAD_DIM) & row_mask[None, :]
    else:
        ptrs = base + offs[:, None] * stride_row + offs_d[None, :] * stride_d
        mask = row_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
    if EVEN and HEAD_DIM == HEAD_DIM_PAD and not USE_ROWS_OK:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=mask, other=0.0)
    return tile


@triton.jit
def _store_rows(
    base, start, stride_row, stride_d, n_rows, value,
    BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, EVEN: tl.constexpr,
):  # fmt: skip
    """Store `value` ``[BLOCK, HEAD_DIM_PAD]`` into rows ``[start, start + BLOCK)`` of one head."""
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    ptrs = base + start.to(tl.int64) * stride_row + offs[:, None] * stride_row + offs_d[None, :] * stride_d
    value = value.to(base.dtype.element_ty)
    if EVEN and HEAD_DIM == HEAD_DIM_PAD:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=((start + offs)[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


# -- the layout: walking a row (or column), and which keys of a tile are visible ------------------------
@triton.jit
def _walk_bounds(FullPtr, PartPtr, line, SUBS: tl.constexpr, PARTIAL: tl.constexpr):
    """Bounds of the flat loop over (entry, sub-tile) of one layout row (or column): its full blocks, or
    its partial ones. A block spans SUBS kernel tiles; one flat loop, not a nested unrolled sub-tile loop,
    because the unrolled one lets the scheduler overlap sub-tiles and doubles the live registers."""
    if PARTIAL:
        ptr = PartPtr + line
    else:
        ptr = FullPtr + line
    return tl.load(ptr) * SUBS, tl.load(ptr + 1) * SUBS


@triton.jit
def _walk_step(FullIdx, PartIdx, PartTile, i, SUBS: tl.constexpr, PARTIAL: tl.constexpr):
    """Step `i` of the flat loop: ``(block, sub-tile, tile id)`` (tile id 0 for a full block)."""
    entry = i // SUBS
    if PARTIAL:
        block = tl.load(PartIdx + entry)
        tile_id = tl.load(PartTile + entry)
    else:
        block = tl.load(FullIdx + entry)
        tile_id = 0
    return block, i % SUBS, tile_id


@triton.jit
def _tile_bits(
    tiles_ptr, tile_id, rows, col0,
    BLOCK_N: tl.constexpr, LAYOUT_BQ: tl.constexpr, WORDS: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
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
def _real_keys(km_base, cols, kv_len, HAS_KEY_MASK: tl.constexpr):
    """Keys `cols` that exist (< kv_len) and, with a key mask, are real (not padding)."""
    if HAS_KEY_MASK:
        real = tl.load(km_base + cols, mask=cols < kv_len, other=0) != 0
    else:
        real = cols < kv_len
    return real


@triton.jit
def _hide_invisible(
    x, fill, tiles_ptr, tile_id, tile_rows, col0, real_keys,
    BLOCK_N: tl.constexpr, LAYOUT_BQ: tl.constexpr, WORDS: tl.constexpr,
    IS_PARTIAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, CHECK_BOUNDS: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """`x` (scores or probabilities, ``[rows, keys]`` or ``[keys, rows]`` when TRANSPOSED) with `fill`
    wherever the pair is not visible: the partial tile's token mask, padding keys (`real_keys`, read only
    with a key mask or CHECK_BOUNDS), and keys past the end when CHECK_BOUNDS (partial tiles carry their
    own bounds). A full tile with neither costs nothing."""
    if TRANSPOSED:
        real = real_keys[:, None]
    else:
        real = real_keys[None, :]
    if IS_PARTIAL:
        visible = _tile_bits(tiles_ptr, tile_id, tile_rows, col0, BLOCK_N, LAYOUT_BQ, WORDS, TRANSPOSED)
        if HAS_KEY_MASK:
            visible = visible & real
        x = tl.where(visible, x, fill)
    elif HAS_KEY_MASK or CHECK_BOUNDS:
        x = tl.where(real, x, fill)
    return x


# -- score modifiers (softcap, ALiBi, relative-position bias) ------------------------------------------
@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 (Triton's interpreter has no libdevice): ``(1 - e) / (1 + e)``, ``e = exp(-2|x|)``,
    and an odd Taylor polynomial below |x| = 1/8, where that quotient loses relative accuracy (about 2 ulp
    everywhere against float64)."""
    a = tl.abs(x)
    e = tl.math.exp2(a * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a + a * a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0))))
    y = tl.where(a < 0.125, small, big)
    return tl.where(x < 0.0, -y, y)


@triton.jit
def _modify_scores(
    s, rows, cols, q_len, kv_len, softcap2, slope2, rb_base,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_REL_BIAS: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """Scores `s` in log2 units (``[rows, cols]``, or ``[cols, rows]`` when TRANSPOSED) after the score modifiers:
    ``(s, t)`` with t = tanh of the capped score over the cap (for the softcap derivative ``1 - t**2``; `s`
    itself without a softcap). All three are in log2 units already: ``softcap2 = c * log2(e)``, ``slope2 =
    slope * log2(e)``, `rb_base` the head's ``rel_bias * log2(e)`` in float32, at diagonal 0 of a row padded
    on both sides so that every tile's rows and columns (up to the layout-block-rounded lengths) index inside
    it: the bias loads need no mask. Positions come from the tile's row and column indices."""
    t = s
    if HAS_SOFTCAP:
        t = _tanh(s * (1.0 / softcap2))
        s = softcap2 * t
    if HAS_ALIBI or HAS_REL_BIAS:
        # Diagonal j - i + Sq - 1 (the rel_bias index): rel = j - qpos = diag - (Skv - 1).
        if TRANSPOSED:
            diag = cols[:, None] - rows[None, :] + (q_len - 1)
        else:
            diag = cols[None, :] - rows[:, None] + (q_len - 1)
        if HAS_ALIBI:
            s = s - slope2 * tl.abs(diag - (kv_len - 1)).to(tl.float32)
        if HAS_REL_BIAS:
            s = s + tl.load(rb_base + diag)
    return s, t


@triton.jit
def _diagonal_sums(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sums of `x` ``[BLOCK_M, BLOCK_N]`` along its diagonals: ``[BLOCK_M + BLOCK_N]``, entry w the sum over
    ``jj - ii == w - BLOCK_M`` (entry 0 is always 0). Row ii is skewed right by ``BLOCK_M - ii`` with a
    gather within the row, then the rows are summed."""
    ii = tl.arange(0, BLOCK_M)
    w = tl.arange(0, BLOCK_M + BLOCK_N)
    # [BLOCK_M, BLOCK_M + BLOCK_N]: the column of row ii on diagonal w
    src = w[None, :] - BLOCK_M + ii[:, None]
    ok = (src >= 0) & (src < BLOCK_N)
    skewed = tl.where(ok, tl.gather(x, tl.where(ok, src, 0), 1), 0.0)
    return tl.sum(skewed, 0)


@triton.jit
def _mod_params(
    Slopes, stride_slb, RelBias, stride_rbh, rb_zero, batch, head, HAS_ALIBI: tl.constexpr, HAS_REL_BIAS: tl.constexpr
):  # fmt: skip
    """One (batch, query head)'s ALiBi slope (log2 units) and its rel_bias row at diagonal 0 (`rb_zero` is where
    diagonal 0 sits in a padded row of `stride_rbh` entries)."""
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + batch * stride_slb + head)
    rb_base = RelBias
    if HAS_REL_BIAS:
        rb_base = RelBias + head.to(tl.int64) * stride_rbh + rb_zero
    return slope2, rb_base


# -- forward -------------------------------------------------------------------------------------------
@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q,
    k_base, stride_kn, stride_kd,
    v_base, stride_vn, stride_vd,
    km_base, tiles_ptr, tile_id, n_start, in_block_rows, in_block_col0, kv_len, qk_scale,
    rows, q_len, softcap2, slope2, rb_base,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, WORDS: tl.constexpr,
    IS_PARTIAL: tl.constexpr, EVEN_N: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_REL_BIAS: tl.constexpr,
):  # fmt: skip
    """One online-softmax step of the forward pass over keys ``[n_start, n_start + BLOCK_N)``."""
    real = _real_keys(km_base, n_start + tl.arange(0, BLOCK_N), kv_len, HAS_KEY_MASK)
    # A padding key may hold garbage (NaN, inf). Its scores need no care (hidden below by a select, which
    # drops NaN too), but its V row must not feed 0 * NaN into p @ v: it loads as zeros with a key mask.
    # [HEAD_DIM_PAD, BLOCK_N]
    k_t = _load_rows(
        k_base, n_start, stride_kn, stride_kd, kv_len, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_N, True
    )
    # [BLOCK_N, HEAD_DIM_PAD]
    v = _load_rows(
        v_base, n_start, stride_vn, stride_vd, kv_len, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_N, False,
        real, HAS_KEY_MASK,
    )  # fmt: skip
    # [BLOCK_M, BLOCK_N], log2 units
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if HAS_SOFTCAP or HAS_ALIBI or HAS_REL_BIAS:
        s, _ = _modify_scores(
            s, rows, n_start + tl.arange(0, BLOCK_N), q_len, kv_len, softcap2, slope2, rb_base,
            HAS_SOFTCAP, HAS_ALIBI, HAS_REL_BIAS, False,
        )  # fmt: skip
    s = _hide_invisible(
        s, float("-inf"), tiles_ptr, tile_id, in_block_rows, in_block_col0, real,
        BLOCK_N, LAYOUT_BQ, WORDS, IS_PARTIAL, HAS_KEY_MASK, not EVEN_N, False,
    )  # fmt: skip
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
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    Out, stride_ob, stride_oh, stride_om, stride_od,
    Lse,
    KeyMask, stride_kmb,
    RowFullPtr, RowFullIdx, RowPartPtr, RowPartIdx, RowPartTile, Tiles,
    num_q_heads, group, q_len, kv_len, num_q_blocks, layout_heads, qk_scale,
    softcap2, Slopes, stride_slb, RelBias, stride_rbh, rb_zero,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, WORDS: tl.constexpr,
    PER_HEAD_LAYOUT: tl.constexpr, PER_BATCH_LAYOUT: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_REL_BIAS: tl.constexpr,
):  # fmt: skip
    """Forward: out and natural-log lse of one query tile of one (batch, query head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_q_heads
    head = pid_bh % num_q_heads
    kv_head = head // group
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    in_block_rows = m_start % LAYOUT_BQ + tl.arange(0, BLOCK_M)

    # [BLOCK_M, HEAD_DIM_PAD]
    q = _load_rows(
        _head_base(Q, batch, head, stride_qb, stride_qh), m_start, stride_qm, stride_qd, q_len,
        BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, EVEN_M, False,
    )  # fmt: skip
    k_base = _head_base(K, batch, kv_head, stride_kb, stride_kh)
    v_base = _head_base(V, batch, kv_head, stride_vb, stride_vh)
    km_base = KeyMask + batch.to(tl.int64) * stride_kmb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    slope2, rb_base = _mod_params(
        Slopes, stride_slb, RelBias, stride_rbh, rb_zero, batch, head, HAS_ALIBI, HAS_REL_BIAS
    )

    layout_seq = (batch * layout_heads if PER_BATCH_LAYOUT else 0) + (head if PER_HEAD_LAYOUT else 0)
    layout_row = layout_seq * (num_q_blocks + 1) + m_start // LAYOUT_BQ
    SUBS: tl.constexpr = LAYOUT_BK // BLOCK_N
    # The full key blocks (no token mask), then the partial ones (the exact mask from the packed tile).
    for PARTIAL in tl.static_range(2):
        lo, hi = _walk_bounds(RowFullPtr, RowPartPtr, layout_row, SUBS, PARTIAL)
        for i in range(lo, hi):
            k_block, sub, tile_id = _walk_step(RowFullIdx, RowPartIdx, RowPartTile, i, SUBS, PARTIAL)
            acc, m_i, l_i = _fwd_tile(
                acc, m_i, l_i, q, k_base, stride_kn, stride_kd, v_base, stride_vn, stride_vd,
                km_base, Tiles, tile_id, k_block * LAYOUT_BK + sub * BLOCK_N, in_block_rows, sub * BLOCK_N,
                kv_len, qk_scale, rows, q_len, softcap2, slope2, rb_base,
                HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LAYOUT_BQ, WORDS, PARTIAL, EVEN_N, HAS_KEY_MASK, DOT_PRECISION,
                EVEN_M, HAS_SOFTCAP, HAS_ALIBI, HAS_REL_BIAS,
            )  # fmt: skip

    # Empty rows (l = 0): out 0, lse -inf.
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * LN2, float("-inf"))
    lse_ptrs = Lse + pid_bh.to(tl.int64) * q_len + rows
    if EVEN_M and HEAD_DIM == HEAD_DIM_PAD:
        tl.store(lse_ptrs, lse)
    else:
        tl.store(lse_ptrs, lse, mask=rows < q_len)
    _store_rows(
        _head_base(Out, batch, head, stride_ob, stride_oh), m_start, stride_om, stride_od, q_len, out,
        BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, EVEN_M,
    )  # fmt: skip


# -- backward ------------------------------------------------------------------------------------------
@triton.jit
def _bsattn_bwd_preprocess(
    Out, stride_ob, stride_oh, stride_om, stride_od,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    DLse,
    Lse,
    Delta,
    num_q_heads, q_len,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) - dlse for one query tile (dlse ignored on rows with lse = -inf)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_q_heads
    head = pid_bh % num_q_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (rows[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    # Whole-row int64 offsets here (not _load_rows' int32 in-tile ones): fewer registers for this kernel.
    o_ptrs = _head_base(Out, batch, head, stride_ob, stride_oh)
    o_ptrs = o_ptrs + rows.to(tl.int64)[:, None] * stride_om + offs_d[None, :] * stride_od
    do_ptrs = _head_base(DO, batch, head, stride_dob, stride_doh)
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
    dk, dv, k, v,
    q_base, stride_qm, stride_qd,
    do_base, stride_dom, stride_dod,
    lse_base, delta_base, real_keys, tiles_ptr, tile_id, m_start, in_block_row0, in_block_col0,
    q_len, qk_scale, cols, kv_len, softcap2, slope2, rb_base,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, WORDS: tl.constexpr,
    IS_PARTIAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, EVEN_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_REL_BIAS: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key tile over queries ``[m_start, m_start + BLOCK_M)`` (transposed math)."""
    rows = m_start + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    # [HEAD_DIM_PAD, BLOCK_M]
    q_t = _load_rows(
        q_base, m_start, stride_qm, stride_qd, q_len, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, EVEN_M, True
    )
    # [BLOCK_M, HEAD_DIM_PAD]
    do = _load_rows(
        do_base, m_start, stride_dom, stride_dod, q_len, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, EVEN_M, False
    )
    # Rows past q_len or with no visible key (lse = -inf): lse2 = +inf makes their probabilities 0.
    lse = tl.load(lse_base + rows, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    # [BLOCK_N, BLOCK_M]
    s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * qk_scale
    if HAS_SOFTCAP or HAS_ALIBI or HAS_REL_BIAS:
        s_t, t_t = _modify_scores(
            s_t, rows, cols, q_len, kv_len, softcap2, slope2, rb_base,
            HAS_SOFTCAP, HAS_ALIBI, HAS_REL_BIAS, True,
        )  # fmt: skip
    p_t = tl.math.exp2(s_t - lse2[None, :])
    # Keys past kv_len are zero vectors whose dK/dV rows are never stored: no bounds check needed.
    p_t = _hide_invisible(
        p_t, 0.0, tiles_ptr, tile_id, in_block_row0 + tl.arange(0, BLOCK_M), in_block_col0, real_keys,
        BLOCK_N, LAYOUT_BQ, WORDS, IS_PARTIAL, HAS_KEY_MASK, False, True,
    )  # fmt: skip
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        # d(c * tanh(s / c)) / ds = 1 - tanh(s / c)**2, folded into p now so that t dies before dP is made.
        p_t = p_t * (1.0 - t_t * t_t)
    # [BLOCK_N, BLOCK_M]
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bsattn_bwd_dkdv_kernel(
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    Lse,
    Delta,
    DK, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    DV, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    KeyMask, stride_kmb,
    ColFullPtr, ColFullIdx, ColPartPtr, ColPartIdx, ColPartTile, Tiles,
    num_q_heads, num_kv_heads, group, q_len, kv_len, num_k_blocks, layout_heads, qk_scale, scale,
    softcap2, Slopes, stride_slb, RelBias, stride_rbh, rb_zero,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, WORDS: tl.constexpr,
    PER_HEAD_LAYOUT: tl.constexpr, PER_BATCH_LAYOUT: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_REL_BIAS: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key tile of one (batch, kv head): walks the layout columns of its query heads."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads
    n_start = pid_n * BLOCK_N
    k_base = _head_base(K, batch, kv_head, stride_kb, stride_kh)
    v_base = _head_base(V, batch, kv_head, stride_vb, stride_vh)
    real = _real_keys(
        KeyMask + batch.to(tl.int64) * stride_kmb, n_start + tl.arange(0, BLOCK_N), kv_len, HAS_KEY_MASK
    )
    # Keys past kv_len load as 0 (their dK, dV rows are never stored). A padding key may hold garbage
    # (NaN, inf): its p row is hidden (so its dV row is 0), and the NaN its K/V rows give stays in its own
    # dK row, zeroed at the end.
    # [BLOCK_N, HEAD_DIM_PAD]
    k = _load_rows(
        k_base, n_start, stride_kn, stride_kd, kv_len, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, False
    )
    v = _load_rows(
        v_base, n_start, stride_vn, stride_vd, kv_len, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, False
    )
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)

    SUBS: tl.constexpr = LAYOUT_BQ // BLOCK_M
    for g in range(group):
        head = kv_head * group + g
        q_base = _head_base(Q, batch, head, stride_qb, stride_qh)
        do_base = _head_base(DO, batch, head, stride_dob, stride_doh)
        lse_base = Lse + (batch * num_q_heads + head).to(tl.int64) * q_len
        delta_base = Delta + (batch * num_q_heads + head).to(tl.int64) * q_len
        slope2, rb_base = _mod_params(
            Slopes, stride_slb, RelBias, stride_rbh, rb_zero, batch, head, HAS_ALIBI, HAS_REL_BIAS
        )
        layout_seq = (batch * layout_heads if PER_BATCH_LAYOUT else 0) + (head if PER_HEAD_LAYOUT else 0)
        layout_col = layout_seq * (num_k_blocks + 1) + n_start // LAYOUT_BK
        for PARTIAL in tl.static_range(2):
            lo, hi = _walk_bounds(ColFullPtr, ColPartPtr, layout_col, SUBS, PARTIAL)
            for i in range(lo, hi):
                q_block, sub, tile_id = _walk_step(ColFullIdx, ColPartIdx, ColPartTile, i, SUBS, PARTIAL)
                dk, dv = _bwd_dkdv_tile(
                    dk, dv, k, v, q_base, stride_qm, stride_qd, do_base, stride_dom, stride_dod,
                    lse_base, delta_base, real, Tiles, tile_id,
                    q_block * LAYOUT_BQ + sub * BLOCK_M, sub * BLOCK_M, n_start % LAYOUT_BK, q_len, qk_scale,
                    n_start + tl.arange(0, BLOCK_N), kv_len, softcap2, slope2, rb_base,
                    HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, BLOCK_N, LAYOUT_BQ, WORDS,
                    PARTIAL, HAS_KEY_MASK, EVEN_M, DOT_PRECISION, EVEN_N, HAS_SOFTCAP, HAS_ALIBI, HAS_REL_BIAS,
                )  # fmt: skip

    if HAS_KEY_MASK:
        dk = tl.where(real[:, None], dk, 0.0)
    _store_rows(
        _head_base(DK, batch, kv_head, stride_dkb, stride_dkh), n_start, stride_dkn, stride_dkd, kv_len,
        dk * scale, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_N,
    )  # fmt: skip
    _store_rows(
        _head_base(DV, batch, kv_head, stride_dvb, stride_dvh), n_start, stride_dvn, stride_dvd, kv_len,
        dv, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_N,
    )  # fmt: skip


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse2, delta,
    k_base, stride_kn, stride_kd,
    v_base, stride_vn, stride_vd,
    km_base, tiles_ptr, tile_id, n_start, in_block_rows, in_block_col0, kv_len, qk_scale,
    rows, q_len, softcap2, slope2, rb_base, part_ptr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, WORDS: tl.constexpr,
    IS_PARTIAL: tl.constexpr, EVEN_N: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_M: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_REL_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query tile over keys ``[n_start, n_start + BLOCK_N)``; with HAS_REL_BIAS, also store
    the tile's per-diagonal sums of dS at `part_ptr` ``[BLOCK_M + BLOCK_N]`` (see `_diagonal_sums`)."""
    real = _real_keys(km_base, n_start + tl.arange(0, BLOCK_N), kv_len, HAS_KEY_MASK)
    # A padding key may hold garbage (NaN, inf): its ds column is hidden by a select after the product
    # (which drops NaN from its scores and from dO @ V^T alike), and its K row loads as zeros with a key
    # mask so that ds @ K sees no 0 * NaN.
    # [HEAD_DIM_PAD, BLOCK_N]
    k_t = _load_rows(
        k_base, n_start, stride_kn, stride_kd, kv_len, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_N, True,
        real, HAS_KEY_MASK,
    )  # fmt: skip
    v_t = _load_rows(
        v_base, n_start, stride_vn, stride_vd, kv_len, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, EVEN_N, True
    )
    # [BLOCK_M, BLOCK_N]
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
    if HAS_SOFTCAP or HAS_ALIBI or HAS_REL_BIAS:
        s, t = _modify_scores(
            s, rows, n_start + tl.arange(0, BLOCK_N), q_len, kv_len, softcap2, slope2, rb_base,
            HAS_SOFTCAP, HAS_ALIBI, HAS_REL_BIAS, False,
        )  # fmt: skip
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
    ds = _hide_invisible(
        p * (dp - delta[:, None]), 0.0, tiles_ptr, tile_id, in_block_rows, in_block_col0, real,
        BLOCK_N, LAYOUT_BQ, WORDS, IS_PARTIAL, HAS_KEY_MASK, not EVEN_N, False,
    )  # fmt: skip
    if HAS_REL_BIAS:
        # dS w.r.t. the modified score (before the softcap derivative): its diagonal sums are d rel_bias.
        tl.store(part_ptr + tl.arange(0, BLOCK_M + BLOCK_N), _diagonal_sums(ds, BLOCK_M, BLOCK_N))
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bsattn_bwd_dq_kernel(
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    Lse,
    Delta,
    DQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    KeyMask, stride_kmb,
    RowFullPtr, RowFullIdx, RowPartPtr, RowPartIdx, RowPartTile, Tiles,
    num_q_heads, group, q_len, kv_len, num_q_blocks, layout_heads, qk_scale, scale,
    softcap2, Slopes, stride_slb, RelBias, stride_rbh, rb_zero,
    DRelPart, DRelKey, num_full_entries, part_groups, num_chunks, chunk_shift,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr, LAYOUT_BK: tl.constexpr, WORDS: tl.constexpr,
    PER_HEAD_LAYOUT: tl.constexpr, PER_BATCH_LAYOUT: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_REL_BIAS: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile of one (batch, query head): walks the layout row of its query block.

    With HAS_REL_BIAS, every visited tile also stores its per-diagonal dS sums (``BLOCK_M + BLOCK_N`` floats)
    in `DRelPart` ``[slots, part_groups, BLOCK_M + BLOCK_N]``, slot = (layout entry, key sub-tile, query
    sub-tile), column = this (batch, head) among the `part_groups` that share the layout sequence; and in
    `DRelKey[slot]` its first diagonal chunk: ``head_key * num_chunks + (j - i + chunk_shift) // DIAG_CHUNK``
    of the tile's entry 0. `_bsattn_rel_bias_reduce` then adds the chunks up in a fixed order."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_q_heads
    head = pid_bh % num_q_heads
    kv_head = head // group
    m_start = pid_m * BLOCK_M
    rows = m_start + tl.arange(0, BLOCK_M)
    in_block_rows = m_start % LAYOUT_BQ + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len

    # [BLOCK_M, HEAD_DIM_PAD]
    q = _load_rows(
        _head_base(Q, batch, head, stride_qb, stride_qh), m_start, stride_qm, stride_qd, q_len,
        BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, False, False,
    )  # fmt: skip
    do = _load_rows(
        _head_base(DO, batch, head, stride_dob, stride_doh), m_start, stride_dom, stride_dod, q_len,
        BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, False, False,
    )  # fmt: skip
    row_base = pid_bh.to(tl.int64) * q_len
    lse = tl.load(Lse + row_base + rows, mask=row_ok, other=float("-inf"))
    # Rows with no visible key (lse = -inf): lse2 = +inf makes their probabilities 0, so dq = 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
    k_base = _head_base(K, batch, kv_head, stride_kb, stride_kh)
    v_base = _head_base(V, batch, kv_head, stride_vb, stride_vh)
    km_base = KeyMask + batch.to(tl.int64) * stride_kmb
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    slope2, rb_base = _mod_params(
        Slopes, stride_slb, RelBias, stride_rbh, rb_zero, batch, head, HAS_ALIBI, HAS_REL_BIAS
    )
    if HAS_REL_BIAS:
        # This (batch, head)'s column among those sharing its layout sequence, and its head in the sort key.
        part_col = (0 if PER_BATCH_LAYOUT else batch) * (1 if PER_HEAD_LAYOUT else num_q_heads) + (
            0 if PER_HEAD_LAYOUT else head
        )
        # The tile's diagonal j - i starts at n_start - m_start - BLOCK_M (its entry 0); chunk_shift, a
        # multiple of DIAG_CHUNK, makes every start >= 0, and every tile start is a multiple of DIAG_CHUNK.
        key_base = (
            (head if PER_HEAD_LAYOUT else 0) * num_chunks * DIAG_CHUNK + chunk_shift - m_start - BLOCK_M
        )

    layout_seq = (batch * layout_heads if PER_BATCH_LAYOUT else 0) + (head if PER_HEAD_LAYOUT else 0)
    layout_row = layout_seq * (num_q_blocks + 1) + m_start // LAYOUT_BQ
    SUBS: tl.constexpr = LAYOUT_BK // BLOCK_N
    for PARTIAL in tl.static_range(2):
        lo, hi = _walk_bounds(RowFullPtr, RowPartPtr, layout_row, SUBS, PARTIAL)
        for i in range(lo, hi):
            k_block, sub, tile_id = _walk_step(RowFullIdx, RowPartIdx, RowPartTile, i, SUBS, PARTIAL)
            n_start = k_block * LAYOUT_BK + sub * BLOCK_N
            part_ptr = DRelPart
            if HAS_REL_BIAS:
                slot = (i + PARTIAL * num_full_entries * SUBS) * (LAYOUT_BQ // BLOCK_M) + (
                    m_start % LAYOUT_BQ
                ) // BLOCK_M
                part_ptr = DRelPart + (slot.to(tl.int64) * part_groups + part_col) * (BLOCK_M + BLOCK_N)
                if part_col == 0:
                    tl.store(DRelKey + slot, (key_base + n_start) // DIAG_CHUNK)
            dq = _bwd_dq_tile(
                dq, q, do, lse2, delta, k_base, stride_kn, stride_kd, v_base, stride_vn, stride_vd,
                km_base, Tiles, tile_id, n_start, in_block_rows, sub * BLOCK_N,
                kv_len, qk_scale, rows, q_len, softcap2, slope2, rb_base, part_ptr,
                HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LAYOUT_BQ, WORDS, PARTIAL, EVEN_N, HAS_KEY_MASK, DOT_PRECISION,
                EVEN_M, HAS_SOFTCAP, HAS_ALIBI, HAS_REL_BIAS, BLOCK_M,
            )  # fmt: skip

    _store_rows(
        _head_base(DQ, batch, head, stride_dqb, stride_dqh), m_start, stride_dqm, stride_dqd, q_len,
        dq * scale, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, EVEN_M,
    )  # fmt: skip


@triton.jit
def _bsattn_rel_bias_reduce(
    Part, Order, ChunkPtr, DRelBias,
    num_chunks, part_groups, batch_groups, num_q_heads,
    DIAGS: tl.constexpr, PER_HEAD_LAYOUT: tl.constexpr,
):  # fmt: skip
    """One chunk of DIAG_CHUNK diagonals of d rel_bias for one query head: the sum, in a fixed order, of the
    tile chunks that land there (no atomics: bitwise deterministic).

    `Order` lists tile chunks (``slot * (DIAGS // DIAG_CHUNK) + chunk``) sorted by key ``head_key *
    num_chunks + chunk index``; ``ChunkPtr[key]`` .. ``ChunkPtr[key + 1]`` are the key's. Each tile chunk is
    summed over the `batch_groups` columns of `Part` (``[slots, part_groups, DIAGS]``) of this head."""
    chunk = tl.program_id(0)
    head = tl.program_id(1)
    key = (head if PER_HEAD_LAYOUT else 0) * num_chunks + chunk
    lo = tl.load(ChunkPtr + key)
    hi = tl.load(ChunkPtr + key + 1)
    offs = tl.arange(0, DIAG_CHUNK)
    acc = tl.zeros([DIAG_CHUNK], tl.float32)
    PER_TILE: tl.constexpr = DIAGS // DIAG_CHUNK
    for it in range(lo, hi):
        item = tl.load(Order + it)
        slot = item // PER_TILE
        base = Part + slot.to(tl.int64) * part_groups * DIAGS + (item % PER_TILE) * DIAG_CHUNK + offs
        for b in range(batch_groups):
            col = b if PER_HEAD_LAYOUT else b * num_q_heads + head
            acc += tl.load(base + col * DIAGS)
    tl.store(DRelBias + head.to(tl.int64) * num_chunks * DIAG_CHUNK + chunk * DIAG_CHUNK + offs, acc)
