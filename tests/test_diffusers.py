"""diffusers integration: tiny random Wan, HunyuanVideo, Flux and CogVideoX transformers on sparse-attn.

A dense pattern must give the model's own attention; a neighbourhood pattern must give the model run with
its own attention and that pattern's boolean mask handed to SDPA (`_MaskedSDPA`, the reference processor).

diffusers is an optional extra; ``pip install -e .[dev]`` installs it (so CI runs these tests): the
importorskip only spares installs without the extra.
"""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

diffusers = pytest.importorskip("diffusers")

from diffusers.models.attention_dispatch import (  # noqa: E402
    AttentionBackendName,
    attention_backend,
    dispatch_attention_fn,
)

import sparse_attn as sa  # noqa: E402
from sparse_attn.integrations import diffusers as sa_diff  # noqa: E402
from sparse_attn.patterns import dense  # noqa: E402
from sparse_attn.reference import attention_reference  # noqa: E402

NAME = sa_diff.register()
TIMESTEP = torch.tensor([10])


# -- the token-level truth, written here independently of the library ------------------------------------
def _neighbourhood_mask(grid, kernel) -> torch.Tensor:
    """NATTEN's neighbourhood on a row-major grid: per dimension, keys ``[s, s + k)`` with ``s = clamp(i - k //
    2, 0, n - k)`` (the window shifts at the borders); visible when visible in every dimension."""
    visible = torch.ones(1, 1, dtype=torch.bool)
    for n, k in zip(grid, kernel, strict=True):
        i = torch.arange(n)
        start = (i - k // 2).clamp(0, n - k)
        dim = (i[None, :] >= start[:, None]) & (i[None, :] < start[:, None] + k)  # [n, n]
        # Row-major: the new dimension varies fastest.
        visible = (visible[:, None, :, None] & dim[None, :, None, :]).reshape(
            visible.shape[0] * n, visible.shape[1] * n
        )
    return visible


def _with_global_text(video_mask, n_text, text_first) -> torch.Tensor:
    """The joint sequence's mask: the video mask among video tokens, text tokens global."""
    n = video_mask.shape[0] + n_text
    full = torch.ones(n, n, dtype=torch.bool)
    video = slice(n_text, n) if text_first else slice(0, n - n_text)
    full[video, video] = video_mask
    return full


class _MaskedSDPA(TorchFunctionMode):
    """The reference processor: SDPA calls over `mask.shape[0]` queries and keys get `mask` ANDed in."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is F.scaled_dot_product_attention:
            # diffusers passes them by keyword, CogVideoX by position.
            kwargs.update(zip(("query", "key", "value", "attn_mask"), args, strict=False))
            n = self.mask.shape[0]
            if kwargs["query"].shape[-2] == n and kwargs["key"].shape[-2] == n:
                given = kwargs.get("attn_mask")
                assert given is None or given.dtype == torch.bool
                kwargs["attn_mask"] = self.mask if given is None else given & self.mask
            return func(**kwargs)
        return func(*args, **kwargs)


# -- tiny random models and their inputs ---------------------------------------------------------------
def _wan():
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 10, generator=g),
        timestep=TIMESTEP,
        encoder_hidden_states=torch.randn(1, 5, 16, generator=g),
    )
    return (
        model,
        inputs,
        (3, 4, 5),
        0,
        None,
    )  # grid (frames, height / 2, width / 2), no text in self-attention


def _hunyuan():
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    text_mask = torch.ones(2, 6)
    text_mask[1, 4:] = 0  # the second prompt is 4 tokens, padded to 6
    inputs = dict(
        hidden_states=torch.randn(2, 4, 2, 8, 8, generator=g),
        timestep=torch.tensor([10, 10]),
        encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
        encoder_attention_mask=text_mask,
        pooled_projections=torch.randn(2, 8, generator=g),
        guidance=torch.tensor([3.0, 3.0]),
    )
    return model, inputs, (2, 4, 4), 6, "last"


def _flux():
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    h, w = 6, 8
    rows, cols = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    inputs = dict(
        hidden_states=torch.randn(1, h * w, 4, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([1.0]),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3),
        txt_ids=torch.zeros(5, 3),
    )
    return model, inputs, (h, w), 5, "first"


def _cogvideox():
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=8, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 3, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 6, 8, generator=g),
        timestep=TIMESTEP,
    )
    return model, inputs, (3, 4, 4), 6, "first"


def _ltx(prompt_tokens=6):
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=16,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    f, h, w = 2, 4, 5
    prompt_mask = torch.ones(1, prompt_tokens)
    prompt_mask[:, -2:] = 0
    inputs = dict(
        hidden_states=torch.randn(1, f * h * w, 4, generator=g),  # already patchified: [B, tokens, C]
        encoder_hidden_states=torch.randn(1, prompt_tokens, 16, generator=g),
        timestep=TIMESTEP,
        encoder_attention_mask=prompt_mask,
        num_frames=f,
        height=h,
        width=w,
    )
    return model, inputs, (f, h, w), 0, None


MODELS = {"wan": _wan, "hunyuan": _hunyuan, "flux": _flux, "cogvideox": _cogvideox, "ltx": _ltx}
#: Layers to give the pattern: HunyuanVideo's text-only token refiner stays dense.
LAYERS = {"hunyuan": ("transformer_blocks", "single_transformer_blocks")}
#: CogVideoX's processor calls SDPA itself: it takes the processor route.
PROCESSOR_ROUTE = {"cogvideox"}
KERNELS = {2: (3, 5), 3: (2, 3, 3)}


def _build(kind):
    torch.manual_seed(0)
    model, inputs, grid, n_text, text = MODELS[kind]()
    return model.eval(), inputs, grid, n_text, text


def _run(model, inputs):
    """The model with its own attention (diffusers' native backend, whatever another test made global)."""
    with attention_backend("native"):
        return model(**inputs, return_dict=False)[0]


def _run_sparse(model, inputs, processor_route=False):
    """The model on sparse-attn (checked to be reached: a dense pattern alone could not tell)."""
    with mock.patch.object(sa_diff, "sparse_attention", wraps=sa_diff.sparse_attention) as spy:
        out = _run_switched(model, inputs, processor_route)
    assert spy.call_count > 0, "sparse_attn was never called"
    return out


def _run_switched(model, inputs, processor_route):
    if processor_route:
        original = model.attn_processors
        model.set_attn_processor(sa_diff.sparse_processors(model))  # the one-line switch
        try:
            return _run(model, inputs)
        finally:
            model.set_attn_processor(original)
    with attention_backend(NAME):  # or model.set_attention_backend("sparse_attn")
        return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("kind", list(MODELS))
def test_dense_pattern_equals_the_models_attention(kind):
    model, inputs, grid, n_text, text = _build(kind)
    with torch.no_grad():
        expected = _run(model, inputs)
        sa_diff.set_pattern(model, dense(), grid=grid, text=text, layers=LAYERS.get(kind))
        got = _run_sparse(model, inputs, kind in PROCESSOR_ROUTE)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", list(MODELS))
def test_neighbourhood_equals_the_masked_reference(kind):
    model, inputs, grid, n_text, text = _build(kind)
    kernel = KERNELS[len(grid)]
    joint = _with_global_text(_neighbourhood_mask(grid, kernel), n_text, text == "first")
    with torch.no_grad():
        dense_out = _run(model, inputs)
        with _MaskedSDPA(joint):
            expected = _run(model, inputs)
        sa_diff.set_pattern(
            model, sa.neighborhood(grid, kernel), grid=grid, text=text, layers=LAYERS.get(kind)
        )
        got = _run_sparse(model, inputs, kind in PROCESSOR_ROUTE)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # The pattern is sparse enough to matter: it changes the output.
    assert (got - dense_out).abs().max() > 1e-3


def test_wan_gradients_equal_the_masked_reference():
    model, inputs, grid, _, _ = _build("wan")
    pattern = sa.neighborhood(grid, (3, 3, 3))
    sa_diff.set_pattern(model, pattern, grid=grid)
    x = inputs["hidden_states"].clone().requires_grad_(True)
    weight = torch.randn(_run(model, inputs).shape, generator=torch.Generator().manual_seed(3))

    def grads(run):
        model.zero_grad()
        x.grad = None
        (run(model, {**inputs, "hidden_states": x}) * weight).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    with _MaskedSDPA(pattern.mask(math.prod(grid))):
        expected = grads(_run)
    got = grads(lambda m, i: _run_sparse(m, i))
    assert len(got) == len(expected) > 10
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_wan_under_inference_mode_and_the_processor_route():
    model, inputs, grid, _, _ = _build("wan")
    pattern = sa.neighborhood(grid, (3, 3, 3))
    sa_diff.set_pattern(model, pattern, grid=grid)
    with torch.no_grad():
        expected = _run_sparse(model, inputs)
    with torch.inference_mode():
        got = _run_sparse(model, inputs)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # The processor swap works for a dispatcher model too (its native backend ends in SDPA).
    with torch.no_grad():
        model.set_attn_processor(sa_diff.sparse_processors(model))
        swapped = _run(model, inputs)
    torch.testing.assert_close(swapped, expected, atol=2e-5, rtol=1e-4)


def test_pattern_per_layer_callable():
    model, inputs, grid, _, _ = _build("wan")
    pattern = sa.neighborhood(grid, (3, 3, 3))
    calls = []

    def per_layer(name, q_len, kv_len):
        calls.append((name, q_len, kv_len))
        return pattern if name.startswith("blocks.1.") else None

    with torch.no_grad():
        sa_diff.set_pattern(model, per_layer, grid=grid)
        got = _run_sparse(model, inputs)
        got_again = _run_sparse(model, inputs)
        sa_diff.set_pattern(model, None)
        sa_diff.set_pattern(model, pattern, grid=grid, layers=["blocks.1.attn1"])
        expected = _run_sparse(model, inputs)
        sa_diff.set_pattern(model, pattern, grid=grid)
        all_layers = _run_sparse(model, inputs)
    # Self-attention layers only (the attn2 cross-attention runs dense), once per layer and length.
    assert calls == [("blocks.0.attn1", 60, 60), ("blocks.1.attn1", 60, 60)]
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(got_again, got, atol=0, rtol=0)
    assert (all_layers - got).abs().max() > 1e-4


def test_sliding_tile_in_tile_major_order_with_text():
    """HunyuanVideo with Sliding Tile Attention computed in tile-major order (reordered inside each call)
    equals the model with STA's boolean mask given to SDPA."""
    model, inputs, grid, n_text, text = _build("hunyuan")
    pattern = sa.sliding_tile(grid, tile=(1, 1, 2), window=(1, 3, 1))
    joint = _with_global_text(pattern.mask(math.prod(grid)), n_text, text == "first")
    assert joint.float().mean() < 0.6  # a real restriction
    with torch.no_grad():
        with _MaskedSDPA(joint):
            expected = _run(model, inputs)
        sa_diff.set_pattern(model, sa.tile_major(pattern), grid=grid, text=text, layers=LAYERS["hunyuan"])
        got = _run_sparse(model, inputs)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("route", ["dispatcher", "processor"])
def test_cross_attention_as_long_as_the_video_stays_dense(route):
    """LTX's attn2 has no is_cross_attention flag; a 40-token prompt over 40 video tokens has equal lengths."""
    torch.manual_seed(0)
    model, inputs, grid, _, _ = _ltx(prompt_tokens=40)
    model.eval()
    with torch.no_grad():
        sa_diff.set_pattern(model, sa.neighborhood(grid, (2, 3, 3)), grid=grid)
        got = _run_sparse(model, inputs, route == "processor")
        sa_diff.set_pattern(model, None)
        sa_diff.set_pattern(
            model, sa.neighborhood(grid, (2, 3, 3)), grid=grid, layers="transformer_blocks.0.attn1"
        )
        expected = _run_sparse(model, inputs, route == "processor")
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


# -- the backend called directly: masks, NaN in masked keys, strides ----------------------------------------
class _Layer(torch.nn.Module):
    """The smallest attention layer diffusers' dispatcher serves: q/k/v ``[B, S, H, D]`` in and out."""

    processor = None

    def set_processor(self, processor):
        self.processor = processor

    def forward(self, q, k, v, attn_mask=None):
        return dispatch_attention_fn(q, k, v, attn_mask=attn_mask, backend=AttentionBackendName(NAME))


@pytest.mark.parametrize("text", ["first", "last"])
def test_joint_sequence_with_text_mask_nan_in_masked_keys_and_gradients(text):
    grid, n_text, heads, dim = (2, 3, 5), 7, 2, 16
    n = math.prod(grid) + n_text
    g = torch.Generator().manual_seed(0)
    # [B, S, H, D] from a [B, H, S, D] tensor: strided, as processors hand them over.
    q, k, v = (torch.randn(2, heads, n, dim, generator=g).transpose(1, 2) for _ in range(3))
    key_mask = torch.ones(2, n, dtype=torch.bool)
    text_keys = torch.arange(n_text) if text == "first" else torch.arange(n - n_text, n)
    key_mask[1, text_keys[-3:]] = False  # padded text tokens of the second prompt
    k, v = k.clone(), v.clone()
    k[~key_mask], v[~key_mask] = float("nan"), float("nan")
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    layer = _Layer()
    sa_diff.set_pattern(layer, sa.neighborhood(grid, (2, 3, 3)), grid=grid, text=text)
    got = layer(q, k, v, attn_mask=key_mask[:, None, None, :])
    weight = torch.randn(got.shape, generator=g)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    # The float64 oracle, on the same values with the masked keys zeroed.
    joint = _with_global_text(_neighbourhood_mask(grid, (2, 3, 3)), n_text, text == "first")
    leaves = [t.detach().transpose(1, 2).double().nan_to_num(0.0).requires_grad_(True) for t in (q, k, v)]
    expected = attention_reference(*leaves, joint, key_mask=key_mask)[0].transpose(1, 2)
    expected_grads = torch.autograd.grad((expected * weight.double()).sum(), leaves)
    assert not got.isnan().any() and not any(d.isnan().any() for d in grads)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    for d, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(d.double(), e.transpose(1, 2), atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        # An additive 0 / -inf mask is the same mask.
        additive = torch.zeros(2, n).masked_fill(~key_mask, float("-inf"))
        again = layer(q, k, v, attn_mask=additive)
    torch.testing.assert_close(again, got.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["hunyuan", "flux"])
def test_a_whole_sequence_pattern_equals_text_global(kind):
    """The joint sequence as one pattern (neighbourhood among the grid's cells, text tokens global, their count
    read from the layer's length) gives what ``text=`` gives through merged parts."""
    model, inputs, grid, n_text, text = _build(kind)
    kernel, video = KERNELS[len(grid)], math.prod(grid)

    def whole(name, q_len, kv_len):
        n = q_len - video
        if text == "first":
            return sa.neighborhood(grid, kernel, prefix=n) | sa.global_tokens(n)
        return sa.neighborhood(grid, kernel, suffix=n) | sa.global_tokens(list(range(video, q_len)))

    with torch.no_grad():
        sa_diff.set_pattern(
            model, sa.neighborhood(grid, kernel), grid=grid, text=text, layers=LAYERS.get(kind)
        )
        expected = _run_sparse(model, inputs, kind in PROCESSOR_ROUTE)
        sa_diff.set_pattern(model, whole, layers=LAYERS.get(kind))
        got = _run_sparse(model, inputs, kind in PROCESSOR_ROUTE)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_cross_attention_and_unselected_layers_run_dense_exactly():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 12, 2, 8, generator=g)
    k, v = torch.randn(1, 5, 2, 8, generator=g), torch.randn(1, 5, 2, 8, generator=g)
    layer = _Layer()
    sa_diff.set_pattern(layer, sa.sliding_window(1), grid=(3, 4))
    native = dispatch_attention_fn(q, k, v, backend=AttentionBackendName.NATIVE)
    torch.testing.assert_close(layer(q, k, v), native, atol=0, rtol=0)  # different lengths: dense
    sa_diff.set_pattern(layer, None)  # undone: dense
    torch.testing.assert_close(
        layer(q, q, q), dispatch_attention_fn(q, q, q, backend="native"), atol=0, rtol=0
    )


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    model, inputs, grid, _, _ = _build("wan")
    with pytest.raises(ValueError, match="no attention layer is named 'blocks.7'"):
        sa_diff.set_pattern(model, dense(), grid=grid, layers=["blocks.7"])
    with pytest.raises(ValueError, match="text must be None, 'first' or 'last'"):
        sa_diff.set_pattern(model, dense(), grid=grid, text="middle")
    with pytest.raises(ValueError, match="needs the video token grid"):
        sa_diff.set_pattern(model, dense(), text="last")
    with pytest.raises(TypeError, match="grid must be a tuple"):
        sa_diff.set_pattern(model, dense(), grid=60)
    with pytest.raises(ValueError, match="grid\\[1\\] must be >= 1"):
        sa_diff.set_pattern(model, dense(), grid=(3, 0, 5))
    with pytest.raises(TypeError, match="pattern must be a sparse_attn Pattern"):
        sa_diff.set_pattern(model, "neighbourhood")
    sa_diff.set_pattern(model, dense(), grid=(3, 4, 4))
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"attends over 60 tokens, but grid \(3, 4, 4\) has 48"),
    ):
        _run_sparse(model, inputs)
    sa_diff.set_pattern(model, lambda name, q, kv: "dense", grid=grid)
    with torch.no_grad(), pytest.raises(TypeError, match="returned str for layer 'blocks.0.attn1'"):
        _run_sparse(model, inputs)
    # A mask that varies per query cannot be a key mask.
    layer = _Layer()
    sa_diff.set_pattern(layer, dense())
    q = torch.randn(1, 6, 2, 8)
    with pytest.raises(ValueError, match="only key-padding masks"):
        layer(q, q, q, attn_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="values other than 0 and -inf"):
        layer(q, q, q, attn_mask=torch.full((1, 6), 0.5))


def test_unconfigured_layers_run_dense_with_a_warning():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 8, generator=g) for _ in range(3))
    native = dispatch_attention_fn(q, k, v, backend=AttentionBackendName.NATIVE)
    sa_diff._WARNED.clear()
    with pytest.warns(UserWarning, match="did not configure runs dense"):
        got = dispatch_attention_fn(q, k, v, backend=AttentionBackendName(NAME))
    torch.testing.assert_close(got, native, atol=0, rtol=0)


def test_register_is_idempotent_and_checks_the_dispatcher(monkeypatch):
    assert sa_diff.register() == NAME == AttentionBackendName(NAME).value
    assert AttentionBackendName.SPARSE_ATTN is AttentionBackendName(NAME)
    assert list(AttentionBackendName).count(AttentionBackendName.SPARSE_ATTN) == 1
    from diffusers.models import attention_dispatch

    class Changed:  # a registry whose structure moved on
        register = staticmethod(lambda backend, constraints=None: None)

    monkeypatch.setattr(attention_dispatch, "_AttentionBackendRegistry", Changed)
    with pytest.raises(RuntimeError, match="_backends is not a dict.*processor route"):
        sa_diff.register()
