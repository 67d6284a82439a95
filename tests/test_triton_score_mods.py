"""Score modifiers (softcap, ALiBi, rel_bias) in the Triton kernels, run through Triton's interpreter: values and
every gradient (rel_bias' too) against the float64 reference, through the public function and the launchers.

Shapes stay small (the interpreter runs one program at a time). Every case has a key mask whose padding keys
hold NaN/inf in K and V (the kernels must never let them through), GQA, ragged lengths (Sq != Skv, neither a
multiple of a tile). Every buffer a launcher allocates starts as NaN, so an element no kernel writes fails.
"""

from __future__ import annotations

import pytest
import torch
from reference_check import MOD_SETS as MODS
from reference_check import NAMES_WITH_BIAS, assert_close_with_mods, make_mods
from reference_check import run_with_grads as run

import sparse_attn as sa
from sparse_attn.reference import attention_reference
from sparse_attn.score_mods import ScoreMods

launch = pytest.importorskip("sparse_attn.triton_kernels.launch")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element no kernel writes fails."""
    allocate = launch.empty_buffer
    monkeypatch.setattr(launch, "empty_buffer", lambda *args, **kw: allocate(*args, **kw).fill_(float("nan")))


def make_qkv(b=2, hq=2, hkv=1, sq=97, skv=130, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def padding_mask(b, skv):
    """Batch 0 right-padded (last 20 keys padding), batch 1 left-padded (first 11)."""
    mask = torch.ones(b, skv, dtype=torch.bool)
    mask[0, -20:] = False
    mask[1 % b, :11] = False
    return mask


def with_garbage(k, v, key_mask):
    """K and V with NaN / inf in every padding key (what an uninitialised cache holds)."""
    k, v = k.clone(), v.clone()
    pad = ~key_mask[:, None, :, None].expand_as(k)
    k[pad] = float("nan")
    v[pad] = float("inf")
    return k, v


def check(q, k, v, pattern, mods, dtype=torch.float32, key_mask=None, garbage=True):
    """Triton in `dtype` (padding keys full of NaN/inf) against the float64 reference (clean keys), within
    twice the plain reference math's error in `dtype`, plus a floor scaled to the values' size."""
    k_in, v_in = with_garbage(k, v, key_mask) if key_mask is not None and garbage else (k, v)

    def ours(q, k, v, **m):
        return sa.sparse_attention(
            q, k, v, pattern, backend="triton", key_mask=key_mask, return_lse=True, **m
        )

    def ref(q, k, v, **m):
        return attention_reference(q, k, v, pattern, key_mask=key_mask, **m)

    got = run(ours, q, k_in, v_in, mods, dtype)
    truth = run(ref, q, k, v, mods, torch.float64)
    plain = run(ref, q, k, v, mods, dtype)
    assert_close_with_mods(got, truth, plain, dtype)
    return got


PATTERNS = {
    # Full and partial blocks, a ragged last block on both axes.
    "causal|window": sa.causal() | sa.sliding_window(40, 10),
    "per-head": sa.per_head([sa.sliding_window(20) | sa.global_tokens(3), sa.causal()]),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mods", MODS)
def test_each_modifier_and_all_fp32(mods, pattern):
    q, k, v = make_qkv()
    check(q, k, v, PATTERNS[pattern], make_mods(MODS[mods], 2, 2, 97, 130), key_mask=padding_mask(2, 130))


def test_all_modifiers_fp16():
    q, k, v = make_qkv()
    mods = make_mods(MODS["all"], 2, 2, 97, 130)
    check(q, k, v, PATTERNS["causal|window"], mods, torch.float16, key_mask=padding_mask(2, 130))


@pytest.mark.parametrize("sq,skv", [(1, 97), (3, 70)], ids=["decode", "short-query"])
def test_decode_and_short_queries(sq, skv):
    """Sq < Skv: the bottom-right query positions pick the bias diagonals near the end of rel_bias."""
    q, k, v = make_qkv(sq=sq, skv=skv)
    check(
        q,
        k,
        v,
        sa.sliding_window(30, 0),
        make_mods(MODS["all"], 2, 2, sq, skv),
        key_mask=padding_mask(2, skv),
    )


def test_per_batch_layout_documents():
    """A layout per batch element (documents): d_rel_bias adds the tiles of every element's own layout."""
    q, k, v = make_qkv(hkv=2, sq=130, skv=130)
    ids = torch.tensor([[0] * 50 + [1] * 80, [0] * 7 + [1] * 100 + [2] * 23])
    check(q, k, v, sa.documents(ids) & sa.causal(), make_mods(MODS["all"], 2, 2, 130, 130))


def test_layout_blocks_spanning_several_tiles():
    """128-token layout blocks: each entry holds 4 x 4 kernel tiles of the rel_bias dQ pass (32 x 32)."""
    q, k, v = make_qkv(b=1, hq=1, sq=160, skv=200)
    layout = (sa.sliding_window(60) | sa.global_tokens(3)).layout(160, 200, block_size=128)
    check(q, k, v, layout, make_mods(MODS["all"], 1, 1, 160, 200))


def test_empty_rows_and_all_padding_batch():
    """A query block that sees nothing and a batch element whose keys are all padding: out 0, lse -inf,
    zero gradients, d_rel_bias unaffected (the modifiers never revive an invisible pair)."""
    blocks = torch.ones(2, 3, dtype=torch.bool)
    blocks[1] = False
    key_mask = torch.ones(2, 130, dtype=torch.bool)
    key_mask[1] = False
    q, k, v = make_qkv(sq=97, skv=130)
    mods = make_mods(MODS["all"], 2, 2, 97, 130)
    out, lse, dq, dk, dv, _ = check(q, k, v, sa.block_sparse(blocks, 64), mods, key_mask=key_mask)
    for empty in (out[0, :, 64:], out[1], dq[0, :, 64:], dq[1], dk[1], dv[1]):
        assert torch.equal(empty, torch.zeros_like(empty))
    assert lse[0, :, 64:].eq(float("-inf")).all() and lse[1].eq(float("-inf")).all()


def test_large_softcap_inputs_and_tiny_scores():
    """tanh over its whole range: scores far past the cap (saturated, derivative ~0) and scores near 0 (the
    Taylor branch), against float64."""
    q, k, v = make_qkv(b=1, sq=70, skv=70)
    check(q * 6.0, k, v, sa.causal(), {"softcap": 0.7})
    check(q * 1e-4, k, v, sa.causal(), {"softcap": 30.0})


def test_d_rel_bias_is_bitwise_deterministic():
    q, k, v = make_qkv(b=2, hq=2, hkv=2, sq=97, skv=97)
    mods = make_mods(MODS["all"], 2, 2, 97, 97)
    pattern = sa.sliding_window(50) | sa.global_tokens(2)

    def ours(q, k, v, **m):
        return sa.sparse_attention(q, k, v, pattern, backend="triton", return_lse=True, **m)

    first = run(ours, q, k, v, mods, torch.float16)
    second = run(ours, q, k, v, mods, torch.float16)
    for name, a, b in zip(NAMES_WITH_BIAS, first, second, strict=True):
        assert torch.equal(a, b), name


def test_launcher_returns_four_gradients_in_the_bias_dtype():
    """`launch.attention_bwd` returns (dq, dk, dv, d_rel_bias): None without a rel_bias; with one, in its
    dtype (float64 here, fp32 inputs), equal to the reference's rel_bias gradient."""
    q, k, v = (t.float() for t in make_qkv(b=1, sq=64, skv=96))
    layout = sa.causal().layout(64, 96, block_size=64)
    scale = 32**-0.5
    out, lse = launch.attention_fwd(q, k, v, layout, scale)
    do = torch.randn_like(out)
    assert launch.attention_bwd(do, None, q, k, v, out, lse, layout, scale)[3] is None
    rel_bias = torch.randn(2, 64 + 96 - 1, dtype=torch.float64)
    mods = ScoreMods(softcap=2.0, rel_bias=rel_bias)
    out, lse = launch.attention_fwd(q, k, v, layout, scale, mods=mods)
    grads = launch.attention_bwd(do, None, q, k, v, out, lse, layout, scale, mods=mods)
    assert len(grads) == 4 and grads[3].dtype == torch.float64 and grads[3].shape == rel_bias.shape
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)] + [rel_bias.clone().requires_grad_(True)]
    ref_out, _ = attention_reference(*leaves[:3], layout, scale=scale, softcap=2.0, rel_bias=leaves[3])
    ref_out.backward(do.double())
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=0, atol=1e-5)
    for got, leaf in zip(grads, leaves, strict=True):
        torch.testing.assert_close(got.double(), leaf.grad, rtol=0, atol=1e-4)


def test_calls_without_modifiers_run_no_modifier_code(monkeypatch):
    """With no modifier every flag is off: the modifier helpers never run (under the interpreter the jit
    helpers are Python calls); with a cap far above every score they run and give the same attention."""
    from sparse_attn.triton_kernels import bsattn

    calls = dict.fromkeys(("_modify_scores", "_diagonal_sums", "_tanh"), 0)
    originals = {name: getattr(bsattn, name) for name in calls}
    for name in calls:

        def counted(*args, _name=name, **kwargs):
            calls[_name] += 1
            return originals[_name](*args, **kwargs)

        monkeypatch.setattr(bsattn, name, counted)
    q, k, v = make_qkv(b=1, sq=70, skv=70)
    pattern = sa.causal()

    def ours(q, k, v, **m):
        return sa.sparse_attention(q, k, v, pattern, backend="triton", return_lse=True, **m)

    plain = run(ours, q, k, v, {}, torch.float32)
    assert calls == dict.fromkeys(calls, 0)
    capped = run(ours, q, k, v, {"softcap": 1e9}, torch.float32)
    assert calls["_modify_scores"] > 0 and calls["_tanh"] > 0 and calls["_diagonal_sums"] == 0
    # A cap far above every score changes them by < 1 ulp: the same attention, through the modifier code.
    for name, a, b in zip(NAMES_WITH_BIAS[:5], plain[:5], capped[:5], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_content_selected_layout():
    """A layout selected on the device (top-k blocks per query block, a layout per batch element and head,
    entry arrays with unused trailing slots): d_rel_bias reads only the tiles the kernels visited."""
    q, k, v = make_qkv(b=2, hq=2, hkv=2, sq=160, skv=160)
    layout = sa.select_layout(sa.topk_blocks(2) & sa.causal(), q.float(), k.float(), block_size=64)
    assert layout.batch == 2 and layout.num_heads == 2
    check(q, k, v, layout, make_mods(MODS["all"], 2, 2, 160, 160), key_mask=padding_mask(2, 160))


FAMILIES = {
    "dilated": sa.dilated(12, dilation=3) & sa.causal(),
    "bigbird": sa.bigbird(window=20, global_tokens=4, num_random_blocks=1, block_size=64),
    "block_sparse": sa.block_sparse(torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool), 64),
    "chunked&causal": sa.chunked(50) & sa.causal(),
    "globals": sa.global_tokens(5),
}


@pytest.mark.parametrize("pattern", FAMILIES)
def test_all_modifiers_on_every_pattern_family(pattern):
    q, k, v = make_qkv()
    check(q, k, v, FAMILIES[pattern], make_mods(MODS["all"], 2, 2, 97, 130), key_mask=padding_mask(2, 130))
