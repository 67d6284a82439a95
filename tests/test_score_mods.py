"""Score modifiers (softcap, ALiBi, rel_bias) through the public function on the PyTorch backend, both engines,
against the float64 reference: values, all gradients (rel_bias' too), checks, torch.compile, garbage keys."""

from __future__ import annotations

import re

import pytest
import torch

import sparse_attn as sa
from sparse_attn.backends import cpu_kernel
from sparse_attn.reference import attention_reference
from tests.reference_check import MOD_SETS as MODS
from tests.reference_check import assert_close_with_mods, make_mods
from tests.reference_check import run_with_grads as run


@pytest.fixture(params=["aten", "auto"])
def engine(request, monkeypatch):
    """Both engines of the "torch" backend: the ATen composition and (auto) the C++ kernel where it runs."""
    monkeypatch.setenv(cpu_kernel.ENGINE_ENV, request.param)
    return request.param


def make_inputs(b=2, hq=4, hkv=2, sq=150, skv=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def check(q, k, v, pattern, mods, dtype, key_mask=None, **kw):
    """The torch backend in `dtype` against the float64 reference, within twice the plain math's error."""
    ours = lambda *t, **m: sa.sparse_attention(  # noqa: E731
        *t, pattern, backend="torch", key_mask=key_mask, return_lse=True, **m, **kw
    )
    ref = lambda *t, **m: attention_reference(*t, pattern, key_mask=key_mask, **m, **kw)  # noqa: E731
    got = run(ours, q, k, v, mods, dtype)
    truth = run(ref, q, k, v, mods, torch.float64)
    plain = run(ref, q, k, v, mods, dtype)
    assert_close_with_mods(got, truth, plain, dtype)
    return got


PATTERNS = {
    "window+globals": sa.sliding_window(40) | sa.global_tokens(3),
    "causal": sa.causal(),
    "per-head": sa.per_head(
        [sa.sliding_window(20), sa.causal(), sa.global_tokens(5), sa.sliding_window(60, 0)]
    ),
    "dilated": sa.dilated(12, dilation=3) & sa.causal(),
    "bigbird": sa.bigbird(window=20, global_tokens=4, num_random_blocks=1, block_size=64),
    "block_sparse": sa.block_sparse(
        torch.tensor([[1, 0, 1, 1], [0, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.bool), 64
    ),
    "chunked&causal": sa.chunked(50) & sa.causal(),
}


@pytest.mark.parametrize("mods", MODS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_reference_float64(engine, mods, pattern):
    q, k, v = make_inputs()
    km = torch.rand(2, 200, generator=torch.Generator().manual_seed(3)) > 0.2
    check(q, k, v, PATTERNS[pattern], make_mods(MODS[mods], 2, 4, 150, 200), torch.float64, key_mask=km)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_low_precision(engine, dtype):
    q, k, v = make_inputs()
    check(q, k, v, PATTERNS["window+globals"], make_mods(MODS["all"], 2, 4, 150, 200), dtype)


def test_decode_and_documents(engine):
    """One decode query (Sq = 1: the bias row of the last position), and a per-batch layout (documents)."""
    q, k, v = make_inputs(sq=1, skv=97)
    check(q, k, v, sa.sliding_window(30, 0), make_mods(MODS["all"], 2, 4, 1, 97), torch.float64)
    q, k, v = make_inputs(sq=130, skv=130)
    ids = torch.tensor([[0] * 50 + [1] * 80, [0] * 7 + [1] * 100 + [2] * 23])
    check(q, k, v, sa.documents(ids) & sa.causal(), make_mods(MODS["all"], 2, 4, 130, 130), torch.float64)


def test_garbage_in_masked_keys_changes_nothing(engine):
    q, k, v = (t.float() for t in make_inputs())
    km = torch.ones(2, 200, dtype=torch.bool)
    km[:, 150:] = False
    km[1, :20] = False
    mods = {
        n: (t.float() if isinstance(t, torch.Tensor) else t)
        for n, t in make_mods(MODS["all"], 2, 4, 150, 200).items()
    }
    pattern = sa.sliding_window(64) | sa.global_tokens(2)
    clean = sa.sparse_attention(q, k, v, pattern, key_mask=km, backend="torch", **mods)
    for garbage in (float("nan"), float("inf")):
        k2, v2 = k.clone(), v.clone()
        k2[~km[:, None, :, None].expand_as(k2)] = garbage
        v2[~km[:, None, :, None].expand_as(v2)] = garbage
        got = sa.sparse_attention(q, k2, v2, pattern, key_mask=km, backend="torch", **mods)
        assert torch.equal(got, clean)


def test_rel_bias_gradient_is_deterministic(engine):
    q, k, v = make_inputs()
    mods = make_mods(MODS["all"], 2, 4, 150, 200)
    first = run(
        lambda *t, **m: sa.sparse_attention(*t, sa.causal(), backend="torch", return_lse=True, **m),
        q,
        k,
        v,
        mods,
        torch.float32,
    )
    again = run(
        lambda *t, **m: sa.sparse_attention(*t, sa.causal(), backend="torch", return_lse=True, **m),
        q,
        k,
        v,
        mods,
        torch.float32,
    )
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_mask_wins_over_any_bias(engine):
    """A hidden pair stays hidden whatever its bias: huge rel_bias on the diagonals the window hides."""
    q, k, v = make_inputs(b=1, hq=2, hkv=2, sq=100, skv=100)
    bias = torch.zeros(2, 199, dtype=torch.float64)
    bias[:, : 99 - 10] = 1e4  # j - i < -10: outside sliding_window(10)
    out = sa.sparse_attention(q, k, v, sa.sliding_window(10), rel_bias=bias, backend="torch")
    plain = sa.sparse_attention(q, k, v, sa.sliding_window(10), backend="torch")
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-12)


def test_inference_mode_and_strides(engine):
    q, k, v = (t.float() for t in make_inputs())
    mods = {
        n: (t.float() if isinstance(t, torch.Tensor) else t)
        for n, t in make_mods(MODS["all"], 2, 4, 150, 200).items()
    }
    want = sa.sparse_attention(q, k, v, sa.causal(), backend="torch", **mods)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, D] storage
    rb = mods["rel_bias"].t().contiguous().t()  # a transposed rel_bias
    with torch.inference_mode():
        got = sa.sparse_attention(qt, k, v, sa.causal(), backend="torch", **{**mods, "rel_bias": rb})
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_compile_fullgraph_matches_eager():
    q, k, v = (t.float() for t in make_inputs(b=1, hq=2, hkv=1, sq=96, skv=96))
    mods = {
        n: (t.float() if isinstance(t, torch.Tensor) else t)
        for n, t in make_mods(MODS["all"], 1, 2, 96, 96).items()
    }
    fn = lambda *t, **m: sa.sparse_attention(*t, sa.causal(), backend="torch", return_lse=True, **m)  # noqa: E731
    eager = run(fn, q, k, v, mods, torch.float32)
    compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"), q, k, v, mods, torch.float32)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"softcap": 0.0}, ValueError, "softcap must be a finite number > 0"),
        ({"softcap": float("nan")}, ValueError, "softcap"),
        ({"softcap": True}, TypeError, "softcap must be a positive real"),
        ({"softcap": "30"}, TypeError, "softcap"),
        ({"alibi_slopes": torch.ones(3)}, ValueError, "alibi_slopes must be [Hq=2] or [B=1, Hq=2]"),
        ({"alibi_slopes": torch.ones(2, dtype=torch.int64)}, TypeError, "floating-point"),
        ({"alibi_slopes": torch.ones(2, requires_grad=True)}, ValueError, "get no gradient"),
        ({"alibi_slopes": [0.5, 0.25]}, TypeError, "alibi_slopes must be a torch.Tensor"),
        ({"rel_bias": torch.zeros(2, 30)}, ValueError, "rel_bias must be [Hq=2, Sq + Skv - 1=31]"),
        ({"rel_bias": torch.zeros(2, 31, dtype=torch.int32)}, TypeError, "floating-point"),
    ],
)
def test_bad_modifiers_raise_clearly(kwargs, error, words):
    q = torch.zeros(1, 2, 16, 8)
    k = torch.zeros(1, 1, 16, 8)
    with pytest.raises(error, match=re.escape(words)):
        sa.sparse_attention(q, k, k, sa.causal(), backend="torch", **kwargs)


def test_varlen_softcap_and_alibi_per_sequence():
    """Packed sequences: softcap and ALiBi distances are each sequence's own (cu_seqlens_q == cu_seqlens_k)."""
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 37, 37, 117, 122], dtype=torch.int32)
    q = torch.randn(122, 4, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(122, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    slopes = torch.rand(4, generator=g, dtype=torch.float64)
    out = sa.sparse_attention_varlen(
        q, k, v, cu, cu, sa.causal(), softcap=2.0, alibi_slopes=slopes, backend="torch"
    )
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if a < b:
            seq = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
            want, _ = attention_reference(*seq, sa.causal(), softcap=2.0, alibi_slopes=slopes)
            torch.testing.assert_close(out[a:b], want[0].transpose(0, 1), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="cu_seqlens_q == cu_seqlens_k"):
        cu_k = torch.tensor([0, 30, 37, 117, 122], dtype=torch.int32)
        sa.sparse_attention_varlen(q, k, v, cu, cu_k, sa.causal(), alibi_slopes=slopes, backend="torch")


def test_module_carries_softcap_and_alibi():
    q, k, v = (t.float() for t in make_inputs(b=1, hq=4, hkv=2, sq=80, skv=80))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    rel = torch.randn(4, 159)
    module = sa.SparseAttention(sa.causal(), backend="torch", softcap=3.0, alibi_slopes=slopes)
    assert "softcap=3.0" in repr(module) and "alibi=True" in repr(module)
    want = sa.sparse_attention(
        q, k, v, sa.causal(), backend="torch", softcap=3.0, alibi_slopes=slopes, rel_bias=rel
    )
    torch.testing.assert_close(module(q, k, v, rel_bias=rel), want, rtol=0, atol=0)
    assert "alibi_slopes" in dict(module.named_buffers())


def test_topk_selection_with_modifiers(engine):
    """Content-selected blocks: the modifiers apply inside the selected blocks (per-batch, per-head layout)."""
    q, k, v = make_inputs(sq=192, skv=192)
    pattern = sa.topk_blocks(2) & sa.causal()
    layout = sa.select_layout(pattern, q, k, block_size=64)
    mods = make_mods(MODS["all"], 2, 4, 192, 192)
    got = sa.sparse_attention(q, k, v, pattern, backend="torch", **mods)
    want, _ = attention_reference(q, k, v, layout, **mods)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
