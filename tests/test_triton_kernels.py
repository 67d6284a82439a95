"""The block-sparse Triton kernels, run through Triton's interpreter on CPU tensors.

Every check compares against the float64 reference on the same (dtype-rounded) inputs. A kernel's error may
be at most twice the error the plain reference math has in the input dtype, plus a small absolute floor.
Every output buffer is poisoned with NaN before the kernels write it, so an unwritten element fails.
"""

import pytest
import torch
import torch.nn.functional as F
from reference_check import assert_close_to_reference, loss_of  # noqa: E402

import sparse_attn as sa
from sparse_attn.reference import attention_reference

launch = pytest.importorskip("sparse_attn.triton_kernels.launch")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an element no kernel writes fails."""
    allocate = launch.empty_buffer
    monkeypatch.setattr(launch, "empty_buffer", lambda *args, **kw: allocate(*args, **kw).fill_(float("nan")))


def make_qkv(b=1, hq=2, hkv=None, sq=200, skv=None, d=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    skv = sq if skv is None else skv
    hkv = hq if hkv is None else hkv
    shapes = [(b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d)]
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def run(fn, q, k, v, dtype):
    """(out, lse, dq, dk, dv) of `fn(q, k, v) -> (out, lse)` on leaf copies cast to `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    loss_of(out, lse).backward()
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def triton_fn(pattern, **kwargs):
    return lambda q, k, v: sa.sparse_attention(q, k, v, pattern, backend="triton", return_lse=True, **kwargs)


def reference_fn(pattern, **kwargs):
    return lambda q, k, v: attention_reference(q, k, v, pattern, **kwargs)


def check_against_reference(q, k, v, pattern, dtype=torch.float32, **kwargs):
    """Triton fwd + grads vs the float64 truth, within 2x the reference's own error in `dtype` (+ floor)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    got = run(triton_fn(pattern, **kwargs), q, k, v, dtype)
    truth = run(reference_fn(pattern, **kwargs), q, k, v, torch.float64)
    plain = run(reference_fn(pattern, **kwargs), q, k, v, dtype)
    assert_close_to_reference(got, truth, plain, dtype)
    return got


def random_block_layout(nqb, nkb, heads=None, density=0.5, seed=3):
    g = torch.Generator().manual_seed(seed)
    shape = (nqb, nkb) if heads is None else (heads, nqb, nkb)
    return torch.rand(shape, generator=g) < density


PATTERNS = {
    "causal": sa.causal(),
    "window": sa.sliding_window(40),
    "window_asym": sa.sliding_window(70, 3),
    "dilated": sa.dilated(20, dilation=3),
    "global_n": sa.global_tokens(5),
    "global_pos": sa.global_tokens([0, 77, 150]),
    "block_sparse_32x48": sa.block_sparse(random_block_layout(7, 5), (32, 48)),
    "random_blocks": sa.random_blocks(2, 64, seed=1),
    "longformer": sa.longformer(24, 2),
    "longformer_dilated": sa.longformer(10, 1, dilation=2),
    "bigbird": sa.bigbird(window=30, global_tokens=4, num_random_blocks=1, block_size=64),
    "causal_and_window": sa.causal() & sa.sliding_window(50),
    "dilated_or_global": sa.dilated(16, dilation=2) | sa.global_tokens(3),
    "per_head": sa.per_head([sa.causal(), sa.sliding_window(20) | sa.global_tokens(2)]),
    "bigbird_per_head": sa.bigbird(window=16, global_tokens=2, num_random_blocks=2, block_size=32, heads=2),
    "block_sparse_per_head": sa.block_sparse(random_block_layout(4, 4, heads=2), 64),
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_every_pattern_fp32(name):
    check_against_reference(*make_qkv(), PATTERNS[name])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["causal", "dilated_or_global", "per_head"])
def test_half_precision(name, dtype):
    check_against_reference(*make_qkv(), PATTERNS[name], dtype=dtype)


@pytest.mark.parametrize("hkv", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_grouped_query_heads(hkv, per_head):
    pattern = sa.sliding_window(30) | sa.global_tokens(2)
    if per_head:
        pattern = sa.per_head([sa.causal(), sa.sliding_window(10), sa.global_tokens(3), sa.dilated(8)])
    check_against_reference(*make_qkv(hq=4, hkv=hkv, sq=130), pattern)


@pytest.mark.parametrize("sq,skv", [(97, 161), (161, 97), (1, 161), (1, 1)])
def test_query_and_key_lengths_differ_bottom_right(sq, skv):
    check_against_reference(*make_qkv(sq=sq, skv=skv), sa.causal() | sa.sliding_window(20, 5))


def test_decode_single_query_with_window():
    check_against_reference(*make_qkv(sq=1, skv=161), sa.sliding_window(30), dtype=torch.float16)


def padding_mask(batch, kv_len):
    """Batch 0 right-padded (last 30 keys padding), batch 1 left-padded (first 25)."""
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    mask[0, -30:] = False
    mask[1, :25] = False
    return mask


@pytest.mark.parametrize("name", ["causal", "window", "block_sparse_32x48"])
def test_key_mask_left_and_right_padding(name):
    q, k, v = make_qkv(b=2, sq=161)
    got = check_against_reference(q, k, v, PATTERNS[name], key_mask=padding_mask(2, 161))
    dk, dv = got[3], got[4]
    assert dk[0, :, -30:].abs().max() == 0 and dv[1, :, :25].abs().max() == 0


def test_empty_rows_give_zero_output_minus_inf_lse_and_zero_grads():
    # Query block 1 sees nothing; in batch 1 every key is padding, so all its rows are empty.
    blocks = torch.ones(4, 4, dtype=torch.bool)
    blocks[1] = False
    key_mask = torch.ones(2, 200, dtype=torch.bool)
    key_mask[1] = False
    q, k, v = make_qkv(b=2, sq=200)
    out, lse, dq, dk, dv = check_against_reference(q, k, v, sa.block_sparse(blocks, 64), key_mask=key_mask)
    for empty in (out[0, :, 64:128], out[1], dq[0, :, 64:128], dq[1], dk[1], dv[1]):
        assert torch.equal(empty, torch.zeros_like(empty))
    assert lse[0, :, 64:128].eq(float("-inf")).all() and lse[1].eq(float("-inf")).all()
    assert lse[0, :, :64].isfinite().all()


def test_fully_dense_pattern_equals_sdpa():
    q, k, v = make_qkv(hq=2, sq=97, skv=161, d=40)
    got = run(triton_fn(sa.sliding_window(10**6)), q, k, v, torch.float32)
    expected = run(lambda q, k, v: (F.scaled_dot_product_attention(q, k, v), torch.logsumexp(
        q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)), q, k, v, torch.float32)  # fmt: skip
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length,head_dim", [(1, 24), (97, 40), (161, 80), (97, 16), (70, 256), (33, 130)])
def test_odd_lengths_and_head_dims(length, head_dim):
    check_against_reference(*make_qkv(sq=length, d=head_dim), sa.causal() | sa.global_tokens(3))


@pytest.mark.parametrize("sq,skv", [(256, 256), (128, 192)])
def test_lengths_that_divide_the_tile(sq, skv):
    """The EVEN_M / EVEN_N paths (no bounds masks on loads and stores)."""
    check_against_reference(*make_qkv(sq=sq, skv=skv), sa.causal() | sa.global_tokens(3))


def test_scale_argument():
    check_against_reference(*make_qkv(sq=97), sa.sliding_window(25), scale=0.3)


def test_backward_is_bitwise_deterministic():
    q, k, v = make_qkv(hq=4, hkv=2, sq=161)
    pattern = PATTERNS["bigbird"]
    first = run(triton_fn(pattern), q, k, v, torch.float16)
    second = run(triton_fn(pattern), q, k, v, torch.float16)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(0)
    # q as a transposed [B, S, H, D] view; k with a non-unit last stride; v a slice of a wider head dim.
    q = torch.randn(1, 150, 2, 48, generator=g).transpose(1, 2)
    k = torch.randn(1, 2, 150, 96, generator=g)[..., ::2]
    v = torch.randn(1, 2, 150, 64, generator=g)[..., 8:56]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_reference(q, k, v, sa.causal() & sa.sliding_window(60))


def test_transposed_key_mask_and_output_gradient():
    """A key_mask that is a transposed view (the kernels read keys with unit stride) and a dO with
    non-standard strides (the preprocess, dK/dV and dQ kernels take its own strides)."""
    q, k, v = make_qkv(b=2, sq=97)
    key_mask = padding_mask(2, 97).T.contiguous().T
    assert key_mask.stride() == (1, 2)
    do = torch.randn(2, 97, 2, 64, generator=torch.Generator().manual_seed(5)).transpose(1, 2)
    results = []
    for fn, dtype in ((triton_fn, torch.float32), (reference_fn, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        out, lse = fn(sa.causal(), key_mask=key_mask)(*leaves)
        out.backward(do.to(dtype))
        results.append([out.detach(), lse.detach()] + [t.grad for t in leaves])
    for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), *results, strict=True):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-5, msg=name)


@pytest.mark.parametrize(
    "length,block_size",
    [(200, 128), (200, (64, 128)), (200, (128, 64)), (192, 128)],
    ids=["200-128", "200-64x128", "200-128x64", "192-128"],
)
def test_layout_block_larger_than_tile(length, block_size):
    """Layout blocks spanning several tiles; at length 192 the last block's second 64-tile is all padding."""
    q, k, v = make_qkv(sq=length)
    # Wide enough that the ragged last blocks are full (no token mask to hide the padding).
    pattern = sa.sliding_window(150) | sa.global_tokens(3)
    layout = pattern.layout(length, length, block_size=block_size)
    assert layout.to_block_mask()[0, -1, -1] == 2
    check_against_reference(q, k, v, layout)


def test_forced_small_tiles_inside_default_blocks():
    """A 32x32 tile walking 64x64 layout blocks (two sub-tiles each way) through the launchers."""
    q, k, v = make_qkv(sq=161)
    layout = (sa.causal() | sa.global_tokens(5)).layout(161, 161, block_size=64)
    small = launch.TileConfig(32, 32, 4, 2)
    out, lse = launch.attention_fwd(q, k, v, layout, 0.125, config=small)
    ref_out, ref_lse = attention_reference(q.double(), k.double(), v.double(), layout, scale=0.125)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=2e-6)


def test_layout_block_that_fits_no_tile_is_rejected():
    q, k, v = make_qkv(sq=64)
    layout = sa.causal().layout(64, 64, block_size=16)
    with pytest.raises(ValueError, match="multiple of a kernel tile"):
        sa.sparse_attention(q, k, v, layout, backend="triton")


def test_batch_times_heads_beyond_the_cuda_grid_is_rejected():
    q = torch.zeros(65536, 1, 1, 16)
    with pytest.raises(ValueError, match="batch x query heads <= 65535"):
        sa.sparse_attention(q, q, q, sa.sliding_window(1), backend="triton")


def test_poisoning_is_active_in_these_tests():
    buffer = launch.empty_buffer((3,), like=torch.zeros(1))
    assert buffer.isnan().all()


def sweep_cases():
    cases = []
    for head_dim in (64, 128):
        lists = [launch.configs_for(name, head_dim) for name in ("fwd", "dkdv", "dq")]
        for i in range(max(map(len, lists))):
            picked = [c[min(i, len(c) - 1)] for c in lists]
            cases.append(pytest.param(head_dim, *picked, id=f"D{head_dim}-" + "-".join(map(str, picked))))
    return cases


@pytest.mark.autotune_sweep
@pytest.mark.parametrize("head_dim,fwd,dkdv,dq", sweep_cases())
def test_every_shipped_config(head_dim, fwd, dkdv, dq):
    """Each shipped config, forced, computes the same attention and gradients as the float64 reference."""
    q, k, v = make_qkv(sq=161, d=head_dim)
    layout = (sa.sliding_window(40) | sa.global_tokens(3)).layout(161, 161, block_size=64)
    scale = head_dim**-0.5
    out, lse = launch.attention_fwd(q, k, v, layout, scale, config=fwd)
    do = torch.randn_like(out)
    *grads, no_rel_bias_grad = launch.attention_bwd(
        do, None, q, k, v, out, lse, layout, scale, configs={"dkdv": dkdv, "dq": dq}
    )
    assert no_rel_bias_grad is None
    leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = attention_reference(*leaves, layout, scale=scale)
    ref_out.backward(do.double())
    for got, ref in zip((out, lse, *grads), (ref_out, ref_lse, *(t.grad for t in leaves)), strict=True):
        torch.testing.assert_close(got.double(), ref.detach(), rtol=0, atol=1e-5)


def test_autotuner_prunes_to_the_configs_that_fit():
    """The GPU path's autotuner (not run on CPU) only ever benchmarks shipped configs that fit the layout."""
    tuner = launch._autotuned_kernel("fwd")
    kept = tuner.early_config_prune(tuner.configs, {}, HEAD_DIM=128, LAYOUT_BQ=64, LAYOUT_BK=64)
    expected = launch.configs_for("fwd", 128)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == [
        (c.block_m, c.block_n, c.num_warps) for c in expected
    ]
    kept = tuner.early_config_prune(tuner.configs, {}, HEAD_DIM=64, LAYOUT_BQ=32, LAYOUT_BK=32)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == {(32, 32)}


def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (`triton.autotune` over the pruned configs, EVEN_* heuristics inside) through the
    interpreter, with a stub benchmark that makes the last pruned config win, so a non-pinned one runs."""
    monkeypatch.setattr(launch, "pinned", lambda: False)
    monkeypatch.setattr(launch, "_autotuned", {})
    benchmarked = []

    def bench(kernel_call, quantiles):
        kernel_call()
        benchmarked.append(None)
        return [-len(benchmarked)] * len(quantiles)

    for name in ("fwd", "dkdv", "dq"):
        launch._autotuned_kernel(name).do_bench = bench
    q, k, v = make_qkv(b=2, hq=2, hkv=1, sq=97, d=40)
    check_against_reference(q, k, v, sa.causal() | sa.global_tokens(3), key_mask=padding_mask(2, 97))
    fitting = {name: launch.fitting_configs(name, 40, 64, 64) for name in ("fwd", "dkdv", "dq")}
    for name, configs in fitting.items():
        (chosen,) = launch._autotuned[name].cache.values()
        last = configs[-1]
        assert len(configs) > 1 and (chosen.kwargs, chosen.num_warps) == (last.kwargs(), last.num_warps)
    assert len(benchmarked) == sum(map(len, fitting.values()))


def test_kernels_visit_only_the_kept_blocks(monkeypatch):
    """Work is proportional to the kept blocks: count the per-tile steps the kernels actually execute
    (the interpreter runs the jit helpers as Python calls) and compare with the layout's block lists."""
    from sparse_attn.triton_kernels import bsattn

    counts = dict.fromkeys(("_fwd_tile", "_bwd_dkdv_tile", "_bwd_dq_tile"), 0)
    originals = {name: getattr(bsattn, name) for name in counts}
    for name in counts:

        def counted(*args, _name=name, **kwargs):
            counts[_name] += 1
            return originals[_name](*args, **kwargs)

        monkeypatch.setattr(bsattn, name, counted)
    q, k, v = make_qkv(hq=2, hkv=1, sq=256)
    pattern = sa.per_head([sa.sliding_window(40), sa.causal() | sa.global_tokens(2)])
    run(triton_fn(pattern), q, k, v, torch.float32)
    layout = pattern.layout(256, 256, block_size=64, heads=2)
    kept = layout.num_full + layout.num_partial
    fwd, dkdv, dq = (launch.fitting_configs(n, 64, 64, 64)[0] for n in ("fwd", "dkdv", "dq"))
    assert kept < 0.75 * 2 * 4 * 4  # sparse: well under the 2 heads x 4 x 4 dense blocks
    assert counts["_fwd_tile"] == kept * (64 // fwd.block_n)
    assert counts["_bwd_dkdv_tile"] == kept * (64 // dkdv.block_m)
    assert counts["_bwd_dq_tile"] == kept * (64 // dq.block_n)
