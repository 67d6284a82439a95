"""`merge_attention` over disjoint key shards equals attention over all keys (out, lse, gradients)."""

import pytest
import torch

from sparse_attn import causal, merge_attention, sliding_window, sparse_attention
from sparse_attn.reference import attention_reference


def _inputs(seed=0, batch=2, heads=2, q_len=37, kv_len=37, dim=16):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    return make(batch, heads, q_len, dim), make(batch, heads, kv_len, dim), make(batch, heads, kv_len, dim)


def _sharded(q, k, v, mask, key_mask, bounds):
    """Per-shard reference attention, merged."""
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        out, lse = attention_reference(q, k[:, :, a:b], v[:, :, a:b], mask[:, a:b], key_mask=key_mask[:, a:b])
        outs.append(out)
        lses.append(lse)
    return merge_attention(outs, lses)


@pytest.mark.parametrize(
    "pattern, bounds",
    [(causal(), [0, 20, 37]), (sliding_window(6, 2), [0, 5, 23, 37]), (causal(), [0, 1, 30, 37])],
)
def test_merge_equals_full_attention(pattern, bounds):
    q, k, v = _inputs()
    key_mask = torch.ones(2, 37, dtype=torch.bool)
    key_mask[1, :9] = False  # left padding: early queries of batch 1 see nothing, some shards are empty
    mask = pattern.mask(37, 37)
    out, lse = _sharded(q, k, v, mask, key_mask, bounds)
    ref_out, ref_lse = sparse_attention(q, k, v, pattern, key_mask=key_mask, return_lse=True)
    assert torch.isneginf(lse).any(), "the case must include queries with no visible key"
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)

    # Gradients through the merge (weights depend on every shard's lse) match the unsharded ones.
    finite = torch.isfinite(ref_lse)
    probe_out, probe_lse = torch.randn_like(out), torch.randn_like(lse)
    loss = lambda o, s: (o * probe_out).sum() + (torch.where(finite, s, 0) * probe_lse).sum()
    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        assert not g.isnan().any()
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_merge_all_empty_shards_gives_zero_and_neg_inf():
    out = torch.randn(1, 1, 3, 4, requires_grad=True)
    lse = torch.full((1, 1, 3), float("-inf"), requires_grad=True)
    merged, merged_lse = merge_attention([out, out], [lse, lse])
    assert torch.equal(merged, torch.zeros_like(merged)) and torch.isneginf(merged_lse).all()
    merged.sum().backward()
    assert not out.grad.isnan().any() and not lse.grad.isnan().any()


def test_merge_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="as many outs as lses"):
        merge_attention([torch.zeros(1, 1, 2, 4)], [])
    with pytest.raises(ValueError, match=r"\[\.\.\., S, D\]"):
        merge_attention([torch.zeros(1, 1, 2, 4)], [torch.zeros(1, 1, 3)])


def test_merge_ignores_nan_outputs_of_empty_shards():
    """Some kernels write NaN (not 0) for a query that sees no key; a weight-0 shard must not spread it."""
    q, k, v = _inputs()
    key_mask = torch.ones(2, 37, dtype=torch.bool)
    mask = causal().mask(37, 37)
    outs, lses = [], []
    for a, b in ((0, 20), (20, 37)):
        out, lse = attention_reference(q, k[:, :, a:b], v[:, :, a:b], mask[:, a:b], key_mask=key_mask[:, a:b])
        outs.append(out.masked_fill(torch.isneginf(lse)[..., None], float("nan")))
        lses.append(lse)
    assert outs[1].isnan().any()
    merged, merged_lse = merge_attention(outs, lses)
    ref_out, ref_lse = sparse_attention(q, k, v, causal(), return_lse=True)
    torch.testing.assert_close(merged, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(merged_lse, ref_lse, rtol=1e-10, atol=1e-10)
    for g in torch.autograd.grad((merged.sum() + merged_lse.sum()), (q, k, v)):
        assert not g.isnan().any()


def test_merge_half_precision_outputs_with_float32_lse():
    q, k, v = (t.detach().float() for t in _inputs())
    pattern = sliding_window(6, 2)
    mask = pattern.mask(37, 37)
    key_mask = torch.ones(2, 37, dtype=torch.bool)
    outs, lses = [], []
    for a, b in ((0, 18), (18, 37)):
        out, lse = attention_reference(q, k[:, :, a:b], v[:, :, a:b], mask[:, a:b], key_mask=key_mask[:, a:b])
        outs.append(out.to(torch.bfloat16))
        lses.append(lse.float())
    merged, merged_lse = merge_attention(outs, lses)
    ref_out, ref_lse = sparse_attention(q, k, v, pattern, return_lse=True)
    assert merged.dtype == torch.bfloat16 and merged_lse.dtype == torch.float32
    torch.testing.assert_close(merged.float(), ref_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(merged_lse, ref_lse, rtol=1e-5, atol=1e-5)
