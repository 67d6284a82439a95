"""Layouts from data: per-batch layouts, packed documents and variable-length batches.

Every mask here is built independently in the test, token by token from the document lengths (never from
the library's own `mask()`), and every path is compared with the dense float64 reference: forward, lse and
all gradients, on the PyTorch backend and on the Triton kernels through the interpreter.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_attn as sa
from sparse_attn.layout import BlockLayout, pack_tiles
from sparse_attn.patterns.documents import _interval_words
from sparse_attn.reference import attention_reference

BACKENDS = ["torch", "triton"]


# -- independent truth -------------------------------------------------------------------------------------
def ids_from_lengths(lengths):
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def band_truth(kind, d):
    """Token predicates of the patterns the tests compose with documents, on ``d = qpos - j``."""
    return {
        "all": torch.ones_like(d, dtype=torch.bool),
        "causal": d >= 0,
        "window": (d >= 0) & (d <= 5),
        "wide": d.abs() <= 9,
        "dilated": (d.abs() <= 8) & (d % 2 == 0),
    }[kind]


PATTERNS = {
    "all": lambda: None,
    "causal": sa.causal,
    "window": lambda: sa.causal() & sa.sliding_window(5, 0),
    "wide": lambda: sa.sliding_window(9),
    "dilated": lambda: sa.dilated(4, dilation=2),
}


def documents_truth(lengths, q_len, kind, global_keys=()):
    """bool [q_len, kv_len]: same document and the band; `global_keys` positions see and are seen (union)."""
    ids = ids_from_lengths(lengths)
    kv_len = len(ids)
    qpos = torch.arange(q_len)[:, None] + kv_len - q_len
    j = torch.arange(kv_len)[None, :]
    same = ids[qpos] == ids[j]
    m = same & band_truth(kind, qpos - j)
    for p in global_keys:
        m |= (j == p) | (qpos == p)
    return m


def documents_pattern(ids, kind, global_keys=()):
    p = sa.documents(ids)
    band = PATTERNS[kind]()
    p = p if band is None else p & band
    return p | sa.global_tokens(list(global_keys)) if global_keys else p


def block_classes(mask, bq, bk):
    """0/1/2 (empty/partial/full) of every block of a token mask [q, kv], over its real pairs."""
    q, kv = mask.shape
    nqb, nkb = -(-q // bq), -(-kv // bk)
    pad = lambda m, fill: torch.nn.functional.pad(m, (0, nkb * bk - kv, 0, nqb * bq - q), value=fill)
    blocks = lambda m: m.view(nqb, bq, nkb, bk).transpose(1, 2).flatten(2)
    any_visible = blocks(pad(mask, False)).any(-1)
    all_visible = blocks(pad(mask, True)).all(-1)
    return torch.where(all_visible, 2, torch.where(any_visible, 1, 0)).to(torch.int8)


# -- layout exactness --------------------------------------------------------------------------------------
doc_lengths = st.lists(st.integers(1, 30), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(doc_lengths, min_size=1, max_size=3),
    kind=st.sampled_from(sorted(PATTERNS)),
    block=st.sampled_from([(4, 4), (8, 4), (4, 8), (3, 5), (16, 16)]),
    q_cut=st.integers(0, 30),
    with_global=st.booleans(),
)
def test_documents_layout_is_exact(lengths, kind, block, q_cut, with_global):
    """Every block of ``documents & band`` (and ``| global_tokens``) is classified exactly, per element."""
    kv_len = max(sum(x) for x in lengths)
    # Pad every element to one length with a last document.
    lengths = [x + ([kv_len - sum(x)] if sum(x) < kv_len else []) for x in lengths]
    ids = torch.stack([ids_from_lengths(x) for x in lengths])
    q_len = max(1, kv_len - q_cut)
    global_keys = (0, kv_len // 2) if with_global else ()
    layout = documents_pattern(ids, kind, global_keys).layout(q_len, kv_len, block_size=block)
    assert layout.batch == len(lengths) and layout.num_heads == 1
    classes = layout.to_block_mask()
    dense = layout.to_dense()
    for b, x in enumerate(lengths):
        truth = documents_truth(x, q_len, kind, global_keys)
        assert torch.equal(dense[b, 0], truth)
        assert torch.equal(classes[b, 0], block_classes(truth, *block))


def test_document_boundaries_on_blocks_short_and_single_token_documents():
    """Length-1 documents, documents shorter than a block, one ending exactly on a block boundary."""
    lengths = [1, 7, 24, 1, 1, 30, 64]  # 1 + 7 + 24 = 32 ends on the 32-block boundary
    ids = ids_from_lengths(lengths)
    for kind in PATTERNS:
        layout = documents_pattern(ids, kind).layout(len(ids), block_size=32)
        truth = documents_truth(lengths, len(ids), kind)
        assert torch.equal(layout.to_dense()[0], truth)
        assert torch.equal(layout.to_block_mask()[0], block_classes(truth, 32, 32))
    # Whole documents of whole blocks are full blocks only, and share nothing across documents.
    layout = sa.documents(ids_from_lengths([64, 32, 32])).layout(128, block_size=32)
    assert layout.num_partial == 0 and layout.num_full == 4 + 1 + 1


def test_documents_layout_tiles_are_shared_and_build_needs_no_dense_mask():
    """Long packing: the tiles stay a handful per document boundary; no S x S tensor is formed."""
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(131071, generator=g)[:63] + 1).values
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([131072])]))
    layout = (sa.documents(ids_from_lengths(lengths.tolist())) & sa.causal()).layout(131072, block_size=128)
    assert layout.tiles.shape[0] <= 8 * 64
    # At most the causal blocks of each document's own blocks, plus a row and a column per boundary.
    blocks = lengths // 128 + 2
    assert layout.num_full + layout.num_partial <= int((blocks * (blocks + 1) // 2).sum())


def test_documents_validation():
    with pytest.raises(ValueError, match="non-decreasing"):
        sa.documents(torch.tensor([0, 1, 0])).layout(3)
    with pytest.raises(TypeError, match="integer"):
        sa.documents(torch.zeros(4))
    with pytest.raises(ValueError, match="kv_len"):
        sa.documents(torch.zeros(4, dtype=torch.long)).layout(5)
    q = k = v = torch.randn(3, 1, 8, 16)
    with pytest.raises(ValueError, match="batch"):
        sa.sparse_attention(q, k, v, sa.documents(torch.zeros(2, 8, dtype=torch.long)))


def test_stacked_layouts_and_batch_elements():
    a = sa.causal().layout(100, block_size=32)
    b = sa.sliding_window(7).layout(100, block_size=32)
    stacked = BlockLayout.stack([a, b, a])
    assert stacked.to_block_mask().shape == (3, 1, 4, 4)
    assert torch.equal(stacked.to_dense()[1], b.to_dense())
    assert torch.equal(stacked.batch_element(2).to_dense(), a.to_dense())
    assert "batch=3" in repr(stacked)
    with pytest.raises(ValueError, match="one geometry"):
        BlockLayout.stack([a, sa.causal().layout(64, block_size=32)])


# -- attention against the reference -------------------------------------------------------------------------
def grads_of(fn, q, k, v, dtype):
    """(out, lse, dq, dk, dv) of `fn` on leaf copies in `dtype`, through a random linear loss."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    finite = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
    ((out.double() * w_out).sum() + (finite.double() * w_lse).sum()).backward()
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def assert_close(got, truth, tol):
    for a, b in zip(got, truth, strict=True):
        a, b = a.double(), b.double()
        assert torch.equal(a.isinf(), b.isinf())
        a, b = torch.where(b.isinf(), 0, a), torch.where(b.isinf(), 0, b)
        assert (a - b).abs().max() <= tol, (a - b).abs().max()


def backend_dtype_tol(backend):
    return (torch.float64, 1e-10) if backend == "torch" else (torch.float32, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_documents_against_reference(backend):
    """B=2, per-element packings, GQA, a per-head pattern mixing causal and sliding window | globals."""
    lengths = [[1, 7, 24, 40, 24], [50, 1, 1, 44]]
    ids = torch.stack([ids_from_lengths(x) for x in lengths])
    pattern = sa.per_head([documents_pattern(ids, "causal"), documents_pattern(ids, "window", (3,))])
    truth = torch.stack(
        [
            torch.stack([documents_truth(x, 96, "causal"), documents_truth(x, 96, "window", (3,))])
            for x in lengths
        ]
    )
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 2, 96, 16, generator=g),
        torch.randn(2, 1, 96, 16, generator=g),
        torch.randn(2, 1, 96, 16, generator=g),
    )
    dtype, tol = backend_dtype_tol(backend)

    def ours(q, k, v):
        return sa.sparse_attention(q, k, v, pattern, return_lse=True, backend=backend)

    got = grads_of(ours, q, k, v, dtype)
    want = grads_of(lambda q, k, v: attention_reference(q, k, v, truth), q, k, v, torch.float64)
    assert_close(got, want, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_batch_layout_shared_heads_decode_rows(backend):
    """A stacked per-batch layout (different patterns per element) with fewer queries than keys."""
    layouts = [
        sa.causal().layout(40, 72, block_size=32),
        (sa.documents(ids_from_lengths([30, 2, 40])) & sa.causal()).layout(40, 72, block_size=32),
    ]
    layout = BlockLayout.stack(layouts)
    truth = torch.stack([x.to_dense() for x in layouts])
    g = torch.Generator().manual_seed(2)
    q, k, v = (
        torch.randn(2, 2, 40, 16, generator=g),
        torch.randn(2, 2, 72, 16, generator=g),
        torch.randn(2, 2, 72, 16, generator=g),
    )
    dtype, tol = backend_dtype_tol(backend)
    got = grads_of(
        lambda q, k, v: sa.sparse_attention(q, k, v, layout, return_lse=True, backend=backend), q, k, v, dtype
    )
    want = grads_of(lambda q, k, v: attention_reference(q, k, v, truth), q, k, v, torch.float64)
    assert_close(got, want, tol)


def test_shared_layout_kernels_unchanged_flag():
    """A layout shared by the batch launches the kernels without the per-batch flag (the code of before)."""
    launch = pytest.importorskip("sparse_attn.triton_kernels.launch")
    q = torch.zeros(2, 1, 8, 16)
    shared = launch._common_meta(q, sa.causal().layout(8, block_size=32), None)
    batched = launch._common_meta(q, BlockLayout.stack([sa.causal().layout(8, block_size=32)] * 2), None)
    assert shared["PER_BATCH_LAYOUT"] is False and batched["PER_BATCH_LAYOUT"] is True


# -- varlen ------------------------------------------------------------------------------------------------
def varlen_truth(lq, lk, kind):
    cq, ck = [0, *torch.tensor(lq).cumsum(0).tolist()], [0, *torch.tensor(lk).cumsum(0).tolist()]
    m = torch.zeros(cq[-1], ck[-1], dtype=torch.bool)
    for n, (a, b) in enumerate(zip(lq, lk, strict=True)):
        d = torch.arange(a)[:, None] + b - a - torch.arange(b)[None, :]
        m[cq[n] : cq[n] + a, ck[n] : ck[n] + b] = band_truth(kind, d)
    return m


def cu(lengths):
    return torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)


@pytest.mark.parametrize(
    ("backend", "kind"), [("torch", "causal"), ("torch", "window"), ("triton", "window")]
)
def test_varlen_against_reference(backend, kind):
    """Sequences of mixed shapes: empty, decode-shaped (1 query, many keys), no keys, longer than a block; GQA."""
    lq, lk = [5, 0, 1, 40, 3, 33], [5, 3, 50, 40, 0, 70]
    truth = varlen_truth(lq, lk, kind)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lq), 2, 16, generator=g)
    k, v = torch.randn(sum(lk), 1, 16, generator=g), torch.randn(sum(lk), 1, 16, generator=g)
    dtype, tol = backend_dtype_tol(backend)

    def ours(q, k, v):
        return sa.sparse_attention_varlen(
            q, k, v, cu(lq), cu(lk), PATTERNS[kind](), return_lse=True, backend=backend, block_size=32
        )

    def reference(q, k, v):
        out, lse = attention_reference(*(t.transpose(0, 1)[None] for t in (q, k, v)), truth)
        return out[0].transpose(0, 1), lse[0]

    got = grads_of(ours, q, k, v, dtype)
    assert got[0].shape == q.shape and got[1].shape == (2, sum(lq))
    assert_close(got, grads_of(reference, q, k, v, torch.float64), tol)
    # The queries of the sequence with no keys: output 0, lse -inf.
    assert got[1][:, 46:49].isinf().all() and (got[0][46:49] == 0).all()


def test_varlen_validation_and_unsupported_patterns():
    q = k = v = torch.randn(10, 1, 16)
    with pytest.raises(ValueError, match="end at the packed length"):
        sa.sparse_attention_varlen(q, k, v, cu([4, 5]), cu([4, 4]), sa.causal())
    with pytest.raises(ValueError, match="same number of sequences"):
        sa.sparse_attention_varlen(q, k, v, cu([4, 6]), cu([10]), sa.causal())
    with pytest.raises(ValueError, match="per-sequence meaning"):
        sa.sparse_attention_varlen(q, k, v, cu([4, 6]), cu([4, 6]), sa.causal() | sa.global_tokens(2))
    with pytest.raises(ValueError, match="3-D"):
        sa.sparse_attention_varlen(q[None], k, v, cu([10]), cu([10]))
    out, lse = sa.sparse_attention_varlen(q[:0], k, v, cu([0, 0]), cu([4, 6]), sa.causal(), return_lse=True)
    assert out.shape == (0, 1, 16) and lse.shape == (1, 0)


def test_varlen_equals_padded_batch_run_one_by_one():
    """Each sequence of a varlen call equals sparse_attention on that sequence alone (bottom-right aligned)."""
    lq, lk = [3, 17, 9], [20, 17, 30]
    g = torch.Generator().manual_seed(4)
    q, k, v = (
        torch.randn(sum(lq), 2, 16, generator=g),
        torch.randn(sum(lk), 2, 16, generator=g),
        torch.randn(sum(lk), 2, 16, generator=g),
    )
    pattern = sa.causal() & sa.sliding_window(6, 0)
    out = sa.sparse_attention_varlen(q, k, v, cu(lq), cu(lk), pattern, block_size=16)
    cq, ck = cu(lq).tolist(), cu(lk).tolist()
    for n in range(3):
        one = sa.sparse_attention(
            *(
                t[a:b].transpose(0, 1)[None]
                for t, a, b in ((q, cq[n], cq[n + 1]), (k, ck[n], ck[n + 1]), (v, ck[n], ck[n + 1]))
            ),
            pattern,
        )
        torch.testing.assert_close(out[cq[n] : cq[n + 1]], one[0].transpose(0, 1))


# -- torch.compile -----------------------------------------------------------------------------------------
def test_compile_with_documents_and_prebuilt_per_batch_layout():
    ids = torch.stack([ids_from_lengths([20, 44]), ids_from_lengths([1, 63])])
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 64, 16, generator=g) for _ in range(3))
    layout = (sa.documents(ids) & sa.causal()).layout(64, block_size=32)
    want = attention_reference(q, k, v, layout)[0]
    full = torch.compile(
        lambda q, k, v: sa.sparse_attention(q, k, v, layout),
        fullgraph=True,
        dynamic=False,
        backend="aot_eager",
    )
    torch.testing.assert_close(full(q, k, v), want)
    # Document ids given per call: the layout is built eagerly, from the ids of this call.
    per_call = torch.compile(
        lambda q, k, v, ids: sa.sparse_attention(q, k, v, sa.documents(ids) & sa.causal()),
        dynamic=False,
        backend="aot_eager",
    )
    torch.testing.assert_close(per_call(q, k, v, ids), want)
    other = ids.flip(0)
    want_other = attention_reference(q, k, v, (sa.documents(other) & sa.causal()).layout(64, block_size=32))[
        0
    ]
    torch.testing.assert_close(per_call(q, k, v, other), want_other)


# -- nn drop-in ------------------------------------------------------------------------------------------
def test_modules_take_document_ids_per_call():
    lengths = [[5, 1, 26], [32]]
    ids = torch.stack([ids_from_lengths(x) for x in lengths])
    truth = torch.stack([documents_truth(x, 32, "causal") for x in lengths])[:, None]
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, 32, 16, generator=g, dtype=torch.float64) for _ in range(3))
    module = sa.SparseAttention(sa.causal())
    torch.testing.assert_close(module(q, k, v, document_ids=ids), attention_reference(q, k, v, truth)[0])
    # The next call without ids is plain causal again (nothing cached from the documents).
    torch.testing.assert_close(module(q, k, v), attention_reference(q, k, v, sa.causal())[0])

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True, dtype=torch.float64)
    sparse = sa.SparseMultiheadAttention.from_dense(mha, sa.causal())
    x = torch.randn(2, 32, 16, generator=g, dtype=torch.float64)
    out, weights = sparse(x, x, x, document_ids=ids)
    # nn's float mask: 0 where visible, -inf elsewhere, per batch element and head.
    blocked = (~truth).expand(2, 2, 32, 32).reshape(4, 32, 32)
    want, want_weights = mha(
        x, x, x, attn_mask=torch.zeros(4, 32, 32, dtype=torch.float64).masked_fill(blocked, float("-inf"))
    )
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(weights, want_weights)


# -- pictures ----------------------------------------------------------------------------------------------
def test_show_and_plot_documents(tmp_path, capsys):
    from sparse_attn import cli
    from sparse_attn.spec import parse_spec
    from sparse_attn.viz import plot_pattern

    out = tmp_path / "docs.png"
    assert cli.main(["show", "doc:100,30,1,125&causal", "--block-size", "32", "-o", str(out)]) == 0
    assert out.stat().st_size > 0 and "q_len=256" in capsys.readouterr().out
    pattern = parse_spec("doc:100,30,1,125&window:20:0")
    d = torch.arange(256)[:, None] - torch.arange(256)[None, :]
    assert torch.equal(
        pattern.mask(256), documents_truth([100, 30, 1, 125], 256, "all") & (d >= 0) & (d <= 20)
    )
    ids = torch.stack([ids_from_lengths([10, 54]), ids_from_lengths([64])])
    fig = plot_pattern(sa.documents(ids) & sa.causal(), 64, block_size=16, batch=1)
    assert fig is not None


@pytest.mark.parametrize("bk", [5, 32, 37, 128])
def test_interval_words_pack_row_intervals_in_chunks(bk):
    """The packed words of row intervals ``[start, end]`` (empty where start > end, clipped to the tile)
    equal `pack_tiles` of the boolean rows, whatever the chunking and however the rows are split in parts."""
    gen = torch.Generator().manual_seed(bk)
    start = torch.randint(-3, bk + 3, (7, 6), generator=gen)
    end = start + torch.randint(-4, bk + 4, (7, 6), generator=gen)
    cols = torch.arange(bk)
    truth = pack_tiles((cols >= start[..., None]) & (cols <= end[..., None]))
    for chunk in (1, 5, 4096):
        parts = [(start[:3], end[:3]), (start[3:3], end[3:3]), (start[3:], end[3:])]
        assert torch.equal(_interval_words(parts, bk, chunk), truth)
