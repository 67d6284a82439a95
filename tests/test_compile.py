"""torch.compile(fullgraph=True) with sparse-attn: no graph break; forward and backward equal eager."""

import pytest
import torch
from torch import nn

from sparse_attn import (
    SparseAttention,
    SparseMultiheadAttention,
    causal,
    global_tokens,
    sliding_window,
    sparse_attention,
)


class TinyBlock(nn.Module):
    """qkv projection -> SparseAttention (GQA: 4 query heads, 2 key/value heads) -> output projection."""

    def __init__(self, pattern):
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.kv = nn.Linear(32, 32)
        self.attn = SparseAttention(pattern)
        self.out = nn.Linear(32, 32)

    def forward(self, x, key_mask):
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, 4, 8).transpose(1, 2)
        k, v = self.kv(x).view(batch, seq, 2, 2, 8).permute(2, 0, 3, 1, 4)
        return self.out(self.attn(q, k, v, key_mask).transpose(1, 2).reshape(batch, seq, 32))


def _grads_and_out(model, fn, x, *args):
    model.zero_grad()
    out = fn(x, *args)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_matches_eager(model, eager, compiled, x, *args):
    out, grads = _grads_and_out(model, eager, x, *args)
    c_out, c_grads = _grads_and_out(model, compiled, x, *args)
    torch.testing.assert_close(c_out, out, rtol=1e-5, atol=1e-5)
    for c, g in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(c, g, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph_sparse_attention_forward_backward():
    torch.manual_seed(0)
    model = TinyBlock((causal() & sliding_window(9)) | global_tokens(2))
    x = torch.randn(2, 70, 32)
    key_mask = torch.ones(2, 70, dtype=torch.bool)
    key_mask[1, :5] = False
    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # inductor: the real thing
    _assert_matches_eager(model, model, compiled, x, key_mask)


def test_compile_fullgraph_sparse_multihead_attention():
    torch.manual_seed(0)
    mha = SparseMultiheadAttention(32, 4, batch_first=True, pattern=sliding_window(6))
    x = torch.randn(2, 50, 32)
    kpm = torch.zeros(2, 50, dtype=torch.bool)
    kpm[0, 45:] = True

    def step(x, kpm):
        return mha(x, x, x, key_padding_mask=kpm, need_weights=False, is_causal=True)[0]

    # aot_eager traces exactly as inductor does (dynamo + AOT autograd, fake impls) without C++ codegen time.
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    _assert_matches_eager(mha, step, compiled, x, kpm)
    # A new length recompiles with its own layout, still without a graph break.
    _assert_matches_eager(mha, step, compiled, x[:, :37], kpm[:, :37])


def test_compile_fullgraph_sparse_attention_function_with_a_pattern():
    pattern = causal() & sliding_window(8)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 50, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 50, 16, generator=g, requires_grad=True) for _ in range(2))
    key_mask = torch.ones(2, 50, dtype=torch.bool)
    key_mask[0, :3] = False

    def attend(q, k, v, key_mask):
        out, lse = sparse_attention(q, k, v, pattern, key_mask=key_mask, return_lse=True)
        return out.square().sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    compiled = torch.compile(attend, fullgraph=True, dynamic=False, backend="aot_eager")
    loss, ref = compiled(q, k, v, key_mask), attend(q, k, v, key_mask)
    torch.testing.assert_close(loss, ref)
    grads = torch.autograd.grad(loss, (q, k, v))
    for g_c, g_e in zip(grads, torch.autograd.grad(ref, (q, k, v)), strict=True):
        torch.testing.assert_close(g_c, g_e)


def test_compile_with_an_attn_mask_breaks_the_graph_cleanly():
    """A mask's values decide the layout: fullgraph names the problem; otherwise the masked call runs eagerly."""
    torch.manual_seed(0)
    mha = SparseMultiheadAttention(32, 4, batch_first=True, pattern=sliding_window(6))
    x = torch.randn(2, 30, 32)
    blocked = torch.rand(30, 30, generator=torch.Generator().manual_seed(1)) < 0.2

    def step(x, blocked):
        return mha(x, x, x, attn_mask=blocked, need_weights=False)[0]

    full = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager")
    with pytest.raises(Exception, match="attn_mask"):
        full(x, blocked)
    torch._dynamo.reset()
    compiled = torch.compile(step, dynamic=False, backend="aot_eager")
    _assert_matches_eager(mha, step, compiled, x, blocked)
