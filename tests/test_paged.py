"""Decoding over paged KV caches: `sparse_attention_paged`, `PagedKVCache`, `sparse_attention_offloaded`.

The oracle gathers each sequence's cache positions ``[0, L_b)`` into ``[1, Hkv, L_b, D]`` and runs the
float64 reference with the pattern (for top-k, with the layout `select_layout` picks at block size
``(Sq, page_size)``: a page is a key block)."""

from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from sparse_attn.patterns.topk import selects
from sparse_attn.reference import attention_reference
from tests.reference_check import FLOORS, max_err

PAGE, MAX_PAGES, NUM_PAGES = 8, 12, 40
LENGTHS = (37, 90)
IDS = torch.tensor([0] * 20 + [1] * 50 + [2] * 26)  # document ids over the table's 96 positions


def _cache(dtype=torch.float64, kv_heads=2, dim=16, seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(NUM_PAGES, PAGE, kv_heads, dim, generator=g, dtype=torch.float64)
    v = torch.randn(NUM_PAGES, PAGE, kv_heads, dim, generator=g, dtype=torch.float64)
    table = torch.randperm(NUM_PAGES, generator=g)[: len(lengths) * MAX_PAGES].view(len(lengths), MAX_PAGES)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    # Garbage past every sequence's end: it must never reach an output.
    for b, length in enumerate(lengths):
        pos = torch.arange(length, MAX_PAGES * PAGE)
        k[table[b, pos // PAGE], pos % PAGE] = float("nan")
        v[table[b, pos // PAGE], pos % PAGE] = float("nan")
    return k.to(dtype), v.to(dtype), table.int(), seqlens


def _gathered(cache, table, b, length):
    pos = torch.arange(length)
    return cache[table[b, pos // PAGE].long(), pos % PAGE].permute(1, 0, 2)[None]  # [1, Hkv, L, D]


def _oracle(q, k_cache, v_cache, table, seqlens, pattern, per_length=None, **mods):
    q, k_cache, v_cache = q.double(), k_cache.double(), v_cache.double()
    outs, lses = [], []
    for b, length in enumerate(seqlens.tolist()):
        k, v = _gathered(k_cache, table, b, length), _gathered(v_cache, table, b, length)
        mask = pattern if per_length is None else per_length(length)
        if selects(mask):
            mask = sa.select_layout(mask, q[b : b + 1], k, block_size=(q.shape[2], PAGE))
        kw = dict(mods)
        if kw.get("rel_bias") is not None:
            kw["rel_bias"] = kw["rel_bias"][:, MAX_PAGES * PAGE - length :].double()
        if kw.get("alibi_slopes") is not None:
            kw["alibi_slopes"] = kw["alibi_slopes"].double()[b]
        out, lse = attention_reference(q[b : b + 1], k, v, mask, **kw)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def _assert_close(got, truth, plain, dtype):
    for name, g, t, p in zip(("out", "lse"), got, truth, plain, strict=True):
        assert not g.isnan().any(), f"{name} has NaN"
        err, allowed = max_err(g, t), 2 * max_err(p, t) + FLOORS[dtype]
        assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g}"


def _check(pattern, q_len=1, heads=4, backend="torch", dtype=torch.float64, per_length=None, **mods):
    k_cache, v_cache, table, seqlens = _cache(dtype)
    q = torch.randn(len(LENGTHS), heads, q_len, k_cache.shape[-1], generator=torch.Generator().manual_seed(3))
    q = q.to(dtype)
    with torch.inference_mode():
        got = sa.sparse_attention_paged(
            q, k_cache, v_cache, table, seqlens, pattern, return_lse=True, backend=backend, **mods
        )
    assert got[0].dtype == dtype and got[0].shape == q.shape
    truth = _oracle(q, k_cache, v_cache, table, seqlens, pattern, per_length, **mods)
    plain = truth if dtype == torch.float64 else _plain(q, k_cache, v_cache, table, seqlens, pattern, dtype)
    _assert_close(got, truth, plain, dtype)


def _plain(q, k_cache, v_cache, table, seqlens, pattern, dtype):
    """The reference's own error in `dtype` (the tolerance's yardstick)."""
    outs, lses = [], []
    for b, length in enumerate(seqlens.tolist()):
        k, v = _gathered(k_cache, table, b, length), _gathered(v_cache, table, b, length)
        mask = pattern
        if selects(mask):
            mask = sa.select_layout(mask, q[b : b + 1], k, block_size=(q.shape[2], PAGE))
        out, lse = attention_reference(q[b : b + 1], k, v, mask)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


PATTERNS = {
    "window": sa.sliding_window(10, 0),
    "causal": sa.causal(),
    "window|globals": sa.sliding_window(5, 0) | sa.global_tokens(3),
    "chunked&causal": sa.chunked(16) & sa.causal(),
    "dilated": sa.dilated(6, 0, dilation=3),
    "topk": sa.topk_blocks(3),
    "topk&causal|window": (sa.topk_blocks(2) & sa.causal()) | sa.sliding_window(4, 0),
    "per_head": sa.per_head([sa.sliding_window(3, 0), sa.causal(), sa.global_tokens(2), sa.chunked(7)]),
    "block_sparse": sa.block_sparse(
        torch.rand(3, 12, generator=torch.Generator().manual_seed(5)) > 0.5, (1, 8)
    ),
}


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_torch_engine_matches_gathered_reference(name, q_len):
    pattern = PATTERNS[name]
    if name == "block_sparse" and q_len != 1:
        pattern = sa.block_sparse(torch.ones(3, 12, dtype=torch.bool), (1, 8))
    _check(pattern, q_len=q_len)


def test_torch_engine_merges_several_splits(monkeypatch):
    from sparse_attn.paged import torch_engine

    monkeypatch.setattr(torch_engine, "default_splits", lambda batch, heads, pages: min(pages, 3))
    _check(sa.causal() | sa.global_tokens(2), q_len=2)


def test_bench_decode_quick(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    argv = ["--quick", "--lengths", "1024,8192", "--dim", "32", "--repeats", "1", "--out", str(tmp_path)]
    assert decode.main(argv) == 0
    import json

    result = json.loads((tmp_path / "decode-cpu-quick.json").read_text())
    assert all(row["window_error"] < 1e-4 for row in result["rows"])  # checked against float64
    assert (
        result["rows"][-1]["read_fraction"]["window"] < 1.0 and (tmp_path / "decode-cpu-quick.png").exists()
    )


def test_documents_host_path():
    _check(sa.documents(IDS) & sa.causal(), q_len=2, per_length=lambda n: sa.documents(IDS[:n]) & sa.causal())


def test_score_modifiers():
    capacity = MAX_PAGES * PAGE
    g = torch.Generator().manual_seed(7)
    mods = {
        "softcap": 2.0,
        "alibi_slopes": torch.rand(2, 4, generator=g, dtype=torch.float64),
        "rel_bias": torch.randn(4, 2 + capacity - 1, generator=g, dtype=torch.float64),
    }
    _check(sa.sliding_window(20, 0) | sa.global_tokens(2), q_len=2, **mods)


@pytest.mark.parametrize(
    "name,dtype",
    [("window", torch.float32), ("topk&causal|window", torch.float16), ("per_head", torch.bfloat16)],
)
def test_triton_kernel_through_interpreter(name, dtype):
    _check(PATTERNS[name], q_len=2, backend="triton", dtype=dtype)


def test_triton_softcap_and_mqa():
    _check(sa.sliding_window(30, 0), q_len=1, heads=2, backend="triton", dtype=torch.float32, softcap=3.0)


def test_unneeded_pages_are_never_read():
    """Every page outside the window holds NaN: the output stays finite and exact."""
    k_cache, v_cache, table, seqlens = _cache()
    window = sa.sliding_window(12, 0)
    keep = torch.zeros(NUM_PAGES, dtype=torch.bool)
    for b, length in enumerate(seqlens.tolist()):
        keep[table[b, (length - 1 - 12) // PAGE : (length - 1) // PAGE + 1].long()] = True
    poisoned_k, poisoned_v = k_cache.clone(), v_cache.clone()
    poisoned_k[~keep], poisoned_v[~keep] = float("nan"), float("nan")
    q = torch.randn(2, 4, 1, 16, dtype=torch.float64)
    for backend in ("torch", "triton"):
        dtype = torch.float64 if backend == "torch" else torch.float32
        got = sa.sparse_attention_paged(
            q.to(dtype), poisoned_k.to(dtype), poisoned_v.to(dtype), table, seqlens, window, backend=backend
        )
        truth, _ = _oracle(q, k_cache, v_cache, table, seqlens, window)
        assert not got.isnan().any()
        assert max_err(got, truth) < 1e-5


def test_plan_reads_a_fixed_number_of_pages_for_a_window():
    """A window's page list has a size fixed by window and page size, whatever the cache length."""
    from sparse_attn.paged.plan import plan

    q = torch.randn(1, 2, 1, 16)
    for length in (100, 5000):
        step = plan(sa.sliding_window(64, 0), q, torch.tensor([length]), 16, 1024, 2, None)
        listed = int((step.pages >= 0).sum())
        assert listed == len(range((length - 65) // 16, (length - 1) // 16 + 1))


def test_paged_kv_cache_topk_uses_page_summaries():
    g = torch.Generator().manual_seed(11)
    cache = sa.PagedKVCache(2, 100, 2, 16, page_size=PAGE, dtype=torch.float64)
    k = torch.randn(2, 2, 90, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 90, 16, generator=g, dtype=torch.float64)
    with torch.inference_mode():
        cache.append(k[:, :, :50], v[:, :, :50])
        cache.append(k[:, :, 50:], v[:, :, 50:])
        q = torch.randn(2, 4, 1, 16, generator=g, dtype=torch.float64)
        pattern = sa.topk_blocks(3) | sa.sliding_window(8, 0)
        selected = sa.select_layout(pattern, q, k, block_size=(1, PAGE))
        kept = selected.to_block_mask()[..., 0, :].amax(1) > 0  # [B, pages]: the pages the step needs
        # The page sums alone decide the selection: the keys of every other page are never looked at.
        for b in range(2):
            unused = cache.block_table[b, : kept.shape[1]][~kept[b]].long()
            cache.k_cache[unused], cache.v_cache[unused] = float("nan"), float("nan")
        got = cache.attention(q, pattern, return_lse=True)
    truth = attention_reference(q, k, v, selected)
    _assert_close(got, truth, truth, torch.float64)
    assert torch.equal(cache.cache_seqlens, torch.tensor([90, 90], dtype=torch.int32))


def test_offloaded_pages_merge_exactly():
    k_cache, v_cache, table, seqlens = _cache()
    q = torch.randn(2, 4, 2, 16, dtype=torch.float64)
    on_host = torch.zeros(2, MAX_PAGES, dtype=torch.bool)
    on_host[:, :5] = True
    host_k = torch.full((10, PAGE, 2, 16), float("nan"), dtype=torch.float64)
    host_v, dev_k, dev_v, split_table = host_k.clone(), k_cache.clone(), v_cache.clone(), table.clone()
    for b in range(2):
        for p in range(5):
            host_k[b * 5 + p], host_v[b * 5 + p] = k_cache[table[b, p]], v_cache[table[b, p]]
            dev_k[table[b, p]], dev_v[table[b, p]] = float("nan"), float("nan")  # cold pages left the device
            split_table[b, p] = b * 5 + p
    for pattern in (
        sa.causal(),
        sa.sliding_window(50, 0) | sa.global_tokens(4),
        sa.topk_blocks(2) & sa.causal(),
    ):
        got = sa.sparse_attention_offloaded(
            q, (dev_k, dev_v), (host_k, host_v), split_table, on_host, seqlens, pattern, return_lse=True
        )
        _assert_close(got, _oracle(q, k_cache, v_cache, table, seqlens, pattern), got, torch.float64)


def test_bad_input_raises():
    k_cache, v_cache, table, seqlens = _cache()
    q = torch.randn(2, 4, 1, 16, dtype=torch.float64)
    window = sa.sliding_window(8, 0)
    bad_table = table.clone()
    bad_table[1, 3] = NUM_PAGES  # a used page outside the cache
    with pytest.raises(IndexError, match=r"block_table\[1, 3\]"):
        sa.sparse_attention_paged(q, k_cache, v_cache, bad_table, seqlens, window)
    unused = table.clone()
    unused[0, 11] = -5  # past sequence 0's length: never used, no error
    sa.sparse_attention_paged(q, k_cache, v_cache, unused, seqlens, window)
    with pytest.raises(ValueError, match="cache_seqlens"):
        sa.sparse_attention_paged(
            q, k_cache, v_cache, table, torch.tensor([37, 97], dtype=torch.int32), window
        )
    with pytest.raises(TypeError, match="dtype"):
        sa.sparse_attention_paged(q.float(), k_cache, v_cache, table, seqlens, window)
    with pytest.raises(TypeError, match="block_table"):
        sa.sparse_attention_paged(q, k_cache, v_cache, table.float(), seqlens, window)
    with pytest.raises(ValueError, match="multiple"):
        sa.sparse_attention_paged(q[:, :3], k_cache, v_cache, table, seqlens, window)
    with pytest.raises(ValueError, match="forward only"):
        sa.sparse_attention_paged(q.requires_grad_(), k_cache, v_cache, table, seqlens, window)


def test_out_of_range_pages_are_skipped_under_compile_style_calls():
    """Without the eager check (as under torch.compile), a bad page index is skipped, never read."""
    from sparse_attn.paged.api import physical_pages

    table = torch.tensor([[0, 7, -3, 2]], dtype=torch.int32)
    pages = torch.tensor([[[0, 1, 2, 3, -1]]])
    assert physical_pages(table, pages, 4).tolist() == [[[0, -1, -1, 2, -1]]]


def test_strided_queries():
    k_cache, v_cache, table, seqlens = _cache()
    q = torch.randn(2, 1, 4, 16, dtype=torch.float64).transpose(1, 2)  # [2, 4, 1, 16], not contiguous
    got = sa.sparse_attention_paged(q, k_cache, v_cache, table, seqlens, sa.causal())
    truth, _ = _oracle(q, k_cache, v_cache, table, seqlens, sa.causal())
    assert max_err(got, truth) < 1e-12


def test_transformers_static_cache_decodes_through_the_paged_path(monkeypatch):
    """generate(cache_implementation="static"): each one-query step against the preallocated cache runs
    `sparse_attn.paged` with the model's own pattern (causal: the unwritten tail is never read) and gives
    eager's tokens. (Sliding-window layers of a static cache end at the query once full: ordinary calls.)"""
    pytest.importorskip("transformers")
    # The module pytest itself imported (tests/ is on sys.path): importing it as `tests.test_transformers`
    # would run it twice and re-register its spy attention function over the one its own tests read.
    from test_transformers import NAME, _batch, _greedy, _model

    from sparse_attn.integrations import transformers as sa_hf

    calls = []
    original = sa_hf._paged_static_decode

    def spy(info, *args):
        calls.append(repr(info.own_pattern()))
        return original(info, *args)

    monkeypatch.setattr(sa_hf, "_paged_static_decode", spy)
    model = _model("llama")
    ids, mask = _batch()
    want = _greedy(model, "eager", ids, mask, 5)
    assert torch.equal(_greedy(model, NAME, ids, mask, 5, cache_implementation="static"), want)
    assert len(calls) >= 4 and set(calls) == {"causal()"}
