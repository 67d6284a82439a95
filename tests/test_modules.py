"""SparseAttention, SparseMultiheadAttention and replace_attention against torch.nn, in float64."""

import copy

import pytest
import torch
from torch import nn

from sparse_attn import (
    SparseAttention,
    SparseMultiheadAttention,
    causal,
    global_tokens,
    replace_attention,
    sliding_window,
    sparse_attention,
)
from sparse_attn.patterns.token_mask import TokenMask
from sparse_attn.patterns.window import dense
from sparse_attn.reference import attention_reference

F64 = torch.float64


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _mha(seed=0, **kwargs):
    torch.manual_seed(seed)
    return nn.MultiheadAttention(16, 4, dtype=F64, **kwargs)


def _inputs(batch_first, n=3, q_len=7, kv_len=9, kdim=16, vdim=16):
    q, k, v = _rand(n, q_len, 16, seed=1), _rand(n, kv_len, kdim, seed=2), _rand(n, kv_len, vdim, seed=3)
    return (q, k, v) if batch_first else tuple(t.transpose(0, 1) for t in (q, k, v))


def _padding(n=3, kv_len=9):
    kpm = torch.zeros(n, kv_len, dtype=torch.bool)
    kpm[1, :3] = True  # left padding
    kpm[2, 6:] = True  # right padding
    return kpm


def _close(a, b):
    """Equal where nn is defined; nn gives NaN for queries that see no key, where we must stay finite."""
    assert not a.isnan().any()
    defined = ~b.isnan()
    torch.testing.assert_close(a[defined], b[defined], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("dims", [dict(), dict(kdim=12, vdim=10), dict(bias=False)])
def test_from_dense_with_dense_pattern_equals_nn(batch_first, dims):
    mha = _mha(batch_first=batch_first, **dims)
    sparse = SparseMultiheadAttention.from_dense(mha, dense())
    q, k, v = _inputs(batch_first, kdim=dims.get("kdim", 16), vdim=dims.get("vdim", 16))
    kpm = _padding()
    float_kpm = torch.zeros(kpm.shape, dtype=F64).masked_fill(kpm, float("-inf"))
    for kwargs in (
        dict(),
        dict(key_padding_mask=kpm),
        dict(key_padding_mask=float_kpm, average_attn_weights=False),
    ):
        out, weights = mha(q, k, v, **kwargs)
        sparse_out, sparse_weights = sparse(q, k, v, **kwargs)
        _close(sparse_out, out)
        _close(sparse_weights, weights)
    # Gradients of the copied parameters match too.
    grads = torch.autograd.grad(mha(q, k, v, key_padding_mask=kpm)[0].square().sum(), list(mha.parameters()))
    sparse_grads = torch.autograd.grad(
        sparse(q, k, v, key_padding_mask=kpm)[0].square().sum(), list(sparse.parameters())
    )
    for g, s in zip(grads, sparse_grads, strict=True):
        _close(s, g)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attn_mask_is_intersected_with_the_pattern(batch_first):
    mha = _mha(batch_first=batch_first)
    pattern = sliding_window(3, 1) | global_tokens(1)
    sparse = SparseMultiheadAttention.from_dense(mha, pattern)
    q, k, v = _inputs(batch_first, q_len=9)
    kpm = _padding()
    blocked = torch.rand(9, 9, generator=torch.Generator().manual_seed(4)) < 0.3
    blocked[:, 0] = False
    nn_mask = blocked | ~pattern.mask(9, 9)  # nn: True = not allowed
    out, weights = mha(q, k, v, key_padding_mask=kpm, attn_mask=nn_mask)
    sparse_out, sparse_weights = sparse(q, k, v, key_padding_mask=kpm, attn_mask=blocked)
    assert weights.isnan().any(), "the case must include queries that see no key"
    assert torch.equal(sparse_weights[weights.isnan()], torch.zeros_like(sparse_weights[weights.isnan()]))
    _close(sparse_out, out)
    _close(sparse_weights, weights)
    # 3-D masks [N * num_heads, L, S], per batch row and head, as floats of 0 / -inf.
    blocked3 = torch.rand(12, 9, 9, generator=torch.Generator().manual_seed(5)) < 0.3
    blocked3[..., 0] = False
    float3 = torch.zeros(12, 9, 9, dtype=F64).masked_fill(blocked3, float("-inf"))
    out, weights = mha(q, k, v, attn_mask=blocked3 | ~pattern.mask(9, 9), average_attn_weights=False)
    sparse_out, sparse_weights = sparse(q, k, v, attn_mask=float3, average_attn_weights=False)
    _close(sparse_out, out)
    _close(sparse_weights, weights)


def test_is_causal_and_unbatched():
    mha = _mha()
    sparse = SparseMultiheadAttention.from_dense(mha, None)
    x = _rand(8, 16)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(8, dtype=F64)
    out, weights = mha(x, x, x, attn_mask=causal_mask, is_causal=True)
    sparse_out, sparse_weights = sparse(x, x, x, is_causal=True)
    assert sparse_out.shape == (8, 16) and sparse_weights.shape == (8, 8)
    _close(sparse_out, out)
    _close(sparse_weights, weights)


def test_unsupported_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="add_bias_kv"):
        SparseMultiheadAttention(16, 4, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_zero_attn"):
        SparseMultiheadAttention.from_dense(nn.MultiheadAttention(16, 4, add_zero_attn=True), None)
    sparse = SparseMultiheadAttention(16, 4, dropout=0.1, batch_first=True)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="dropout"):
        sparse(x, x, x)
    sparse.eval()
    assert sparse(x, x, x)[0].shape == (2, 5, 16)  # dropout is inactive in eval mode
    bias = torch.randn(5, 5)
    with pytest.raises(ValueError, match="additive biases"):
        sparse(x, x, x, attn_mask=bias)
    with pytest.raises(ValueError, match="attn_mask must be"):
        sparse(x, x, x, attn_mask=torch.zeros(3, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="Pattern"):
        SparseAttention("causal")


def _encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True, dtype=F64)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)


@pytest.mark.parametrize("train", [True, False])
def test_replace_attention_on_transformer_encoder_keeps_outputs(train):
    model, ref = _encoder(), _encoder()
    assert replace_attention(model, dense()) == 2
    assert all(isinstance(layer.self_attn, SparseMultiheadAttention) for layer in model.layers)
    model.train(train)
    ref.train(train)
    x = _rand(2, 11, 16)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 8:] = True
    # no_grad in eval mode is where nn takes its fused fast paths; the swapped layers must still run.
    with torch.no_grad():
        _close(model(x, src_key_padding_mask=kpm)[~kpm], ref(x, src_key_padding_mask=kpm)[~kpm])
        causal_mask = nn.Transformer.generate_square_subsequent_mask(11, dtype=F64)
        _close(model(x, mask=causal_mask, is_causal=True), ref(x, mask=causal_mask, is_causal=True))


def test_replaced_layers_apply_their_pattern_on_nn_fast_paths():
    """With a sparse pattern, eval + no_grad output equals nn run with the pattern as its mask."""
    pattern = sliding_window(2, 0)
    model, ref = _encoder(), _encoder()
    replace_attention(model, pattern)
    model.eval()
    ref.eval()
    x = _rand(2, 11, 16)
    with torch.no_grad():
        _close(model(x), ref(x, mask=~pattern.mask(11, 11)))
        assert not torch.allclose(model(x), ref(x))


def test_causal_attn_mask_takes_the_cached_causal_layout(monkeypatch):
    """nn's square causal mask (as TransformerEncoder passes it) runs as the cached causal layout, not as a
    token mask built from the S x S mask, and still equals nn."""
    pattern = sliding_window(3)
    model, ref = _encoder(), _encoder()
    replace_attention(model, pattern)
    token_masks = []
    monkeypatch.setattr(TokenMask, "__init__", lambda self, mask: token_masks.append(mask))
    x = _rand(2, 11, 16)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(11, dtype=F64)
    for is_causal in (True, False):
        out = model(x, mask=causal_mask, is_causal=is_causal)
        _close(out, ref(x, mask=~(pattern & causal()).mask(11, 11), is_causal=False))
    assert not token_masks
    assert all(layer.self_attn.causal_attention._layouts for layer in model.layers)


def test_replace_attention_shares_parameters_with_an_existing_optimizer():
    """The swapped layers train the very Parameter objects an optimizer built before the swap holds."""
    model = _encoder()
    old = {name: p for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    replace_attention(model, sliding_window(4))
    assert {name: p for name, p in model.named_parameters()}.keys() == old.keys()
    assert all(p is old[name] for name, p in model.named_parameters())
    before = model.layers[0].self_attn.in_proj_weight.detach().clone()
    model(_rand(2, 11, 16)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model.layers[0].self_attn.in_proj_weight, before)


def test_replace_attention_in_decoder_layer_train_step():
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.1, dtype=F64)
    ref = copy.deepcopy(layer)
    assert replace_attention(layer, None, dropout=0.0) == 2
    ref.dropout = ref.dropout1 = ref.dropout2 = ref.dropout3 = nn.Identity()
    layer.dropout = layer.dropout1 = layer.dropout2 = layer.dropout3 = nn.Identity()
    ref.self_attn.dropout = ref.multihead_attn.dropout = 0.0
    tgt, memory = _rand(6, 2, 16, seed=1), _rand(9, 2, 16, seed=2)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)
    out = layer(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
    ref_out = ref(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
    _close(out, ref_out)
    grads = torch.autograd.grad(out.sum(), list(layer.parameters()))
    ref_grads = torch.autograd.grad(ref_out.sum(), list(ref.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        _close(g, r)


def test_sparse_attention_module_caches_layouts_and_matches_function():
    module = SparseAttention(causal() & sliding_window(5), cache_size=2)
    q, k, v = _rand(2, 4, 30, 8, seed=1), _rand(2, 2, 30, 8, seed=2), _rand(2, 2, 30, 8, seed=3)
    key_mask = torch.ones(2, 30, dtype=torch.bool)
    key_mask[0, :4] = False
    out = module(q, k, v, key_mask)
    _close(out, sparse_attention(q, k, v, module.pattern, key_mask=key_mask))
    _close(out, attention_reference(q, k, v, module.pattern, key_mask=key_mask)[0])
    first = module.prepare(30, 30, heads=4)
    assert module.prepare(30, 30, heads=4) is first
    module.prepare(31, 31)
    module.prepare(32, 32)
    assert [key[:2] for key in module._layouts] == [(31, 31), (32, 32)]  # bounded, least recent dropped


@pytest.mark.parametrize("q_len, kv_len", [(9, 7), (7, 9)])
def test_is_causal_is_a_hint_when_attn_mask_is_given(q_len, kv_len):
    """As in nn, a given attn_mask decides; nn's causal masks for L != S are top-left aligned."""
    mha = _mha(batch_first=True)
    sparse = SparseMultiheadAttention.from_dense(mha, None)
    q, k, v = _inputs(True, q_len=q_len, kv_len=kv_len)
    top_left = torch.ones(q_len, kv_len, dtype=torch.bool).triu(1)  # nn: True = not allowed
    for need_weights in (True, False):
        out, weights = mha(q, k, v, attn_mask=top_left, is_causal=True, need_weights=need_weights)
        sparse_out, sparse_weights = sparse(
            q, k, v, attn_mask=top_left, is_causal=True, need_weights=need_weights
        )
        _close(sparse_out, out)
        if need_weights:
            _close(sparse_weights, weights)


def test_unbatched_masks_match_nn():
    mha = _mha()
    sparse = SparseMultiheadAttention.from_dense(mha, sliding_window(2) | global_tokens(1))
    q, k, v = _rand(7, 16, seed=1), _rand(9, 16, seed=2), _rand(9, 16, seed=3)
    kpm = torch.zeros(9, dtype=torch.bool)
    kpm[7:] = True
    blocked = torch.rand(4, 7, 9, generator=torch.Generator().manual_seed(6)) < 0.3  # [num_heads, L, S]
    nn_mask = blocked | ~sparse.pattern.mask(7, 9)
    out, weights = mha(q, k, v, key_padding_mask=kpm, attn_mask=nn_mask, average_attn_weights=False)
    sparse_out, sparse_weights = sparse(
        q, k, v, key_padding_mask=kpm, attn_mask=blocked, average_attn_weights=False
    )
    assert sparse_out.shape == (7, 16) and sparse_weights.shape == (4, 7, 9)
    _close(sparse_out, out)
    _close(sparse_weights, weights)


def test_bad_inputs_raise_clear_errors():
    sparse = SparseMultiheadAttention(16, 4, kdim=12, vdim=10, dtype=F64)
    q, k, v = _inputs(False, kdim=12, vdim=10)
    with pytest.raises(ValueError, match="all be 3-D"):
        sparse(q[:, 0], k, v)
    with pytest.raises(ValueError, match="all be 3-D"):
        sparse(q[None], k[None], v[None])
    with pytest.raises(ValueError, match="key must have last dimension 12"):
        sparse(q, v, v)
    with pytest.raises(ValueError, match="share batch and length"):
        sparse(q, k, v[:5])
    with pytest.raises(ValueError, match="share batch and length"):
        sparse(q, k[:, :2], v[:, :2])


def test_half_precision_weights_as_accurate_as_nn():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True, dtype=torch.bfloat16)
    sparse = SparseMultiheadAttention.from_dense(mha, None)
    exact = nn.MultiheadAttention(32, 4, batch_first=True, dtype=F64)
    exact.load_state_dict({name: t.to(F64) for name, t in mha.state_dict().items()})
    x = 3 * torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16)
    truth = exact(x.to(F64), x.to(F64), x.to(F64), average_attn_weights=False)[1]
    nn_error = (mha(x, x, x, average_attn_weights=False)[1].to(F64) - truth).abs().max()
    weights = sparse(x, x, x, average_attn_weights=False)[1]
    assert weights.dtype == torch.bfloat16
    assert (weights.to(F64) - truth).abs().max() <= 2 * nn_error


def test_encoder_built_from_a_replaced_layer_rejects_nested_tensors_clearly():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True, dtype=F64)
    replace_attention(layer, None)
    encoder = nn.TransformerEncoder(layer, 2).eval()  # clones the layer; its fast path makes nested tensors
    x, kpm = _rand(2, 11, 16), torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 8:] = True
    with torch.no_grad(), pytest.raises(ValueError, match="use_nested_tensor = False"):
        encoder(x, src_key_padding_mask=kpm)
    encoder.use_nested_tensor = False
    with torch.no_grad():
        assert not encoder(x, src_key_padding_mask=kpm).isnan().any()


def test_from_dense_keeps_frozen_parameters_frozen():
    mha = _mha()
    mha.in_proj_weight.requires_grad_(False)
    sparse = SparseMultiheadAttention.from_dense(mha, None)
    assert not sparse.in_proj_weight.requires_grad
    assert sparse.out_proj.weight.requires_grad and sparse.in_proj_bias.requires_grad
