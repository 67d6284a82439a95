"""`chunked(size)`: queries see the keys of their own chunk (Llama 4's chunked attention).

The truth is built here, token by token, from ``qpos // size == j // size`` (never from the library's own
`mask()`); layouts must equal it token for token and classify every block exactly; attention through the
PyTorch backend must equal the dense float64 reference.
"""

import time

import pytest
import torch
from reference_check import assert_close_to_reference, loss_of

import sparse_attn as sa
from sparse_attn.patterns.chunked import Chunked
from sparse_attn.reference import attention_reference
from sparse_attn.spec import parse_spec


# -- independent truth -------------------------------------------------------------------------------------
def truth(size, q_len, kv_len, band="none"):
    """bool [q_len, kv_len]: same chunk (floor division; negative positions see nothing), and the band."""
    qpos = torch.arange(q_len)[:, None] + kv_len - q_len
    j = torch.arange(kv_len)[None, :]
    d = qpos - j
    same = (qpos >= 0) & (torch.div(qpos, size, rounding_mode="floor") == j // size)
    return (
        same
        & {
            "none": torch.ones_like(d, dtype=torch.bool),
            "causal": d >= 0,
            "window": (d >= 0) & (d <= 3),
            "both_sides": d.abs() <= 2,
            "dilated": (d >= 0) & (d <= 8) & (d % 2 == 0),
        }[band]
    )


BANDS = {
    "none": lambda size: sa.chunked(size),
    "causal": lambda size: sa.chunked(size) & sa.causal(),
    "window": lambda size: sa.causal() & sa.sliding_window(3, 0) & sa.chunked(size),
    "both_sides": lambda size: sa.sliding_window(2) & sa.chunked(size),
    "dilated": lambda size: sa.chunked(size) & sa.dilated(4, 0, dilation=2),
}


def block_classes(mask, block_size):
    """int8 [nqb, nkb] of a token mask: 0 empty, 1 partial, 2 full (over each block's real pairs)."""
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    q_len, kv_len = mask.shape
    nqb, nkb = -(-q_len // bq), -(-kv_len // bk)
    visible = torch.zeros(nqb * bq, nkb * bk, dtype=torch.bool)
    real = torch.zeros_like(visible)
    visible[:q_len, :kv_len], real[:q_len, :kv_len] = mask, True
    visible = visible.view(nqb, bq, nkb, bk).transpose(1, 2)
    real = real.view(nqb, bq, nkb, bk).transpose(1, 2)
    any_visible = visible.flatten(2).any(-1)
    all_visible = (visible | ~real).flatten(2).all(-1)
    return torch.where(all_visible, 2, torch.where(any_visible, 1, 0)).to(torch.int8)


def check_layout(pattern, expected, block_size):
    q_len, kv_len = expected.shape
    layout = pattern.layout(q_len, kv_len, block_size=block_size)
    assert torch.equal(pattern.mask(q_len, kv_len), expected)
    assert torch.equal(layout.to_dense()[0], expected)
    assert torch.equal(layout.to_block_mask()[0], block_classes(expected, block_size))


# -- layouts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("band", list(BANDS))
@pytest.mark.parametrize("size", [1, 3, 7, 16, 17, 100])
@pytest.mark.parametrize("q_len, kv_len", [(37, 37), (5, 37), (37, 5), (1, 50), (64, 64)])
def test_layout_equals_the_token_truth(band, size, q_len, kv_len):
    """Odd sizes, sizes that are not multiples of the block (and smaller or larger than it), Sq != Skv (a
    query block straddling negative positions when Sq > Skv), square and rectangular blocks."""
    expected = truth(size, q_len, kv_len, band)
    for block_size in (16, (8, 4), (3, 5)):
        check_layout(BANDS[band](size), expected, block_size)


def test_sizes_beyond_every_position_are_one_chunk():
    qpos = torch.arange(30)[:, None] + 40 - 30
    expected = (qpos >= 0).expand(30, 40)
    for size in (40, 2**62, 10**30):
        check_layout(sa.chunked(size), expected, 16)
        check_layout(sa.chunked(size) & sa.causal(), expected & (qpos >= torch.arange(40)), 16)
    assert repr(sa.chunked(10**30)) == f"chunked({10**30})"


def test_block_classes_on_a_known_case():
    # 12 tokens, chunks of 6, blocks of 4: rows 4-7 and keys 4-7 straddle the boundary at 6.
    grid = sa.chunked(6).layout(12, block_size=4).to_block_mask()[0]
    assert grid.tolist() == [[2, 1, 0], [1, 1, 1], [0, 1, 2]]
    grid = (sa.chunked(4) & sa.causal()).layout(12, block_size=4).to_block_mask()[0]
    assert grid.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_intersection_with_a_band_is_one_pattern():
    """chunked & causal enumerates only the blocks both keep, in either order."""
    for pattern in (sa.chunked(8) & sa.causal(), sa.causal() & sa.chunked(8)):
        simpler = pattern.left.intersection(pattern.right) or pattern.right.intersection(pattern.left)
        assert isinstance(simpler, Chunked) and (simpler.size, simpler.lo) == (8, 0)
    same = sa.chunked(8) & sa.chunked(8) & sa.causal()
    check_layout(same, truth(8, 40, 40, "causal"), 16)


def test_compositions():
    q_len = kv_len = 45
    qpos, j = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    globals_ = (j < 2) | (qpos < 2)
    check_layout(sa.chunked(7) | sa.global_tokens(2), truth(7, q_len, kv_len) | globals_, 16)
    check_layout(
        (sa.chunked(7) | sa.global_tokens(2)) & sa.causal(), (truth(7, 45, 45) | globals_) & (qpos >= j), 8
    )
    # Two chunk sizes: the generic block-by-block intersection and union.
    check_layout(sa.chunked(6) & sa.chunked(9), truth(6, 45, 45) & truth(9, 45, 45), 8)
    check_layout(sa.chunked(6) | sa.chunked(9), truth(6, 45, 45) | truth(9, 45, 45), (4, 8))
    # Per head: one chunk size (and band) per head.
    pattern = sa.per_head([sa.chunked(5), sa.chunked(8) & sa.causal(), sa.chunked(3) & sa.sliding_window(2)])
    expected = torch.stack([truth(5, 30, 40), truth(8, 30, 40, "causal"), truth(3, 30, 40, "both_sides")])
    layout = pattern.layout(30, 40, block_size=8)
    assert torch.equal(pattern.mask(30, 40, heads=3), expected)
    assert torch.equal(layout.to_dense(), expected)
    for h in range(3):
        assert torch.equal(layout.to_block_mask()[h], block_classes(expected[h], 8))


def test_repr_picture_and_spec():
    assert repr(sa.chunked(8192)) == "chunked(8192)"
    assert repr(sa.chunked(8) & sa.causal()) == "(chunked(8) & causal())"
    picture = repr((sa.chunked(8) & sa.causal()).layout(32, block_size=4))
    assert picture.splitlines()[2:4] == ["▒·······", "█▒······"]
    assert torch.equal(parse_spec("chunked:8&causal").mask(40, 50), truth(8, 40, 50, "causal"))
    assert torch.equal(parse_spec("chunked:size=5").mask(20), truth(5, 20, 20))


@pytest.mark.parametrize(
    "size, error, message",
    [
        (0, ValueError, "size must be >= 1, got 0"),
        (-8, ValueError, "size must be >= 1"),
        (2.5, TypeError, "size must be an int, got float"),
        (True, TypeError, "size must be an int, got bool"),
        ("8", TypeError, "size must be an int, got str"),
        (None, TypeError, "size must be an int, got NoneType"),
    ],
)
def test_bad_sizes_raise_clear_errors(size, error, message):
    with pytest.raises(error, match=message):
        sa.chunked(size)


def test_a_million_tokens_build_fast_without_s_by_s():
    """Llama 4's mask at 1M tokens: 128 chunks of 64 x 64 blocks, the diagonal ones partial, one tile."""
    # Timed on one thread, in that thread's CPU time: intra-op threads that wait for busy cores (a shared CI
    # machine, or another test worker) cost 20x more, and a busy core stretches the wall clock.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.thread_time()
        layout = (sa.chunked(8192) & sa.causal()).layout(1 << 20, block_size=128)
        elapsed = time.thread_time() - start
        assert (layout.num_full, layout.num_partial) == (128 * 64 * 63 // 2, 128 * 64)
        assert layout.tiles.shape[0] == 1
        # Measured ~0.1 s; a dense S x S mask alone would be 1 TiB.
        assert elapsed < 1.0, f"{elapsed:.2f} s"
        # A size that is not a multiple of the block, and one smaller than it: boundaries inside blocks.
        for size in (8191, 100):
            start = time.thread_time()
            layout = (sa.chunked(size) & sa.causal()).layout(1 << 20, block_size=128)
            assert time.thread_time() - start < 1.0
            assert layout.num_full + layout.num_partial < 3 * 64 * (1 << 20) // 128
    finally:
        torch.set_num_threads(threads)


# -- attention ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("band", ["none", "causal"])
@pytest.mark.parametrize("q_len, kv_len", [(97, 97), (23, 97), (97, 41)])
def test_attention_equals_the_float64_reference(dtype, band, q_len, kv_len):
    """Forward, lse and every gradient through backend="torch", GQA and a padding mask; chunks of 20 are
    not a multiple of the block."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, q_len, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, kv_len, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, kv_len, 16, generator=g, dtype=torch.float64)
    key_mask = torch.ones(2, kv_len, dtype=torch.bool)
    key_mask[1, :7] = False
    pattern = BANDS[band](20)

    def run(fn, inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        out, lse = fn(*inputs)
        loss_of(out, lse).backward()
        return (out, lse, *(t.grad for t in inputs))

    def ours(q, k, v):
        return sa.sparse_attention(q, k, v, pattern, key_mask=key_mask, return_lse=True, backend="torch")

    def reference(q, k, v):
        return attention_reference(q, k, v, truth(20, q_len, kv_len, band), key_mask=key_mask)

    exact = run(reference, (q, k, v))
    plain = run(reference, [t.to(dtype) for t in (q, k, v)])
    got = run(ours, [t.to(dtype) for t in (q, k, v)])
    assert_close_to_reference(got, exact, plain, dtype)
