"""Interop: FlexAttention BlockMask round trips (flex_attention runs our mask); xformers biases."""

import warnings

import pytest
import torch

from sparse_attn import causal, dilated, global_tokens, per_head, sliding_window, sparse_attention
from sparse_attn.interop import from_flex, pattern_from_xformers, to_flex

flex = pytest.importorskip("torch.nn.attention.flex_attention")

FLEX_CASES = [
    ((causal() & sliding_window(20)) | global_tokens(3), 150, 150, None),
    (per_head([sliding_window(7, 2), causal()]), 97, 130, 2),
    (dilated(5, dilation=3), 100, 100, None),
]


def _qkv(heads, q_len, kv_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda s: torch.randn(1, heads, s, 16, generator=g, dtype=torch.float64)
    return make(q_len), make(kv_len), make(kv_len)


@pytest.mark.parametrize("pattern, q_len, kv_len, heads", FLEX_CASES)
def test_flex_round_trip_runs_flex_attention_with_our_mask(pattern, q_len, kv_len, heads):
    layout = pattern.layout(q_len, kv_len, block_size=32, heads=heads)
    block_mask = to_flex(layout)
    # Flex's own block view agrees with ours: kept blocks, and which of them are full.
    classes = layout.to_block_mask()[None]
    assert torch.equal(block_mask.to_dense().bool(), classes > 0)
    full_only = flex.BlockMask.from_kv_blocks(
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
        BLOCK_SIZE=(32, 32),
        seq_lengths=(q_len, kv_len),
    )
    assert torch.equal(full_only.to_dense().bool(), classes == 2)
    q, k, v = _qkv(2, q_len, kv_len)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex warns that eager mode is its slow reference path
        out = flex.flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(out, sparse_attention(q, k, v, layout), rtol=1e-10, atol=1e-10)
    back = from_flex(block_mask)
    assert torch.equal(back.to_block_mask(), layout.to_block_mask())
    assert torch.equal(back.to_dense(), layout.to_dense())


def test_from_flex_reads_flex_built_masks_exactly():
    def window_mask(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= 10)

    block_mask = flex.create_block_mask(window_mask, 1, 1, 100, 100, device="cpu", BLOCK_SIZE=32)
    layout = from_flex(block_mask)
    expected = (causal() & sliding_window(10)).layout(100, 100, block_size=32)
    assert torch.equal(layout.to_dense(), expected.to_dense())
    assert torch.equal(layout.to_block_mask(), expected.to_block_mask())
    with pytest.raises(ValueError, match="batch-1"):
        from_flex(flex.create_block_mask(window_mask, 2, 1, 64, 64, device="cpu", BLOCK_SIZE=32))


@pytest.fixture
def xformers_bias():
    """xformers' attn_bias module; only these tests skip without xformers (not the flex ones above)."""
    return pytest.importorskip("xformers.ops.fmha.attn_bias")


XFORMERS_CASES = [
    (lambda ab: ab.LowerTriangularMask(), [(7, 7), (5, 9), (9, 5)]),
    (lambda ab: ab.LowerTriangularFromBottomRightMask(), [(7, 7), (5, 9), (9, 5)]),
    (
        lambda ab: ab.LocalAttentionFromBottomRightMask(window_left=3, window_right=2),
        [(8, 8), (5, 11), (11, 5)],
    ),
    (lambda ab: ab.LowerTriangularFromBottomRightLocalAttentionMask(4), [(9, 9), (4, 10)]),
    (lambda ab: ab.BlockDiagonalMask.from_seqlens([3, 3, 3], [4, 4, 4]), [(9, 12)]),
    (lambda ab: ab.BlockDiagonalCausalMask.from_seqlens([4, 4, 4]), [(12, 12)]),
    (lambda ab: ab.BlockDiagonalCausalFromBottomRightMask.from_seqlens([5, 5], [5, 5]), [(10, 10)]),
]


@pytest.mark.parametrize("make_bias, shapes", XFORMERS_CASES)
def test_xformers_biases_match_their_materialised_masks(make_bias, shapes, xformers_bias):
    bias = make_bias(xformers_bias)
    pattern = pattern_from_xformers(bias)
    for q_len, kv_len in shapes:
        truth = bias.materialize((q_len, kv_len)) == 0
        assert torch.equal(pattern.mask(q_len, kv_len), truth), (type(bias).__name__, q_len, kv_len)
        layout = pattern.layout(q_len, kv_len, block_size=4)
        assert torch.equal(layout.to_dense()[0], truth)


def test_xformers_biases_that_do_not_map_raise(xformers_bias):
    with pytest.raises(ValueError, match="equal-length"):
        pattern_from_xformers(xformers_bias.BlockDiagonalMask.from_seqlens([3, 5]))
    with pytest.raises(ValueError, match="no exact"):
        pattern_from_xformers(xformers_bias.LowerTriangularMaskWithTensorBias(torch.zeros(4, 4)))


@pytest.mark.parametrize("q_len", [1000, 4096])
def test_from_flex_stores_each_distinct_tile_once(q_len):
    layout = (sliding_window(128) | global_tokens(4)).layout(q_len, block_size=128)
    back = from_flex(to_flex(layout))
    # (Ours may hold a few equal tiles, at the ragged edge; a round trip never adds any.)
    assert back.tiles.shape[0] <= layout.tiles.shape[0]
    assert len(torch.unique(back.tiles.flatten(1), dim=0)) == back.tiles.shape[0]
    assert torch.equal(back.to_dense(), layout.to_dense())
    assert torch.equal(back.to_block_mask(), layout.to_block_mask())


def test_xformers_biases_whose_structure_or_meaning_changed_are_refused(xformers_bias, monkeypatch):
    """What pattern_from_xformers reads is checked: a renamed attribute, or a bias whose materialised mask no
    longer matches the mapping (as a new xformers release could make), raises instead of mapping."""
    bias = xformers_bias.LowerTriangularFromBottomRightLocalAttentionMask(4)
    del bias._window_size
    bias.window_size = 4
    with pytest.raises(ValueError, match="no int '_window_size'"):
        pattern_from_xformers(bias)
    bias = xformers_bias.LocalAttentionFromBottomRightMask(window_left=3, window_right=2)
    wider = xformers_bias.LocalAttentionFromBottomRightMask(window_left=4, window_right=2)
    monkeypatch.setattr(bias, "materialize", wider.materialize)
    with pytest.raises(ValueError, match="no longer means"):
        pattern_from_xformers(bias)


def test_from_flex_refuses_what_is_not_a_block_mask_it_can_read():
    with pytest.raises(TypeError, match="BlockMask"):
        from_flex((causal() & sliding_window(4)).layout(64, block_size=32))
    block_mask = to_flex(causal().layout(64, block_size=32))
    block_mask.kv_indices = block_mask.kv_indices[0]  # one rank fewer than the documented [B, H, nqb, nkb]
    with pytest.raises(ValueError, match="kv_indices"):
        from_flex(block_mask)
