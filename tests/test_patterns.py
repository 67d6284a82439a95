"""Every generator against its definition, written out independently here, token by token."""

import pytest
import torch

import sparse_attn as sa

SIZES = [(1, 1), (37, 37), (97, 97), (161, 161), (1, 37), (37, 97), (97, 37), (161, 40)]


def positions(q_len, kv_len):
    """(qpos [Sq, 1], j [1, Skv], i [Sq, 1]) with queries aligned bottom-right."""
    i = torch.arange(q_len)[:, None]
    return i + kv_len - q_len, torch.arange(kv_len)[None, :], i


def band(q_len, kv_len, lo, hi, dilation=1):
    qpos, j, _ = positions(q_len, kv_len)
    d = qpos - j
    return (d >= lo) & (d <= hi) & (d % dilation == 0)


@pytest.mark.parametrize("q_len,kv_len", SIZES)
@pytest.mark.parametrize("left,right", [(0, 0), (3, 3), (5, 0), (0, 7), (40, 2)])
def test_sliding_window(q_len, kv_len, left, right):
    got = sa.sliding_window(left, right).mask(q_len, kv_len)
    assert torch.equal(got, band(q_len, kv_len, -right, left))


@pytest.mark.parametrize("q_len,kv_len", SIZES)
@pytest.mark.parametrize("left,right", [(3, 3), (8, 2), (0, 4)])
def test_sliding_window_equals_xformers_bottom_right_local(q_len, kv_len, left, right):
    attn_bias = pytest.importorskip("xformers.ops.fmha.attn_bias")
    bias = attn_bias.LocalAttentionFromBottomRightMask(window_left=left, window_right=right)
    expected = bias.materialize((q_len, kv_len), dtype=torch.float32) == 0
    assert torch.equal(sa.sliding_window(left, right).mask(q_len, kv_len), expected)


def test_sliding_window_right_defaults_to_left():
    assert torch.equal(sa.sliding_window(4).mask(30), sa.sliding_window(4, 4).mask(30))


@pytest.mark.parametrize("q_len,kv_len", SIZES)
@pytest.mark.parametrize("left,right,dilation", [(3, 3, 2), (4, 1, 3), (2, 2, 1), (0, 5, 4)])
def test_dilated(q_len, kv_len, left, right, dilation):
    got = sa.dilated(left, right, dilation=dilation).mask(q_len, kv_len)
    assert torch.equal(got, band(q_len, kv_len, -right * dilation, left * dilation, dilation))


def test_dilated_counts_attended_keys():
    row = sa.dilated(3, 2, dilation=4).mask(1, 40)[0]
    # The last query (position 39) sees 3 keys back and none ahead, each 4 apart, plus itself.
    assert torch.nonzero(row).squeeze(1).tolist() == [27, 31, 35, 39]


@pytest.mark.parametrize("q_len,kv_len", SIZES)
def test_causal(q_len, kv_len):
    qpos, j, _ = positions(q_len, kv_len)
    assert torch.equal(sa.causal().mask(q_len, kv_len), j <= qpos)


def test_causal_single_decode_query_sees_everything():
    assert sa.causal().mask(1, 50).all()


@pytest.mark.parametrize("q_len,kv_len", SIZES)
@pytest.mark.parametrize("spec", [0, 1, 3, [0, 5, 17, 36]])
def test_global_tokens(q_len, kv_len, spec):
    pos = torch.arange(spec) if isinstance(spec, int) else torch.tensor(spec)
    pos = pos[pos < kv_len]
    qpos, j, _ = positions(q_len, kv_len)
    expected = torch.isin(j, pos) | torch.isin(qpos, pos)
    assert torch.equal(sa.global_tokens(pos.tolist()).mask(q_len, kv_len), expected)


@pytest.mark.parametrize("q_len,kv_len", SIZES)
@pytest.mark.parametrize("n", [0, 1, 3, 40, 200])
def test_global_tokens_int_is_the_first_n_positions(q_len, kv_len, n):
    # An int n means positions 0..n-1, of which a shorter sequence simply has fewer.
    qpos, j, _ = positions(q_len, kv_len)
    pos = torch.arange(min(n, kv_len))
    expected = torch.isin(j, pos) | torch.isin(qpos, pos)
    assert torch.equal(sa.global_tokens(n).mask(q_len, kv_len), expected)


@pytest.mark.parametrize("q_len,kv_len", SIZES)
@pytest.mark.parametrize("cells", [(8, 8), (5, 7), (1, 1)])
def test_block_sparse_uses_row_index(q_len, kv_len, cells):
    gen = torch.Generator().manual_seed(q_len * 1000 + kv_len)
    bq, bk = cells
    grid = torch.rand(3, -(-q_len // bq) + 1, -(-kv_len // bk), generator=gen) > 0.5
    _, j, i = positions(q_len, kv_len)
    got = sa.block_sparse(grid, cells).mask(q_len, kv_len)
    assert got.shape == (3, q_len, kv_len)
    for h in range(3):
        assert torch.equal(got[h], grid[h][i // bq, j // bk])
    shared = sa.block_sparse(grid[0], cells).mask(q_len, kv_len)
    assert torch.equal(shared, got[0])


@pytest.mark.parametrize("q_len,kv_len", [(97, 97), (37, 161), (161, 161), (1, 161)])
def test_random_blocks_draws_distinct_blocks_per_query_block(q_len, kv_len):
    size, count = 16, 3
    m = sa.random_blocks(count, size, seed=7).mask(q_len, kv_len)
    qpos, j, _ = positions(q_len, kv_len)
    n_key_blocks = -(-kv_len // size)
    for r in range(q_len):
        cols = torch.unique(j[0][m[r]] // size)
        assert len(cols) == min(count, n_key_blocks)
        # Whole key blocks are kept, and every row of one query block keeps the same ones.
        assert int(m[r].sum()) == sum(min(size, kv_len - c * size) for c in cols.tolist())
        same_block = (qpos[:, 0] // size) == (qpos[r, 0] // size)
        assert (m[same_block] == m[r]).all()


def test_random_blocks_are_seeded_and_reproducible():
    a = sa.random_blocks(2, 8, seed=1).mask(100, 100)
    assert torch.equal(a, sa.random_blocks(2, 8, seed=1).mask(100, 100))
    assert not torch.equal(a, sa.random_blocks(2, 8, seed=2).mask(100, 100))
    heads = sa.random_blocks(2, 8, seed=1, heads=3).mask(100, 100)
    assert heads.shape == (3, 100, 100)
    assert not torch.equal(heads[0], heads[1])


@pytest.mark.parametrize("seed", [2**43, 2**63 - 1, -(2**63), 2**64 + 5, -(2**70)])
def test_random_blocks_take_any_int_seed(seed):
    # Seeds beyond int64 once overflowed inside the hash; any int is a valid seed.
    a = sa.random_blocks(2, 8, seed=seed, heads=2).mask(40, 96)
    assert torch.equal(a, sa.random_blocks(2, 8, seed=seed, heads=2).mask(40, 96))
    assert (a.sum(-1) == 16).all()  # two whole key blocks of 8 per row


def test_random_blocks_same_draw_for_decode_and_prefill():
    # A query block's draw depends on its absolute position, so the last row of a prefill equals a decode step.
    full = sa.random_blocks(3, 8, seed=5).mask(120, 120)
    decode = sa.random_blocks(3, 8, seed=5).mask(1, 120)
    assert torch.equal(full[-1:], decode)


def test_compositions():
    w, g, c = sa.sliding_window(4), sa.global_tokens(2), sa.causal()
    for q_len, kv_len in SIZES:
        mw, mg, mc = (p.mask(q_len, kv_len) for p in (w, g, c))
        assert torch.equal((w | g).mask(q_len, kv_len), mw | mg)
        assert torch.equal((w & c).mask(q_len, kv_len), mw & mc)
        assert torch.equal(((w | g) & c).mask(q_len, kv_len), (mw | mg) & mc)


def test_longformer_and_bigbird_are_their_compositions():
    lf = sa.longformer(6, 3).mask(97)
    assert torch.equal(lf, sa.sliding_window(6).mask(97) | sa.global_tokens(3).mask(97))
    lfd = sa.longformer(4, [0, 50], dilation=2).mask(97)
    assert torch.equal(lfd, sa.dilated(4, dilation=2).mask(97) | sa.global_tokens([0, 50]).mask(97))
    bb = sa.bigbird(8, 4, 2, block_size=16, seed=3).mask(161)
    parts = sa.sliding_window(8).mask(161) | sa.global_tokens(4).mask(161)
    parts |= sa.random_blocks(2, 16, seed=3).mask(161)
    assert torch.equal(bb, parts)


def test_per_head():
    pats = [sa.causal(), sa.sliding_window(3), sa.global_tokens(2) | sa.sliding_window(1)]
    m = sa.per_head(pats).mask(37, 50)
    assert m.shape == (3, 37, 50)
    for h, p in enumerate(pats):
        assert torch.equal(m[h], p.mask(37, 50))
    # Shared patterns compose with per-head ones by broadcasting over heads.
    mixed = (sa.per_head(pats) & sa.causal()).mask(37, 50)
    assert torch.equal(mixed, m & sa.causal().mask(37, 50))
    assert sa.causal().mask(5, heads=4).shape == (4, 5, 5)


@pytest.mark.parametrize(
    "make,error",
    [
        (lambda: sa.sliding_window(-1), ValueError),
        (lambda: sa.sliding_window(3, -2), ValueError),
        (lambda: sa.sliding_window(2.5), TypeError),
        (lambda: sa.dilated(3, dilation=0), ValueError),
        (lambda: sa.global_tokens([-1, 3]), ValueError),
        (lambda: sa.global_tokens([0.5]), TypeError),
        (lambda: sa.block_sparse(torch.ones(4, 4), 8), TypeError),
        (lambda: sa.block_sparse(torch.ones(4, dtype=torch.bool), 8), ValueError),
        (lambda: sa.block_sparse(torch.ones(4, 4, dtype=torch.bool), 0), ValueError),
        (lambda: sa.random_blocks(-1), ValueError),
        (lambda: sa.per_head([]), ValueError),
        (lambda: sa.per_head([sa.per_head([sa.causal()])]), ValueError),
        (lambda: sa.per_head([sa.causal(), sa.causal()]) | sa.per_head([sa.causal()] * 3), ValueError),
        (lambda: sa.causal() | "window", TypeError),
    ],
)
def test_bad_arguments_raise(make, error):
    with pytest.raises(error):
        make()


def test_bad_lengths_raise():
    with pytest.raises(ValueError, match="out of range"):
        sa.global_tokens([0, 60]).mask(30, 50)
    with pytest.raises(ValueError, match="does not cover"):
        sa.block_sparse(torch.ones(3, 3, dtype=torch.bool), 16).layout(64, 40, block_size=16)
    with pytest.raises(ValueError, match="q_len"):
        sa.causal().mask(0)
    with pytest.raises(ValueError, match="heads"):
        sa.per_head([sa.causal(), sa.causal()]).mask(8, heads=3)
