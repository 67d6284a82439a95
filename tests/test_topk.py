"""topk_blocks: the selection equals the contract's score recomputed densely here, and attention over the
selected layout equals the float64 reference restricted to it, on both backends (Triton through the
interpreter), compiled or not."""

import math

import pytest
import torch

import sparse_attn as sa
from sparse_attn.reference import attention_reference


def qkv(b, hq, hkv, sq, skv, d=16, seed=0, integer=False):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d)]
    if integer:
        # Small integers: block means and scores are exact in float32, so equal scores are exact ties.
        return [torch.randint(-1, 2, s, generator=g).float() for s in shapes]
    return [torch.randn(s, generator=g) for s in shapes]


def dense_selection(q, k, kk, block, key_mask=None, among=None):
    """The contract, written out: bool ``[B, Hkv, nqb, nkb]`` of the kept blocks.

    For each batch element b, KV head g and query block qb: mean_q over the block's rows and the group's
    query heads, mean_k over the key block's real keys, s = mean_q . mean_k in float32; the top kk
    candidates (a real key, and kept by `among` ``[nqb, nkb]``), ties to the lower kb."""
    batch, hq, sq, dim = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    group = hq // hkv
    nqb, nkb = math.ceil(sq / block), math.ceil(skv / block)
    kept = torch.zeros(batch, hkv, nqb, nkb, dtype=torch.bool)
    for b in range(batch):
        for g in range(hkv):
            for qb in range(nqb):
                rows = q[b, g * group : (g + 1) * group, qb * block : (qb + 1) * block]
                mean_q = rows.float().reshape(-1, dim).mean(0)
                scored = []
                for kb in range(nkb):
                    keys = torch.arange(kb * block, min((kb + 1) * block, skv))
                    if key_mask is not None:
                        keys = keys[key_mask[b, keys]]
                    if len(keys) == 0 or (among is not None and not among[qb, kb]):
                        continue
                    mean_k = k[b, g, keys].float().mean(0)
                    scored.append((-float(mean_q @ mean_k), kb))
                for _, kb in sorted(scored)[:kk]:
                    kept[b, g, qb, kb] = True
    return kept


def token_grid(blocks, sq, skv, block):
    """``[..., nqb, nkb]`` blocks -> ``[..., sq, skv]`` tokens."""
    return blocks.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :sq, :skv]


def per_query_head(kept, hq):
    return kept.repeat_interleave(hq // kept.shape[1], 1)


def check_layout(layout, expected_tokens, expected_classes):
    """Token masks and block classes ``[B, Hq, ...]`` (a shared-head layout is broadcast)."""
    hq = expected_tokens.shape[1]
    assert layout.batch == expected_tokens.shape[0] and layout.num_heads in (1, hq)
    assert torch.equal(layout.to_dense().expand_as(expected_tokens), expected_tokens)
    assert torch.equal(layout.to_block_mask().expand_as(expected_classes), expected_classes)


GROUPS = [(2, 2), (4, 2), (8, 2), (3, 1)]  # group sizes 1, 2, 4 and MQA


@pytest.mark.parametrize("hq,hkv", GROUPS)
def test_selection_with_causal_and_key_mask_equals_dense_recomputation(hq, hkv):
    q, k, _ = qkv(2, hq, hkv, 200, 200, seed=hq + hkv)
    key_mask = torch.rand(2, 200, generator=torch.Generator().manual_seed(1)) > 0.3
    key_mask[1, :70] = False  # blocks 0 and 1 of element 1 hold no real key: no candidates
    k = k.masked_fill(~key_mask[:, None, :, None], float("nan"))  # masked keys may hold anything
    static = sa.causal()
    layout = sa.select_layout(sa.topk_blocks(3) & static, q, k, block_size=32, key_mask=key_mask)
    causal_blocks = static.layout(200, 200, block_size=32).to_block_mask()[0]
    kept = per_query_head(dense_selection(q, k, 3, 32, key_mask, causal_blocks != 0), hq)
    tokens = token_grid(kept, 200, 200, 32) & static.mask(200, 200)
    check_layout(layout, tokens, torch.where(kept, causal_blocks, 0).to(torch.int8))
    if hkv == 1:
        assert layout.num_heads == 1  # MQA: one layout head, shared by every query head


@pytest.mark.parametrize(
    "name,static,union",
    [
        ("alone", None, False),
        ("or_window_globals", sa.sliding_window(40) | sa.global_tokens(3), True),
        ("and_window", sa.sliding_window(70, 0), False),
    ],
)
def test_selection_ties_go_to_the_lower_key_block(name, static, union):
    q, k, _ = qkv(1, 4, 2, 256, 256, integer=True)
    # Key blocks 4-7 repeat blocks 0-3: every score appears twice, exactly.
    k[:, :, 128:] = k[:, :, :128]
    if static is None:
        pattern = sa.topk_blocks(3)
    else:
        pattern = sa.topk_blocks(3) | static if union else sa.topk_blocks(3) & static
    layout = sa.select_layout(pattern, q, k, block_size=32)
    among = (
        None if static is None or union else static.layout(256, 256, block_size=32).to_block_mask()[0] != 0
    )
    kept = per_query_head(dense_selection(q, k, 3, 32, among=among), 4)
    assert _has_ties_at_the_cut(q, k, 32), "equal scores should meet at some row's 3rd/4th place"
    if static is None:
        tokens, classes = token_grid(kept, 256, 256, 32), kept.to(torch.int8) * 2
    else:
        static_tokens = static.mask(256, 256)
        static_classes = static.layout(256, 256, block_size=32).to_block_mask()[0]
        if union:
            tokens = token_grid(kept, 256, 256, 32) | static_tokens
            classes = torch.where(kept, 2, static_classes).to(torch.int8)
        else:
            tokens = token_grid(kept, 256, 256, 32) & static_tokens
            classes = torch.where(kept, static_classes, 0).to(torch.int8)
    check_layout(layout, tokens, classes)


def _has_ties_at_the_cut(q, k, block):
    """Whether some row has equal scores across its 3rd/4th place (so tie-breaking decides)."""
    mq = q.view(1, 2, 2, -1, block, q.shape[-1]).mean((2, 4))
    mk = k.view(1, 2, -1, block, k.shape[-1]).mean(3)
    s = (mq @ mk.transpose(-1, -2)).sort(-1, descending=True).values
    return bool((s[..., 2] == s[..., 3]).any())


def test_decode_and_unequal_lengths():
    q, k, _ = qkv(2, 4, 2, 1, 300, seed=5)
    layout = sa.select_layout(sa.topk_blocks(2) & sa.causal(), q, k, block_size=64)
    kept = per_query_head(dense_selection(q, k, 2, 64), 4)
    check_layout(layout, token_grid(kept, 1, 300, 64), kept.to(torch.int8) * 2)
    # Sq < Skv, bottom-right aligned: the causal diagonal shifts by Skv - Sq.
    q, k, _ = qkv(1, 2, 1, 100, 230, seed=6)
    static = sa.causal()
    layout = sa.select_layout(sa.topk_blocks(2) & static, q, k, block_size=32)
    causal_blocks = static.layout(100, 230, block_size=32).to_block_mask()[0]
    kept = per_query_head(dense_selection(q, k, 2, 32, among=causal_blocks != 0), 2)
    tokens = token_grid(kept, 100, 230, 32) & static.mask(100, 230)
    check_layout(layout, tokens, torch.where(kept, causal_blocks, 0).to(torch.int8))


def test_selection_composes_with_distributed_and_per_head_and_documents():
    q, k, _ = qkv(2, 2, 1, 160, 160, seed=7)
    # (topk | window) & causal selects among causal blocks: it equals (topk & causal) | (window & causal).
    window, causal = sa.sliding_window(10), sa.causal()
    layout = sa.select_layout((sa.topk_blocks(2) | window) & causal, q, k, block_size=32)
    causal_blocks = causal.layout(160, 160, block_size=32).to_block_mask()[0]
    kept = per_query_head(dense_selection(q, k, 2, 32, among=causal_blocks != 0), 2)
    tokens = (token_grid(kept, 160, 160, 32) | window.mask(160, 160)) & causal.mask(160, 160)
    assert torch.equal(layout.to_dense().expand_as(tokens), tokens)
    # per_head: head 0 selects among causal blocks, head 1 is a plain window.
    pattern = sa.per_head([sa.topk_blocks(1) & causal, window])
    layout = sa.select_layout(pattern, q, k, block_size=32)
    kept = dense_selection(q, k, 1, 32, among=causal_blocks != 0)[:, 0]
    expected = torch.stack(
        [token_grid(kept, 160, 160, 32) & causal.mask(160, 160), window.mask(160, 160).expand(2, -1, -1)], 1
    )
    assert layout.num_heads == 2 and torch.equal(layout.to_dense(), expected)
    # documents(ids) per batch element: selection among each element's own document blocks.
    ids = torch.tensor([[0] * 70 + [1] * 90, [0] * 160])
    docs = sa.documents(ids) & causal
    layout = sa.select_layout(sa.topk_blocks(2) & docs, q, k, block_size=32)
    doc_blocks = docs.layout(160, 160, block_size=32).to_block_mask()[:, 0]
    kept = torch.stack(
        [dense_selection(q[b : b + 1], k[b : b + 1], 2, 32, among=doc_blocks[b] != 0)[0] for b in range(2)]
    )
    tokens = token_grid(per_query_head(kept, 2), 160, 160, 32) & docs.mask(160, 160)[:, None]
    assert torch.equal(layout.to_dense().expand_as(tokens), tokens)


def test_selection_never_builds_an_s_by_s_tensor_and_has_fixed_sizes():
    q, k, _ = qkv(1, 4, 2, 4096, 4096, d=32)
    pattern = sa.topk_blocks(4) & sa.causal()
    first = sa.select_layout(pattern, q, k, block_size=64)
    other = sa.select_layout(pattern, *qkv(1, 4, 2, 4096, 4096, d=32, seed=9)[:2], block_size=64)
    # Array sizes depend on the lengths alone (no host synchronisation to size them).
    for name in ("row_full_idx", "row_part_idx", "col_full_idx", "col_part_idx", "row_full_ptr"):
        assert getattr(first, name).shape == getattr(other, name).shape
    assert first.num_full + first.num_partial == 4 * 4 * 64 - 4 * 6  # 4 per row, fewer in the first rows


def test_errors_are_clear():
    q, k, _ = qkv(1, 2, 1, 64, 64)
    with pytest.raises(TypeError, match="select_layout"):
        (sa.topk_blocks(2) & sa.causal()).layout(64)
    with pytest.raises(ValueError, match="two content-selected"):
        sa.select_layout(sa.topk_blocks(2) & sa.topk_blocks(3), q, k)
    with pytest.raises(ValueError, match="k must be >= 1"):
        sa.topk_blocks(0)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        sa.select_layout(sa.topk_blocks(2), q, k.expand(1, 2, 64, 16)[:, :, :, :].repeat(1, 2, 1, 1)[:, :3])


# -- attention over the selection ----------------------------------------------------------------------
def reference_on_layout(q, k, v, layout, key_mask=None):
    """The float64 reference restricted to a per-batch layout, one batch element at a time."""
    dense = layout.to_dense()
    outs, lses = [], []
    for b in range(q.shape[0]):
        km = None if key_mask is None else key_mask[b : b + 1]
        out, lse = attention_reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], dense[b], key_mask=km)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def grads(fn, q, k, v, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ((out.double() * w).sum() + torch.where(lse.isinf(), 0, lse).double().sum()).backward()
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize(
    "backend,hq,hkv,length,kk",
    # Triton runs through the interpreter: small shapes (KV groups of 2, two batch elements: a layout per
    # batch element and query head).
    [("torch", 4, 2, 256, 2), ("torch", 2, 1, 256, 2), ("triton", 4, 2, 128, 1)],
)
def test_attention_equals_float64_reference_on_the_selected_layout(backend, hq, hkv, length, kk):
    if backend == "triton":
        pytest.importorskip("triton")
    q, k, v = qkv(2, hq, hkv, length, length, seed=11)
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[1, :40] = False
    # Masked keys may hold anything: NaN changes nothing, selection included.
    k = k.masked_fill(~key_mask[:, None, :, None], float("nan"))
    v = v.masked_fill(~key_mask[:, None, :, None], float("nan"))
    pattern = sa.topk_blocks(kk) & sa.causal()
    layout = sa.select_layout(pattern, q, k, block_size=64, key_mask=key_mask)
    assert 0 < layout.density() < sa.causal().layout(length, block_size=64).density()  # some blocks dropped

    def ours(q_, k_, v_):
        return sa.sparse_attention(q_, k_, v_, pattern, key_mask=key_mask, backend=backend, return_lse=True)

    got = grads(ours, q, k, v, torch.float32)
    # The dense reference multiplies probabilities by V: give it zeros where the masked keys hold NaN.
    clean = [t.nan_to_num(0.0) for t in (q, k, v)]
    truth = grads(lambda *t: reference_on_layout(*t, layout, key_mask), *clean, torch.float64)
    for name, g, t in zip(("out", "lse", "dq", "dk", "dv"), got, truth, strict=True):
        assert not g.isnan().any(), name
        torch.testing.assert_close(g.double(), t, rtol=0, atol=2e-5, msg=name)
    if backend == "torch":  # the kernels' determinism is tested with static layouts (interpreter time)
        again = grads(ours, q, k, v, torch.float32)
        for g, a in zip(got, again, strict=True):
            assert torch.equal(g, a)  # deterministic, selection included


def test_a_selected_layout_is_reusable_and_decode_works():
    q, k, v = qkv(1, 4, 2, 300, 300, seed=12)
    pattern = sa.topk_blocks(3) | sa.sliding_window(16)
    layout = sa.select_layout(pattern, q, k, block_size=32)
    out = sa.sparse_attention(q, k, v, layout)
    ref = reference_on_layout(*(t.double() for t in (q, k, v)), layout)[0]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    # Decode: one query against a long cache, through the pattern in one call.
    q1 = q[:, :, -1:]
    out = sa.sparse_attention(q1, k, v, sa.topk_blocks(2) & sa.causal())
    layout = sa.select_layout(sa.topk_blocks(2) & sa.causal(), q1, k)
    ref = reference_on_layout(*(t.double() for t in (q1, k, v)), layout)[0]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


def test_compiled_fullgraph_equals_eager_and_new_data_does_not_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    pattern = sa.topk_blocks(2) & sa.causal()

    def step(q, k, v, key_mask):
        return sa.sparse_attention(q, k, v, pattern, key_mask=key_mask)

    # aot_eager traces as inductor does (dynamo + AOT autograd, fake impls) without C++ codegen time.
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=counter)
    for seed in (0, 1):  # the second call brings new data: same graph, its own selection
        q, k, v = (t.requires_grad_() for t in qkv(2, 4, 2, 200, 200, seed=seed))
        key_mask = torch.rand(2, 200, generator=torch.Generator().manual_seed(seed)) > 0.2
        results = []
        for fn in (compiled, step):
            out = fn(q, k, v, key_mask)
            out.square().sum().backward()
            results.append([out.detach()] + [t.grad for t in (q, k, v)])
            q.grad = k.grad = v.grad = None
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


# -- drop-in ---------------------------------------------------------------------------------------------
def test_modules_take_selecting_patterns():
    q, k, v = qkv(2, 4, 2, 150, 150, seed=13)
    pattern = sa.topk_blocks(1) & sa.causal()
    module = sa.SparseAttention(pattern)
    torch.testing.assert_close(module(q, k, v), sa.sparse_attention(q, k, v, pattern), rtol=0, atol=0)
    with pytest.raises(TypeError, match="selects its blocks"):
        module.prepare(150, heads=4)
    # nn.MultiheadAttention drop-in: attention and the returned weights follow the selected blocks.
    mha = sa.SparseMultiheadAttention(32, 4, batch_first=True, pattern=sa.topk_blocks(1))
    x = torch.randn(2, 150, 32, generator=torch.Generator().manual_seed(0))
    out, weights = mha(x, x, x, is_causal=True, attn_mask=None)
    qh, kh, _ = mha._project(x, x, x)
    layout = sa.select_layout(sa.topk_blocks(1) & sa.causal(), qh, kh)
    assert torch.equal(weights.sum(-1) > 0, torch.ones(2, 150, dtype=torch.bool))
    visible = layout.to_dense().expand(2, 4, 150, 150)
    assert torch.equal(weights.detach() > 0, visible.float().mean(1) > 0)
    dense = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    dense.load_state_dict(mha.state_dict())
    expected, _ = dense(x, x, x, attn_mask=~visible.reshape(8, 150, 150), need_weights=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_transformers_set_pattern_keeps_the_models_causal_mask_and_window():
    transformers = pytest.importorskip("transformers")
    from sparse_attn.integrations import transformers as sa_hf

    name = sa_hf.register()
    torch.manual_seed(0)
    config = transformers.Qwen2Config(  # a full-attention layer and a sliding-window (40) layer, GQA
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attention_dropout=0.0, use_sliding_window=True,
        sliding_window=40, max_window_layers=1, attn_implementation="sdpa",
    )  # fmt: skip
    model = transformers.Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 97, (2, 200), generator=torch.Generator().manual_seed(1))

    def logits(impl):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            return model(input_ids=ids).logits

    reference = logits("sdpa")
    # Selecting more blocks than there are (4 of 64 tokens) keeps exactly the model's own masks.
    sa_hf.set_pattern(model, sa.topk_blocks(8), keep_model_pattern=True)
    torch.testing.assert_close(logits(name), reference, rtol=1e-5, atol=1e-5)
    # One block per query block: a different model, each layer's mask still applied inside the blocks.
    sa_hf.set_pattern(model, sa.topk_blocks(1), keep_model_pattern=True)
    sparse = logits(name)
    assert not torch.allclose(sparse, reference, atol=1e-3)
    model.set_attn_implementation(name)
    with torch.no_grad():  # KV-cache decoding: one query against the cache, selected each step
        generated = model.generate(ids[:, :150], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 153)
    sa_hf.set_pattern(model, None)


def test_plot_pattern_draws_a_selected_layout_per_head_and_batch_element():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from sparse_attn import viz

    q, k, _ = qkv(2, 4, 2, 160, 160, seed=14)
    layout = sa.select_layout(sa.topk_blocks(2) & sa.causal(), q, k, block_size=32)
    fig = viz.plot_pattern(layout, heads=[0, 2], batch=1)
    assert len([ax for ax in fig.axes if ax.images]) == 2
    for b in (0, 1):
        for h in (0, 3):
            image = viz.render_layout(layout.batch_element(b), h)
            assert torch.equal(torch.from_numpy(image.visible) > 0.5, layout.to_dense()[b, h])
    with pytest.raises(ValueError, match="batch element"):
        viz.plot_pattern(layout, batch=2)
