"""N-dimensional patterns: `neighborhood` (NATTEN), `sliding_tile` (STA) and `tile_major` reordering.

The truth is built here from the CONTRACT's formulas, one dimension at a time with plain Python integers
(never from the library's own `mask()`), then combined per query: a key is visible when it is visible in
every dimension. Layouts must equal it token for token and classify every block exactly; attention through
both backends must equal the dense float64 reference.
"""

import itertools
import math
import time

import pytest
import torch
from reference_check import assert_close_to_reference, loss_of

import sparse_attn as sa
from sparse_attn.reference import attention_reference
from sparse_attn.spec import parse_spec


# -- independent truth -------------------------------------------------------------------------------------
def natten_window_1d(x, n, k, dilation, stride, causal):
    """The keys (coordinates) query coordinate x sees along one dimension, from the CONTRACT's text."""
    group, index = x % dilation, x // dilation
    length = math.ceil((n - group) / dilation)
    if causal:
        leader = min((index // stride) * stride + stride - 1, length - 1)
        first, last = max(0, leader - k + 1), index
    else:
        leader = min((index // stride) * stride + stride // 2, length - 1)
        first = min(max(leader - k // 2, 0), length - k)
        last = first + k - 1
    return {group + dilation * t for t in range(first, last + 1)}


def sta_window_1d(x, n, tile, window):
    tiles = math.ceil(n / tile)
    first = min(max(x // tile - window // 2, 0), tiles - window)
    return {y for y in range(n) if first <= y // tile < first + window}


def grid_truth(grid, window_1d):
    """bool [S, S] over the row-major cells: `window_1d(d, x)` gives dimension d's visible coordinates."""
    per_dim = []
    for d, n in enumerate(grid):
        m = torch.zeros(n, n, dtype=torch.bool)
        for x in range(n):
            m[x, sorted(window_1d(d, x))] = True
        per_dim.append(m)
    cells = list(itertools.product(*(range(n) for n in grid)))
    truth = torch.ones(len(cells), len(cells), dtype=torch.bool)
    for d in range(len(grid)):
        coord = torch.tensor([c[d] for c in cells])
        truth &= per_dim[d][coord[:, None], coord[None, :]]
    return truth


def per_dim(value, ndim):
    return tuple(value) if isinstance(value, tuple) else (value,) * ndim


def neighborhood_truth(grid, kernel_size, dilation=1, stride=1, causal=False):
    nd = len(grid)
    k, dl, st, ca = (per_dim(v, nd) for v in (kernel_size, dilation, stride, causal))
    return grid_truth(grid, lambda d, x: natten_window_1d(x, grid[d], k[d], dl[d], st[d], ca[d]))


def sliding_tile_truth(grid, tile, window):
    nd = len(grid)
    t, w = per_dim(tile, nd), per_dim(window, nd)
    return grid_truth(grid, lambda d, x: sta_window_1d(x, grid[d], t[d], w[d]))


def block_classes(mask, block_q, block_k):
    """int [nqb, nkb]: 0 empty, 1 partial, 2 full, from the token truth (padding counts as visible for
    "full" and invisible for "any")."""
    q_len, kv_len = mask.shape
    nqb, nkb = -(-q_len // block_q), -(-kv_len // block_k)
    padded = torch.zeros(nqb * block_q, nkb * block_k, dtype=torch.bool)
    real = padded.clone()
    padded[:q_len, :kv_len], real[:q_len, :kv_len] = mask, True
    tiles = padded.view(nqb, block_q, nkb, block_k).transpose(1, 2).flatten(2)
    hidden = (real & ~padded).view(nqb, block_q, nkb, block_k).transpose(1, 2).flatten(2)
    return torch.where(~hidden.any(-1), 2, tiles.any(-1).to(torch.int64)).to(torch.int8)


def check_layout(pattern, truth, block_sizes=((8, 8), (5, 7), (16, 32), (64, 64))):
    s = truth.shape[0]
    assert torch.equal(pattern.mask(s), truth)
    for bq, bk in block_sizes:
        layout = pattern.layout(s, block_size=(bq, bk))
        assert torch.equal(layout.to_dense()[0], truth), (bq, bk)
        assert torch.equal(layout.to_block_mask()[0], block_classes(truth, bq, bk)), (bq, bk)


# -- neighborhood ------------------------------------------------------------------------------------------
NEIGHBORHOODS = [
    # grid, kernel_size, dilation, stride, causal
    ((13,), 3, 1, 1, False),
    ((13,), 4, 1, 1, False),  # even kernel: one more key before than after
    ((29,), 5, 2, 1, False),  # groups of unequal lengths (15 and 14)
    ((29,), 4, 3, 3, True),
    ((17,), 6, 1, 4, False),
    ((7, 9), 3, 1, 1, False),
    ((7, 9), (2, 5), (3, 1), (2, 5), (True, False)),
    ((6, 11), (4, 3), 1, (3, 1), (False, True)),
    ((5, 8), (5, 8), 1, (5, 8), False),  # the whole grid
    ((6, 6), 3, 1, 3, False),  # stride == kernel: Swin-style blocks
    ((3, 5, 7), (2, 3, 3), 1, 1, (True, False, False)),  # video: causal in time
    ((4, 5, 6), (2, 2, 3), 2, (1, 2, 3), (False, False, True)),
    ((5, 4, 9), (3, 2, 4), (1, 2, 2), (2, 2, 1), False),
]


@pytest.mark.parametrize("grid, kernel_size, dilation, stride, causal", NEIGHBORHOODS)
def test_neighborhood_equals_the_contract_formulas(grid, kernel_size, dilation, stride, causal):
    pattern = sa.neighborhood(grid, kernel_size, dilation=dilation, stride=stride, causal=causal)
    check_layout(pattern, neighborhood_truth(grid, kernel_size, dilation, stride, causal))


def test_every_query_sees_the_full_kernel_at_the_borders():
    """NATTEN shifts the window at the borders instead of clipping it: every row has prod(k) keys."""
    for grid, k in (((9,), 5), ((6, 7), (3, 5)), ((4, 5, 6), (3, 3, 4))):
        counts = sa.neighborhood(grid, k).mask(math.prod(grid)).sum(1)
        assert (counts == math.prod(per_dim(k, len(grid)))).all()


@pytest.mark.parametrize(
    "grid, tile, window",
    [
        ((12,), 3, 3),
        ((13,), 3, 2),
        ((6, 8), (2, 4), (3, 1)),
        ((7, 10), (2, 3), 2),
        ((4, 6, 8), (2, 3, 4), (1, 2, 1)),
    ],
)
def test_sliding_tile_equals_sta_semantics(grid, tile, window):
    check_layout(sa.sliding_tile(grid, tile, window), sliding_tile_truth(grid, tile, window))


@pytest.mark.parametrize("grid, tile, window", [((12,), 3, 3), ((6, 8), (2, 4), (3, 1)), ((6, 6, 8), 2, 3)])
def test_sliding_tile_is_a_strided_neighborhood_for_odd_windows(grid, tile, window):
    s = math.prod(grid)
    nd = len(grid)
    kernel = tuple(t * w for t, w in zip(per_dim(tile, nd), per_dim(window, nd), strict=True))
    strided = sa.neighborhood(grid, kernel, stride=tile)
    assert torch.equal(sa.sliding_tile(grid, tile, window).mask(s), strided.mask(s))


def test_compositions_with_globals_per_head_and_text_tokens():
    grid = (5, 6)
    s = 30
    a = neighborhood_truth(grid, 3)
    b = neighborhood_truth(grid, (2, 4), causal=(True, False))
    g = torch.zeros(s, s, dtype=torch.bool)
    g[[0, 17], :] = True
    g[:, [0, 17]] = True
    na, nb = sa.neighborhood(grid, 3), sa.neighborhood(grid, (2, 4), causal=(True, False))
    check_layout(na | sa.global_tokens([0, 17]), a | g)
    check_layout(na & nb, a & b)
    check_layout((na | nb) & sa.patterns.dense(), a | b)
    heads = sa.per_head([na, nb | sa.global_tokens([0, 17])])
    layout = heads.layout(s, block_size=8)
    assert torch.equal(layout.to_dense(), torch.stack([a, b | g]))
    assert torch.equal(heads.mask(s, heads=2), torch.stack([a, b | g]))
    # Text tokens: 4 before the grid and 3 after, global to everything.
    text = [0, 1, 2, 3, 34, 35, 36]
    pattern = sa.neighborhood(grid, 3, prefix=4, suffix=3) | sa.global_tokens(text)
    truth = torch.zeros(37, 37, dtype=torch.bool)
    truth[4:34, 4:34] = a
    truth[text, :] = True
    truth[:, text] = True
    check_layout(pattern, truth)


def test_decode_queries_are_the_last_cells():
    """Bottom-right aligned queries: q_len < kv_len takes the truth's last rows."""
    pattern = sa.neighborhood((6, 7), 3, causal=(True, False))
    truth = neighborhood_truth((6, 7), 3, causal=(True, False))
    for q_len in (1, 7, 20):
        layout = pattern.layout(q_len, 42, block_size=(8, 16))
        assert torch.equal(layout.to_dense()[0], truth[-q_len:])
        assert torch.equal(pattern.mask(q_len, 42), truth[-q_len:])


def test_repr_and_spec():
    pattern = sa.neighborhood((4, 6, 8), (3, 3, 5), dilation=(1, 2, 1), causal=(True, False, False))
    assert repr(pattern) == (
        "neighborhood((4, 6, 8), kernel_size=(3, 3, 5), dilation=(1, 2, 1), causal=(True, False, False))"
    )
    assert repr(sa.sliding_tile((6, 12), (2, 4), 3)) == "sliding_tile((6, 12), tile=(2, 4), window=3)"
    spec = parse_spec("na:4,6,8:3,3,5:1,2,1:causal=1,0,0 | global:0,5")
    assert torch.equal(spec.mask(192), (pattern | sa.global_tokens([0, 5])).mask(192))
    assert torch.equal(parse_spec("sta:6,12:2,4:3").mask(72), sa.sliding_tile((6, 12), (2, 4), 3).mask(72))
    assert repr(parse_spec("neighborhood:64:5:stride=3")) == "neighborhood((64,), kernel_size=5, stride=3)"
    with pytest.raises(ValueError, match="kernel_size 9 x dilation 1 = 9 is larger"):
        parse_spec("na:8,8:3,9")


# -- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, error, message",
    [
        (
            lambda: sa.neighborhood((8, 8), (3, 9)),
            ValueError,
            "kernel_size 9 x dilation 1 = 9 is larger than grid dimension 1",
        ),
        (
            lambda: sa.neighborhood((8, 8), 3, dilation=3),
            ValueError,
            "kernel_size 3 x dilation 3 = 9 is larger",
        ),
        (lambda: sa.neighborhood((8, 8), 3, stride=4), ValueError, "stride 4 is larger than kernel_size 3"),
        (lambda: sa.neighborhood((8, 0), 3), ValueError, r"grid\[1\] must be >= 1, got 0"),
        (lambda: sa.neighborhood((8, 8), 1), ValueError, "kernel_size must be >= 2, got 1"),
        (lambda: sa.neighborhood((8, 8), 3, stride=0), ValueError, "stride must be >= 1, got 0"),
        (lambda: sa.neighborhood((8, 8), 3, dilation=-1), ValueError, "dilation must be >= 1"),
        (lambda: sa.neighborhood((8, 8), (3, 3, 3)), ValueError, "kernel_size must be an int or 2 ints"),
        (lambda: sa.neighborhood(64, 3), TypeError, "grid must be a tuple of 1 to 3 positive ints"),
        (lambda: sa.neighborhood((2, 2, 2, 2), 2), ValueError, "grid must have 1 to 3 dimensions"),
        (lambda: sa.neighborhood((8, 8), 2.5), TypeError, "kernel_size must be an int, got float"),
        (lambda: sa.neighborhood((8, 8), 3, causal=1), TypeError, "causal must be a bool"),
        (lambda: sa.neighborhood((8, 8), 3, causal=(True,)), ValueError, "causal must be a bool or 2 bools"),
        (lambda: sa.neighborhood((8, 8), 3, prefix=-1), ValueError, "prefix must be >= 0"),
        (
            lambda: sa.sliding_tile((8, 8), (2, 3), (5, 3)),
            ValueError,
            "window 5 tiles is larger than grid dimension 0",
        ),
        (lambda: sa.sliding_tile((8, 8), 0, 1), ValueError, "tile must be >= 1, got 0"),
        (lambda: sa.tile_major(sa.sliding_window(4), 2), TypeError, "tile_major needs a pattern built from"),
        (lambda: sa.tile_major(sa.neighborhood((8, 8), 3)), TypeError, "tile_major needs tile="),
        (
            lambda: sa.tile_major(sa.neighborhood((8, 8), 3) & sa.causal(), 2),
            TypeError,
            "no meaning in another",
        ),
        (
            lambda: sa.tile_major(sa.neighborhood((8, 8), 3) | sa.neighborhood((4, 16), 3), 2),
            ValueError,
            "tile_major needs one grid",
        ),
        (
            lambda: sa.tile_major(sa.neighborhood((8, 8), 3), 2) | sa.global_tokens(1),
            TypeError,
            "compose patterns before",
        ),
        (
            lambda: sa.global_tokens(1) & sa.tile_major(sa.neighborhood((8, 8), 3), 2),
            TypeError,
            "compose patterns before",
        ),
        (lambda: sa.per_head([sa.tile_major(sa.neighborhood((8, 8), 3), 2)]), TypeError, "tile-major order"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_a_grid_that_does_not_match_the_sequence_raises():
    pattern = sa.neighborhood((6, 8), 3)
    with pytest.raises(
        ValueError, match=r"needs a sequence of 48 tokens \(grid \(6, 8\) = 48 cells\), got kv_len=50"
    ):
        pattern.layout(50, block_size=16)
    with pytest.raises(ValueError, match="needs a sequence of 48 tokens"):
        pattern.mask(47)
    with pytest.raises(ValueError, match="needs q_len <= kv_len"):
        pattern.layout(49, 48)
    q = torch.randn(1, 1, 50, 16)
    with pytest.raises(ValueError, match="needs a sequence of 48 tokens"):
        sa.sparse_attention(q, q, q, pattern)
    with pytest.raises(ValueError, match="needs a sequence of 48 tokens"):
        sa.sparse_attention(q, q, q, sa.tile_major(pattern, (2, 4)))
    with pytest.raises(ValueError, match="needs a sequence of 53"):
        sa.neighborhood((6, 8), 3, prefix=2, suffix=3).layout(48)
    tiled = sa.tile_major(pattern, (2, 4))
    q48 = torch.randn(1, 1, 48, 16)
    with pytest.raises(ValueError, match="tile-major order needs q_len == kv_len"):
        sa.sparse_attention(q48[:, :, :8], q48, q48, tiled)
    with pytest.raises(ValueError, match="alibi_slopes and rel_bias depend on token positions"):
        sa.sparse_attention(q48, q48, q48, tiled, alibi_slopes=torch.ones(1))


# -- tile-major order --------------------------------------------------------------------------------------
def tile_major_permutation(grid, tile):
    """Cells (row-major indices) in tile-major order, by brute force: sort by (tile coords, local coords)."""
    cells = list(itertools.product(*(range(n) for n in grid)))

    def key(c):
        return tuple(x // t for x, t in zip(c, tile, strict=True)) + tuple(
            x % t for x, t in zip(c, tile, strict=True)
        )

    order = sorted(range(len(cells)), key=lambda a: key(cells[a]))
    return torch.tensor(order)


TILED = [
    ((5, 7), (2, 3), lambda: sa.neighborhood((5, 7), 3)),
    ((6, 8), (2, 4), lambda: sa.sliding_tile((6, 8), (2, 4), (3, 1))),
    ((3, 5, 6), (2, 2, 4), lambda: sa.neighborhood((3, 5, 6), (2, 3, 3), causal=(True, False, False))),
    (
        (4, 6, 8),
        (2, 3, 4),
        lambda: sa.neighborhood((4, 6, 8), (3, 3, 4), dilation=(1, 2, 1), stride=(1, 1, 2)),
    ),
]


@pytest.mark.parametrize("grid, tile, make", TILED)
def test_tile_major_layout_is_the_permuted_truth(grid, tile, make):
    pattern = make()
    s = math.prod(grid)
    perm = tile_major_permutation(grid, tile)
    truth = pattern.mask(s)  # checked against the formulas above
    tiled = sa.tile_major(pattern, tile)
    assert torch.equal(tiled.perm, perm)
    check_layout(tiled, truth[perm][:, perm], block_sizes=((8, 8), (math.prod(tile),) * 2, (5, 16)))
    # With globals, and text tokens before and after the grid (they keep their place).
    text = sa.global_tokens([0, 1, s + 2])
    with_text = make_with_text(pattern, grid, 2, 1) | text
    perm_text = torch.cat([torch.arange(2), perm + 2, torch.tensor([s + 2])])
    tiled = sa.tile_major(with_text, tile)
    assert torch.equal(tiled.perm, perm_text)
    check_layout(tiled, with_text.mask(s + 3)[perm_text][:, perm_text], block_sizes=((8, 8), (16, 16)))


def make_with_text(pattern, grid, prefix, suffix):
    from sparse_attn.patterns.grid import GridPattern

    assert isinstance(pattern, GridPattern)
    bounds = list(zip(pattern.lo, pattern.hi, strict=True))
    return GridPattern(grid, bounds, pattern.dilation, pattern.description, prefix=prefix, suffix=suffix)


def test_tile_major_makes_a_neighbourhood_denser_in_blocks():
    """STA's point: in tile-major order, a sliding tile pattern is whole dense blocks."""
    grid, tile = (8, 16, 16), (2, 4, 8)
    pattern = sa.sliding_tile(grid, tile, (3, 3, 1))
    row_major = pattern.layout(2048, block_size=64)
    tiled = sa.tile_major(pattern).layout(2048, block_size=64)
    visible = pattern.mask(2048).float().mean().item()
    assert tiled.num_partial == 0 and tiled.density() == pytest.approx(visible)
    assert row_major.density() > 1.5 * visible


# -- attention ---------------------------------------------------------------------------------------------
def run(fn, inputs, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    out, lse = fn(*leaves)
    loss_of(out, lse).backward()
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


ATTENTION_CASES = {
    "2d": ((7, 9), (2, 4), lambda: sa.neighborhood((7, 9), (3, 5), stride=(1, 2)) | sa.global_tokens([5])),
    "3d-causal": (
        (3, 4, 6),
        (1, 2, 3),
        lambda: sa.neighborhood((3, 4, 6), (2, 3, 3), causal=(True, False, False)),
    ),
    "sta": ((4, 6, 8), (2, 3, 4), lambda: sa.sliding_tile((4, 6, 8), (2, 3, 4), (1, 1, 2))),
}


@pytest.mark.parametrize("reorder", [False, True])
@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_equals_the_float64_reference(case, reorder, dtype):
    """Forward, lse and every gradient through backend="torch", GQA and a padding mask with NaN keys."""
    grid, tile, make = ATTENTION_CASES[case]
    s = math.prod(grid)
    pattern = make()
    used = sa.tile_major(pattern, tile) if reorder else pattern
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, s, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, s, 16, generator=g, dtype=torch.float64) for _ in range(2))
    key_mask = torch.ones(2, s, dtype=torch.bool)
    key_mask[1, 3:9] = False
    garbage = [t.masked_fill(~key_mask[:, None, :, None], float("nan")) for t in (k, v)]
    mask = pattern.mask(s)

    def ours(q, k, v):
        return sa.sparse_attention(q, k, v, used, key_mask=key_mask, return_lse=True, backend="torch")

    def ref(q, k, v):
        return attention_reference(q, k, v, mask, key_mask=key_mask)

    got = run(ours, (q, *garbage), dtype)
    truth = run(ref, (q, k, v), torch.float64)
    plain = run(ref, (q, k, v), dtype)
    assert_close_to_reference(got, truth, plain, dtype)


def test_tile_major_is_exact_in_inference_mode_on_strided_inputs_and_through_the_module():
    grid, tile, make = ATTENTION_CASES["3d-causal"]
    s = math.prod(grid)
    pattern = make()
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(1, s, 3, 2, 16, generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [1, 2, s, 16], not contiguous
    expected = sa.sparse_attention(q, k, v, pattern, backend="torch")
    module = sa.SparseAttention(sa.tile_major(pattern, tile), backend="torch")
    with torch.inference_mode():
        got = sa.sparse_attention(q, k, v, sa.tile_major(pattern, tile), backend="torch")
        from_module = module(q, k, v)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(from_module, expected, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="document_ids need row-major token order"):
        module(q, k, v, document_ids=torch.zeros(s, dtype=torch.long))


@pytest.mark.parametrize("reorder", [False, True])
def test_triton_kernels_through_the_interpreter(reorder):
    pytest.importorskip("triton")
    grid, tile = (6, 16), (2, 8)
    pattern = sa.neighborhood(grid, (3, 5)) | sa.global_tokens([0])
    used = sa.tile_major(pattern, tile) if reorder else pattern
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 96, 32, generator=g, dtype=torch.float64) for _ in range(3))
    mask = pattern.mask(96)

    def ours(q, k, v):
        return sa.sparse_attention(q, k, v, used, return_lse=True, backend="triton")

    def ref(q, k, v):
        return attention_reference(q, k, v, mask)

    got = run(ours, (q, k, v), torch.float32)
    truth = run(ref, (q, k, v), torch.float64)
    plain = run(ref, (q, k, v), torch.float32)
    assert_close_to_reference(got, truth, plain, torch.float32)


# -- size --------------------------------------------------------------------------------------------------
def test_video_and_long_1d_layouts_build_fast_without_s_by_s():
    """Process CPU time on one thread (a shared machine stretches wall-clock time, not the work done)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        layout = sa.neighborhood((16, 48, 80), (3, 11, 11)).layout(61440, block_size=128)
        video = time.process_time() - start
        # An S x S mask would be 3.8 GB; measured ~0.1 s.
        assert layout.density() < 0.06 and video < 2.0, video
        start = time.process_time()
        layout = sa.sliding_tile((16, 48, 80), (2, 8, 8), (3, 3, 3)).layout(61440, block_size=64)
        sta = time.process_time() - start
        assert layout.tiles.shape[0] < 2000 and sta < 3.0, sta  # measured ~0.35 s, 1,332 distinct tiles
        start = time.process_time()
        layout = sa.neighborhood((1 << 20,), 1025).layout(1 << 20, block_size=128)
        long_1d = time.process_time() - start
        assert layout.tiles.shape[0] < 32 and long_1d < 3.0, long_1d  # measured ~0.4 s
    finally:
        torch.set_num_threads(threads)


# -- pictures ----------------------------------------------------------------------------------------------
def test_neighborhood_cells_are_a_row_of_the_truth_and_of_the_layout():
    from sparse_attn.viz import neighborhood_cells

    grid = (4, 5, 6)
    pattern = sa.neighborhood(grid, (2, 3, 3), causal=(True, False, False), prefix=2) | sa.global_tokens(
        [0, 1]
    )
    truth = pattern.mask(122)
    for tiled in (False, True):
        used = sa.tile_major(pattern, (2, 2, 4)) if tiled else pattern
        layout = used.layout(122, block_size=16)
        perm = used.perm if tiled else torch.arange(122)
        inverse = torch.argsort(perm)
        for cell in ((0, 0, 0), (3, 4, 5), (2, 1, 3)):
            view = neighborhood_cells(used, cell, block_size=16)
            user = 2 + int(torch.tensor(cell) @ torch.tensor([30, 6, 1]))
            assert torch.equal(torch.from_numpy(view.visible).flatten(), truth[user, 2:])
            assert view.other_visible == 2
            row = int(inverse[user])
            computed = layout.to_block_mask()[0, row // 16].repeat_interleave(16)[:122] > 0
            assert torch.equal(torch.from_numpy(view.computed).flatten(), computed[inverse][2:])
            assert (view.computed | ~view.visible).all()  # every visible key is computed


def test_plot_neighborhood_draws_video_grids_without_s_by_s(monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from sparse_attn.patterns.grid import GridPattern
    from sparse_attn.viz import plot_neighborhood

    def no_mask(*args, **kwargs):
        raise AssertionError("an S x S mask was built")

    monkeypatch.setattr(GridPattern, "mask", no_mask)
    video = sa.neighborhood((16, 48, 80), (3, 11, 11))
    for pattern in (video, sa.tile_major(video, (2, 8, 8))):
        fig = plot_neighborhood(pattern, [(8, 24, 40), (0, 0, 0)], max_frames=3)
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert any("363 visible" in t for t in titles)
        plt.close(fig)
    for pattern in (sa.neighborhood((40,), 5), sa.sliding_tile((12, 16), 4, 3)):
        plt.close(plot_neighborhood(pattern))
    with pytest.raises(ValueError, match=r"query must be a cell of the grid \(40,\)"):
        plot_neighborhood(sa.neighborhood((40,), 5), [40])
    with pytest.raises(TypeError, match="built from neighborhood or sliding_tile"):
        plot_neighborhood(sa.causal())


def test_show_draws_the_grid_view(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from sparse_attn import cli

    out = tmp_path / "na.png"
    assert cli.main(["show", "na:6,8,10:3,3,5+global:2", "--block-size", "32", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "q_len=480" in printed and out.exists() and (tmp_path / "na-grid.png").exists()
    args = ["show", "sta:8,12:2,4:3", "--view", "grid", "--tile-major", "2,4", "--queries", "0,0;7,11"]
    assert cli.main([*args, "-o", str(tmp_path / "sta.png")]) == 0
    assert (tmp_path / "sta.png").exists() and not (tmp_path / "sta-grid.png").exists()
    assert cli.main(["show", "causal", "--seq", "64", "--view", "grid", "-o", str(tmp_path / "x.png")]) == 2
    assert cli.main(["show", "na:6,8:3", "--queries", "a,b", "-o", str(tmp_path / "x.png")]) == 2
    assert cli.main(["show", "na:6,8:3", "--queries", "9,9", "-o", str(tmp_path / "x.png")]) == 2
    assert "query must be a cell of the grid" in capsys.readouterr().err
