"""BlockLayout exactness: block classes and token masks equal what `Pattern.mask()` says, for many compositions."""

import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_attn as sa
from sparse_attn.layout import _sort_pairs, pack_tiles, unpack_tiles


def classes_from_mask(mask: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    """0 empty / 1 partial / 2 full for every block, from the token mask (ragged edge blocks included)."""
    heads, q_len, kv_len = mask.shape
    nqb, nkb = -(-q_len // bq), -(-kv_len // bk)
    padded_true = torch.ones(heads, nqb * bq, nkb * bk, dtype=torch.bool)
    padded_any = torch.zeros(heads, nqb * bq, nkb * bk, dtype=torch.bool)
    padded_true[:, :q_len, :kv_len] = mask
    padded_any[:, :q_len, :kv_len] = mask
    blocks = (heads, nqb, bq, nkb, bk)
    all_true = padded_true.view(blocks).all(4).all(2)
    any_true = padded_any.view(blocks).any(4).any(2)
    return torch.where(all_true, 2, torch.where(any_true, 1, 0)).to(torch.int8)


def check_layout(pattern, q_len, kv_len, block_size):
    layout = pattern.layout(q_len, kv_len, block_size=block_size)
    mask = pattern.mask(q_len, kv_len)
    mask = mask if mask.dim() == 3 else mask[None]
    assert layout.num_heads == mask.shape[0]
    assert torch.equal(layout.to_dense(), mask)
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    assert torch.equal(layout.to_block_mask(), classes_from_mask(mask, bq, bk))
    kept = layout.to_block_mask() > 0
    kept_tokens = kept.repeat_interleave(bq, 1).repeat_interleave(bk, 2)[:, :q_len, :kv_len]
    assert layout.density() == pytest.approx(kept_tokens.float().mean().item())
    check_columns_mirror_rows(layout)
    return layout


def entries(ptr, idx, tile=None):
    """{(head, outer block, inner block): tile id} from CSR arrays."""
    out = {}
    for h in range(ptr.shape[0]):
        for outer in range(ptr.shape[1] - 1):
            for e in range(int(ptr[h, outer]), int(ptr[h, outer + 1])):
                out[(h, outer, int(idx[e]))] = None if tile is None else int(tile[e])
    return out


def check_columns_mirror_rows(layout):
    """The dK/dV column lists hold exactly the forward's row lists, transposed, each sorted ascending."""
    for kind in ("full", "part"):
        tile = (lambda side: getattr(layout, f"{side}_part_tile")) if kind == "part" else (lambda side: None)
        rows = entries(getattr(layout, f"row_{kind}_ptr"), getattr(layout, f"row_{kind}_idx"), tile("row"))
        cols = entries(getattr(layout, f"col_{kind}_ptr"), getattr(layout, f"col_{kind}_idx"), tile("col"))
        assert {(h, q, k): t for (h, k, q), t in cols.items()} == rows
        for ptr, idx in (
            (layout.row_full_ptr, layout.row_full_idx),
            (layout.row_part_ptr, layout.row_part_idx),
            (layout.col_full_ptr, layout.col_full_idx),
            (layout.col_part_ptr, layout.col_part_idx),
        ):
            for h in range(ptr.shape[0]):
                for o in range(ptr.shape[1] - 1):
                    seg = idx[int(ptr[h, o]) : int(ptr[h, o + 1])]
                    assert torch.all(seg[1:] > seg[:-1])


# -- random compositions ---------------------------------------------------------------------------------
def primitives(max_len):
    small = st.integers(0, max_len)
    return st.one_of(
        st.builds(sa.sliding_window, small, small),
        st.builds(
            lambda l, r, d: sa.dilated(l, r, dilation=d),
            st.integers(0, 8),
            st.integers(0, 8),
            st.integers(1, 4),
        ),
        st.just(sa.causal()),
        st.builds(lambda n: sa.global_tokens(n), st.integers(0, 6)),
        st.builds(
            lambda seed, bq, bk, p: sa.block_sparse(
                torch.rand(40, 40, generator=torch.Generator().manual_seed(seed)) < p, (bq, bk)
            ),
            st.integers(0, 1000),
            st.integers(2, 9),
            st.integers(2, 9),
            st.floats(0.1, 0.9),
        ),
        st.builds(
            lambda n, b, s: sa.random_blocks(n, b, seed=s),
            st.integers(0, 3),
            st.integers(2, 12),
            st.integers(0, 99),
        ),
    )


def compositions(max_len=30):
    return st.recursive(
        primitives(max_len),
        lambda inner: st.one_of(
            st.builds(lambda a, b: a | b, inner, inner), st.builds(lambda a, b: a & b, inner, inner)
        ),
        max_leaves=4,
    )


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=compositions(),
    q_len=st.integers(1, 70),
    kv_len=st.integers(1, 70),
    bq=st.integers(1, 17),
    bk=st.integers(1, 17),
)
def test_layout_is_exact_for_random_compositions(pattern, q_len, kv_len, bq, bk):
    check_layout(pattern, q_len, kv_len, (bq, bk))


@settings(max_examples=60, deadline=None)
@given(
    patterns=st.lists(compositions(), min_size=2, max_size=4),
    q_len=st.integers(1, 50),
    kv_len=st.integers(1, 50),
    block=st.integers(1, 16),
)
def test_layout_is_exact_per_head(patterns, q_len, kv_len, block):
    layout = check_layout(sa.per_head(patterns), q_len, kv_len, block)
    assert layout.num_heads == len(patterns)


@pytest.mark.parametrize(
    "q_len,kv_len", [(1, 1), (37, 37), (97, 97), (161, 161), (1, 161), (97, 161), (161, 40)]
)
@pytest.mark.parametrize("block_size", [16, (32, 16), 64])
def test_named_patterns_exact(q_len, kv_len, block_size):
    pats = [
        sa.longformer(20, 3),
        sa.bigbird(16, 2, 2, block_size=16, seed=1),
        sa.bigbird(16, 2, 2, block_size=16, seed=1, heads=2),
        sa.causal() & sa.sliding_window(30),
        sa.per_head([sa.dilated(8, dilation=2), sa.dilated(8, dilation=3) & sa.causal()]),
        sa.block_sparse(torch.rand(2, 11, 11, generator=torch.Generator().manual_seed(0)) < 0.4, 16),
    ]
    for p in pats:
        check_layout(p, q_len, kv_len, block_size)


@pytest.mark.parametrize("q_len,kv_len", [(161, 161), (97, 161), (161, 97), (1, 161)])
@pytest.mark.parametrize("block_size", [8, (16, 8), 13])
def test_global_tokens_at_explicit_positions_exact(q_len, kv_len, block_size):
    positions = sorted({*range(0, 97, 16), *range(3, 97, 16), 50, 51, 96})
    for p in (
        sa.global_tokens(positions),
        sa.global_tokens(positions) | sa.sliding_window(5),
        sa.causal() & (sa.sliding_window(9, 0) | sa.global_tokens(positions)),
    ):
        check_layout(p, q_len, kv_len, block_size)


def test_global_tokens_share_tiles_between_blocks():
    # Every 256th token is global: blocks hold their global rows/keys at the same offset, so three tiles
    # (global first row, global first key, both) serve the thousands of partial blocks.
    layout = sa.global_tokens(list(range(0, 8192, 256))).layout(8192, block_size=64)
    assert layout.num_partial > 1000
    assert layout.tiles.shape[0] == 3


@pytest.mark.parametrize("q_len,kv_len", [(97, 97), (161, 40), (37, 161)])
def test_band_intersected_with_compositions_exact(q_len, kv_len):
    heads = [
        sa.sliding_window(4) | sa.global_tokens(3),
        sa.random_blocks(2, 16, seed=1),
        sa.dilated(3, 1, dilation=2),
    ]
    pats = [
        sa.causal() & (sa.sliding_window(20, 3) | sa.global_tokens([0, 30])),
        (sa.random_blocks(2, 16, seed=4) | sa.global_tokens(2)) & sa.sliding_window(30),
        sa.causal() & sa.per_head(heads),
        sa.bigbird(16, 2, 2, block_size=16, seed=1, heads=2) & sa.dilated(40, 5, dilation=3),
    ]
    for p in pats:
        for block_size in (16, (32, 16), 7):
            check_layout(p, q_len, kv_len, block_size)


@pytest.mark.parametrize("q_len,kv_len", [(40, 20), (20, 40), (37, 37)])
def test_huge_windows_exact(q_len, kv_len):
    # sys.maxsize as "no limit" once overflowed int64 and built a layout that disagreed with mask().
    pats = [
        sa.sliding_window(sys.maxsize),
        sa.sliding_window(sys.maxsize, 0),
        sa.sliding_window(10**30, 2),
        sa.dilated(2**62, dilation=3),
        sa.dilated(3, dilation=2**70),
        sa.dilated(5, dilation=2**39 + 1) & sa.dilated(5, dilation=2**39 + 3),
    ]
    for p in pats:
        check_layout(p, q_len, kv_len, 8)
    assert sa.sliding_window(sys.maxsize).mask(q_len, kv_len).all()


def test_causal_intersection_costs_only_the_kept_blocks():
    # causal() & (window | globals) at 2M tokens: 16384**2 / 2 causal blocks, a few per row kept. Only the
    # kept ones are enumerated (all the causal ones would take many GB and seconds).
    pattern = sa.causal() & (sa.sliding_window(255, 0) | sa.global_tokens(4))
    layout = pattern.layout(1 << 21, block_size=128)
    assert layout.num_full + layout.num_partial < 4 * layout.num_q_blocks


def test_block_classes_on_a_known_case():
    # 8 tokens, blocks of 4, causal: the diagonal blocks are partial, the one below is full, above empty.
    grid = sa.causal().layout(8, block_size=4).to_block_mask()[0]
    assert grid.tolist() == [[1, 0], [2, 1]]
    # A ragged last block whose real part is entirely visible is full.
    grid = sa.sliding_window(10).layout(6, block_size=4).to_block_mask()[0]
    assert grid.tolist() == [[2, 2], [2, 2]]


def test_partial_tiles_are_shared_between_blocks():
    layout = sa.sliding_window(100).layout(8192, block_size=64)
    # Thousands of partial blocks, a handful of distinct tiles.
    assert layout.num_partial > 200
    assert layout.tiles.shape[0] <= 4


def test_pack_unpack_round_trip():
    tiles = torch.rand(5, 7, 70) < 0.5
    packed = pack_tiles(tiles)
    assert packed.dtype == torch.int32 and packed.shape == (5, 7, 3)
    assert torch.equal(unpack_tiles(packed, 70), tiles)
    assert torch.equal(unpack_tiles(packed, 70, chunk=2), tiles)  # chunk boundaries inside the tile list
    assert torch.equal(
        unpack_tiles(pack_tiles(torch.ones(1, 1, 32, dtype=torch.bool)), 32), torch.ones(1, 1, 32).bool()
    )


def test_huge_lengths_build_without_a_dense_mask():
    # An S x S mask here would be 2**46 bytes; the analytic build keeps only the kept blocks.
    pattern = sa.sliding_window(1000) | sa.global_tokens(16) | sa.dilated(50, 0, dilation=3)
    layout = pattern.layout(1 << 23, block_size=512)
    assert layout.num_q_blocks == 16384
    assert 0 < layout.density() < 0.01


def test_repr_has_a_picture_and_the_counts():
    text = repr(sa.causal().layout(256, block_size=64))
    assert "full=6" in text and "partial=4" in text and "empty=6" in text
    lines = text.splitlines()
    assert lines[-4:] == ["▒···", "█▒··", "██▒·", "███▒"]


def test_repr_downsamples_from_the_kept_blocks(monkeypatch):
    # 48x48 blocks, two block rows per character: a character is full only if all its blocks are.
    layout = sa.causal().layout(192, block_size=4)
    lines = repr(layout).splitlines()
    assert lines[1] == "head 0 (each character 2x1 blocks):"
    assert lines[2:] == ["█" * 2 * r + "▒▒" + "·" * (46 - 2 * r) for r in range(24)]
    # The picture never builds the whole [H, nqb, nkb] grid (GBs for long per-head layouts).
    big = sa.per_head([sa.sliding_window(64)] * 4).layout(1 << 16, block_size=64)
    monkeypatch.setattr(type(big), "to_block_mask", lambda self: pytest.fail("repr built the block grid"))
    assert "heads=4" in repr(big)


def test_to_device_and_meta():
    layout = sa.longformer(8, 2).layout(100, block_size=16)
    assert layout.to("cpu") is layout
    meta = layout.to("meta")
    assert meta.device.type == "meta" and meta.row_full_idx.shape == layout.row_full_idx.shape
    assert layout.to("meta") is meta  # moved once, not on every call


@pytest.mark.parametrize(
    "call,error",
    [
        (lambda: sa.causal().layout(10, block_size=0), ValueError),
        (lambda: sa.causal().layout(10, block_size=(4, 4, 4)), ValueError),
        (lambda: sa.causal().layout(10, block_size=4.0), TypeError),
        (lambda: sa.causal().layout(10, block_size=True), TypeError),
        (lambda: sa.causal().layout(0), ValueError),
        (lambda: sa.causal().layout(10, -3), ValueError),
        (lambda: sa.per_head([sa.causal()] * 2).layout(10, heads=4), ValueError),
        (lambda: sa.block_sparse(torch.ones(2, 2, dtype=torch.bool), 4).layout(9), ValueError),
    ],
)
def test_bad_layout_arguments(call, error):
    with pytest.raises(error):
        call()


@pytest.mark.parametrize("block_size", [128, (128, 64), (64, 96)])
def test_random_cells_smaller_than_blocks_share_tiles(block_size):
    """Partial blocks made of several random cells share tiles by which cells they keep (a handful of
    tiles, not one per block), and the layout stays exact, ragged and shifted edges included."""
    pattern = sa.bigbird(40, 16, 3, block_size=32, seed=7) | sa.random_blocks(2, block_size=48, seed=3)
    for q_len, kv_len in ((1000, 1000), (777, 1031)):
        layout = pattern.layout(q_len, kv_len, block_size=block_size)
        assert torch.equal(layout.to_dense()[0], pattern.mask(q_len, kv_len))
    big = sa.bigbird(192, 64, 3).layout(32768, block_size=128)
    assert big.num_partial > 2000 and big.tiles.shape[0] < 100


@pytest.mark.parametrize("top", [50, 1 << 16, 1 << 20])  # radix sort of 16-bit pairs, or torch.argsort
def test_sort_pairs_orders_like_argsort_of_the_combined_key(top):
    """`_sort_pairs` (CSR order of a layout's entries) on shuffled, sorted and empty distinct pairs."""
    gen = torch.Generator().manual_seed(top)
    flat = torch.unique(torch.randint(0, top * 40, (3000,), generator=gen))  # distinct pairs
    major, minor = flat // 40, flat % 40
    for order in (torch.randperm(len(flat), generator=gen), torch.argsort(flat)):
        a, b = major[order], minor[order]
        perm = _sort_pairs(a, b)
        assert torch.equal(perm, torch.argsort(a * 40 + b))
        assert torch.equal(_sort_pairs(b, a), torch.argsort(b * (int(a.max()) + 1) + a))
    assert _sort_pairs(major[:0], minor[:0]).numel() == 0
