"""Score modifiers (softcap, ALiBi, rel_bias) in the C++ CPU kernel, called directly through
`sparse_attn.backends.cpu_kernel`, against the float64 reference (autograd through
`sparse_attn.reference.attention_reference`): out, lse and every gradient, rel_bias' included, within twice
the error the plain reference math has in the input dtype. Also: garbage in masked keys, rows that see no
key, determinism across thread counts, and the modifier-free path.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys

import pytest
import torch
from reference_check import FLOORS, MOD_SETS, NAMES_WITH_BIAS, assert_close_with_mods, max_err
from reference_check import make_mods as shared_make_mods

import sparse_attn as sa
from sparse_attn.backends import cpu_kernel
from sparse_attn.reference import attention_reference
from sparse_attn.score_mods import check_score_mods

WINDOW_GLOBAL = sa.sliding_window(24) | sa.global_tokens(5)


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """The compiled kernel; these tests need it (test_cpu_kernel.py checks that it builds)."""
    try:
        return cpu_kernel.load(strict=True)
    except cpu_kernel.KernelUnavailable as exc:
        pytest.skip(f"the C++ kernel cannot be built here: {exc}")


def make_inputs(b, hq, hkv, sq, skv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, hq, sq, d), (b, hkv, skv, d), (b, hkv, skv, d))
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


#: Larger modifiers than the other modifier tests use (a softcap of 2 bends the scores more).
make_mods = functools.partial(shared_make_mods, softcap=2.0, max_slope=0.5)


def loss_weights(out_shape, lse_shape, dtype, seed=2):
    """Weights of a linear loss of out and of the finite lse, representable in `dtype`."""
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out_shape, generator=g, dtype=torch.float64).to(dtype).double()
    w_lse = torch.randn(lse_shape, generator=g, dtype=torch.float64)
    return w_out, w_lse


def reference_run(qkv, pattern, mods, dtype, scale, key_mask=None):
    """(out, lse, dq, dk, dv, d_rel_bias or None) of the reference computed in `dtype`."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in qkv]
    mods = {n: (t.detach().to(dtype) if isinstance(t, torch.Tensor) else t) for n, t in mods.items()}
    if "alibi_slopes" in mods:  # the kernels take float32 slopes (float64 ones only for float64)
        mods["alibi_slopes"] = mods["alibi_slopes"].to(
            torch.float64 if dtype == torch.float64 else torch.float32
        )
    wrt = list(leaves)
    if "rel_bias" in mods:
        wrt.append(mods["rel_bias"].requires_grad_(True))
    out, lse = attention_reference(*leaves, pattern, scale=scale, key_mask=key_mask, **mods)
    w_out, w_lse = loss_weights(out.shape, lse.shape, dtype)
    finite = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
    loss = (out.double() * w_out).sum() + (finite.double() * w_lse).sum()
    grads = torch.autograd.grad(loss, wrt)
    return (out.detach(), lse.detach(), *grads, *([None] if len(grads) == 3 else []))


def kernel_run(qkv, layout, mods, dtype, scale, key_mask=None, rel_bias_dtype=None):
    """The same through cpu_kernel.forward and cpu_kernel.backward, mods checked as the API checks them."""
    q, k, v = (t.to(dtype) for t in qkv)
    mods = dict(mods)
    if "rel_bias" in mods:
        mods["rel_bias"] = mods["rel_bias"].to(rel_bias_dtype or dtype)
    if "alibi_slopes" in mods and dtype != torch.float64:
        mods["alibi_slopes"] = mods["alibi_slopes"].float()
    checked = check_score_mods(mods.get("softcap"), mods.get("alibi_slopes"), mods.get("rel_bias"), q, k)
    out, lse = cpu_kernel.forward(q, k, v, layout, scale, key_mask, checked)
    w_out, w_lse = loss_weights(out.shape, lse.shape, dtype)
    dlse = torch.where(lse.isinf(), torch.zeros_like(w_lse), w_lse).to(lse.dtype)
    grads = cpu_kernel.backward(w_out.to(dtype), dlse, q, k, v, out, lse, layout, scale, key_mask, checked)
    assert len(grads) == 4
    return (out, lse, *grads)


def check(qkv, pattern, mods, dtype, block=32, key_mask=None, scale=None):
    """The kernel in `dtype` against the float64 reference, within twice the plain math's error."""
    q, k = qkv[0], qkv[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    layout = pattern.layout(q.shape[2], k.shape[2], block_size=block)
    rounded = [t.to(dtype).double() for t in qkv]  # the same rounded inputs for every run
    got = kernel_run(rounded, layout, mods, dtype, scale, key_mask)
    truth = reference_run(rounded, pattern, mods, torch.float64, scale, key_mask)
    plain = reference_run(rounded, pattern, mods, dtype, scale, key_mask)
    assert_close_with_mods(got, truth, plain, dtype)
    return got


PATTERNS = {
    "causal": sa.causal(),  # partial tiles on the diagonal
    "window": sa.sliding_window(20),  # full blocks in the middle, partial at both edges
    "window-global": WINDOW_GLOBAL,  # full, partial, and separate runs of blocks in one row
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("mods", list(MOD_SETS))
def test_modifiers_match_reference_fp32(mods, pattern):
    """GQA, Sq != Skv (97 queries, 161 keys: ragged blocks), fp32."""
    qkv = make_inputs(2, 4, 2, 97, 161, 32)
    check(qkv, PATTERNS[pattern], make_mods(MOD_SETS[mods], 2, 4, 97, 161), torch.float32)


@pytest.mark.parametrize("softcap", [5.0, 50.0])
def test_softcap_on_large_scores(softcap):
    """Scores up to about +-25 (scale 1): saturated tanh (c = 5) and Gemma 2's c = 50."""
    qkv = make_inputs(1, 2, 2, 97, 97, 32)
    check(qkv, sa.causal(), {"softcap": softcap}, torch.float32, scale=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_all_modifiers_other_dtypes(dtype):
    qkv = make_inputs(2, 4, 2, 97, 161, 32)
    check(qkv, WINDOW_GLOBAL, make_mods(MOD_SETS["all"], 2, 4, 97, 161), dtype)


class KernelAttention(torch.autograd.Function):
    """cpu_kernel.forward / backward as an autograd function of (q, k, v, rel_bias), for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, rel_bias, layout, softcap, slopes):
        mods = check_score_mods(softcap, slopes, rel_bias, q, k)
        out, lse = cpu_kernel.forward(q, k, v, layout, 0.3, None, mods)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.mods = layout, mods
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, d_rel_bias = cpu_kernel.backward(
            do.contiguous(), dlse, q, k, v, out, lse, ctx.layout, 0.3, None, ctx.mods
        )
        return dq, dk, dv, d_rel_bias, None, None, None


def test_gradcheck_float64():
    """torch.autograd.gradcheck of the kernel in float64 with all three modifiers (lse's gradient too)."""
    q, k, v = (t.requires_grad_(True) for t in make_inputs(1, 2, 1, 20, 30, 8))
    mods = make_mods(MOD_SETS["all"], 1, 2, 20, 30)
    rel_bias = mods["rel_bias"].requires_grad_(True)
    layout = (sa.causal() | sa.sliding_window(4)).layout(20, 30, block_size=16)

    def fn(q, k, v, rel_bias):
        out, lse = KernelAttention.apply(q, k, v, rel_bias, layout, mods["softcap"], mods["alibi_slopes"])
        return out, torch.where(lse.isinf(), torch.zeros_like(lse), lse)

    assert torch.autograd.gradcheck(fn, (q, k, v, rel_bias), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("mods", ["all", "rel_bias"])
@pytest.mark.parametrize(
    "shape",
    [
        (1, 161, "decode"),  # one query row against 161 keys
        (161, 97, "empty-rows"),  # more queries than keys: the first rows see nothing
        (1, 1, "length-1"),
    ],
    ids=lambda s: s[2],
)
def test_decode_and_empty_rows(mods, shape):
    sq, skv, _ = shape
    qkv = make_inputs(2, 4, 1, sq, skv, 16)
    pattern = sa.causal() | sa.sliding_window(3)
    got = check(qkv, pattern, make_mods(MOD_SETS[mods], 2, 4, sq, skv), torch.float32)
    if sq > skv:
        # qpos = i - (sq - skv); the window reaches 3 keys ahead.
        empty = torch.arange(sq) < sq - skv - 3
        out, lse, dq = got[0], got[1], got[2]
        assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
        assert bool((lse[:, :, empty] == float("-inf")).all())
        assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))


def test_unequal_blocks_and_several_runs_per_row():
    """32 x 48 blocks; rows of 700 keys and columns of 600 queries span more than one 512-wide run, so
    d_rel_bias adds partial sums of several runs per task."""
    mods = MOD_SETS["all"]
    qkv = make_inputs(1, 2, 1, 130, 700, 16)
    check(qkv, sa.causal(), make_mods(mods, 1, 2, 130, 700), torch.float32, block=(32, 48))
    qkv = make_inputs(1, 2, 2, 600, 600, 16)
    check(qkv, sa.sliding_window(300), make_mods(mods, 1, 2, 600, 600), torch.float32, block=(32, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_mask_with_garbage_in_masked_keys(dtype):
    """Left padding of different lengths per batch element; masked keys hold NaN (K) and inf (V): the
    results match the reference and equal, bit for bit, those of a run with clean masked keys."""
    b, hq, hkv, sq, skv = 2, 4, 2, 97, 161
    qkv = make_inputs(b, hq, hkv, sq, skv, 32)
    key_mask = torch.ones(b, skv, dtype=torch.bool)
    key_mask[0, :13] = False
    key_mask[1, :45] = False
    mods = make_mods(MOD_SETS["all"], b, hq, sq, skv)
    clean = check(qkv, WINDOW_GLOBAL, mods, dtype, key_mask=key_mask)
    hidden = ~key_mask[:, None, :, None]
    dirty = [qkv[0], qkv[1].masked_fill(hidden, float("nan")), qkv[2].masked_fill(hidden, float("inf"))]
    layout = WINDOW_GLOBAL.layout(sq, skv, block_size=32)
    got = kernel_run(dirty, layout, mods, dtype, 1.0 / math.sqrt(32), key_mask)
    for name, a, g in zip(NAMES_WITH_BIAS, clean, got, strict=True):
        assert not g.isnan().any(), name
        assert torch.equal(a, g), name


def test_rel_bias_in_another_dtype():
    """rel_bias keeps its own dtype: its gradient comes back in it (float64 rel_bias, fp32 q, k, v)."""
    qkv = make_inputs(1, 2, 2, 40, 40, 16)
    mods = make_mods(("rel_bias",), 1, 2, 40, 40)
    layout = sa.causal().layout(40, 40, block_size=32)
    got = kernel_run(qkv, layout, mods, torch.float32, 0.25, rel_bias_dtype=torch.float64)
    truth = reference_run(qkv, sa.causal(), mods, torch.float64, 0.25)
    assert got[5].dtype == torch.float64
    assert max_err(got[5], truth[5]) < 1e-4


def test_same_result_for_any_thread_count():
    """Every task owns its rows and its d_rel_bias partial sums, added in task order: 1 and 2 threads give
    bitwise equal results, d_rel_bias included."""
    qkv = make_inputs(2, 4, 2, 300, 300, 32)
    mods = make_mods(MOD_SETS["all"], 2, 4, 300, 300)
    layout = WINDOW_GLOBAL.layout(300, 300, block_size=32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel_run(qkv, layout, mods, torch.float32, 0.2)
        torch.set_num_threads(2)
        two = kernel_run(qkv, layout, mods, torch.float32, 0.2)
        again = kernel_run(qkv, layout, mods, torch.float32, 0.2)
    finally:
        torch.set_num_threads(before)
    for name, a, b, c in zip(NAMES_WITH_BIAS, one, two, again, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c), name


def test_no_modifiers_is_the_plain_kernel():
    """mods=None: a 4-tuple with d_rel_bias None, equal to the reference; neutral modifiers (zero slopes,
    zero bias) run the modifier instantiation and give the same bits."""
    qkv = make_inputs(2, 4, 2, 97, 161, 32)
    got = check(qkv, WINDOW_GLOBAL, {}, torch.float32)
    assert got[5] is None
    neutral = {"alibi_slopes": torch.zeros(4, dtype=torch.float64), "rel_bias": torch.zeros(4, 97 + 161 - 1)}
    layout = WINDOW_GLOBAL.layout(97, 161, block_size=32)
    with_mods = kernel_run(qkv, layout, neutral, torch.float32, 1.0 / math.sqrt(32))
    for name, a, b in zip(NAMES_WITH_BIAS[:5], got, with_mods, strict=False):
        assert torch.equal(a, b), name


def test_bad_modifier_tensors_are_refused():
    """The kernel checks what it is given (cpu_kernel passes checked ScoreMods)."""
    module = cpu_kernel.load(strict=True)
    q, k, v = (t.float() for t in make_inputs(1, 2, 2, 40, 40, 16))
    layout = sa.causal().layout(40, 40, block_size=32)
    tensors, ints = layout.flatten()
    args = (q, k, v, tensors, ints, cpu_kernel._tiles_t(layout), None, None, 0.25)
    with pytest.raises(RuntimeError, match="rel_bias must be contiguous"):
        module.forward(*args, 0.0, None, torch.zeros(2, 78), [])
    with pytest.raises(RuntimeError, match="alibi_slopes must be"):
        module.forward(*args, 0.0, torch.zeros(1, 3), None, [])
    with pytest.raises(RuntimeError, match="softcap must be"):
        module.forward(*args, float("inf"), None, None, [])


def api_run(qkv, pattern, mods, dtype, key_mask=None):
    """(out, lse, dq, dk, dv, d_rel_bias or None) through `sparse_attention(..., backend="torch")`."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in qkv]
    mods = {n: (t.detach().to(dtype) if isinstance(t, torch.Tensor) else t) for n, t in mods.items()}
    if "alibi_slopes" in mods:  # float32 slopes, as the reference gets them
        mods["alibi_slopes"] = mods["alibi_slopes"].float()
    wrt = list(leaves)
    if "rel_bias" in mods:
        wrt.append(mods["rel_bias"].requires_grad_(True))
    out, lse = sa.sparse_attention(
        *leaves, pattern, backend="torch", key_mask=key_mask, return_lse=True, **mods
    )
    w_out, w_lse = loss_weights(out.shape, lse.shape, dtype)
    finite = torch.where(lse.isinf(), torch.zeros_like(lse), lse)
    grads = torch.autograd.grad((out.double() * w_out).sum() + (finite.double() * w_lse).sum(), wrt)
    return (out.detach(), lse.detach(), *grads, *([None] if len(grads) == 3 else []))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_through_sparse_attention(dtype, monkeypatch):
    """The public function on the "torch" backend hands a batch-shared layout and its modifiers to this
    kernel, and matches the float64 reference (GQA, key mask, every gradient incl. rel_bias')."""
    monkeypatch.setenv(cpu_kernel.ENGINE_ENV, "kernel")
    seen = []
    for name in ("forward", "backward"):
        real = getattr(cpu_kernel, name)

        def spy(*args, _real=real, _name=name, **kw):
            seen.append((_name, kw.get("mods", args[-1])))
            return _real(*args, **kw)

        monkeypatch.setattr(cpu_kernel, name, spy)
    b, hq, hkv, sq, skv = 2, 4, 2, 97, 161
    qkv = [t.to(dtype).double() for t in make_inputs(b, hq, hkv, sq, skv, 32)]
    key_mask = torch.ones(b, skv, dtype=torch.bool)
    key_mask[1, -30:] = False
    mods = make_mods(MOD_SETS["all"], b, hq, sq, skv)
    got = api_run(qkv, WINDOW_GLOBAL, mods, dtype, key_mask)
    assert [n for n, _ in seen] == ["forward", "backward"]
    assert all(m is not None and m.softcap == 2.0 and m.rel_bias is not None for _, m in seen)
    truth = reference_run(qkv, WINDOW_GLOBAL, mods, torch.float64, 1.0 / math.sqrt(32), key_mask)
    plain = reference_run(qkv, WINDOW_GLOBAL, mods, dtype, 1.0 / math.sqrt(32), key_mask)
    for name, g, t, p in zip(NAMES_WITH_BIAS, got, truth, plain, strict=True):
        assert not g.isnan().any(), f"{name} has NaN"
        err = max_err(g, t)
        allowed = 2 * max_err(p, t) + FLOORS[dtype] * max(1.0, t.abs().max().item())
        assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g}"


# A fresh process: a 16k-token window, forward + backward by the kernel with all three modifiers; prints the
# peak resident-set rise (MiB).
MEMORY_CHILD = r"""
import torch, sparse_attn as sa
from sparse_attn.backends import cpu_kernel
from sparse_attn.score_mods import check_score_mods
torch.set_num_threads(2)
seq, heads, dim = 16384, 2, 32
q, k, v = (torch.randn(1, heads, seq, dim) for _ in range(3))
mods = check_score_mods(30.0, torch.rand(heads), torch.randn(heads, 2 * seq - 1), q, k)
layout = sa.sliding_window(256).layout(seq, block_size=64)
cpu_kernel.load(strict=True)
def rss(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
before = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
out, lse = cpu_kernel.forward(q, k, v, layout, 0.2, None, mods)
grads = cpu_kernel.backward(torch.ones_like(out), None, q, k, v, out, lse, layout, 0.2, None, mods)
assert grads[3].shape == (heads, 2 * seq - 1)
print((rss("VmHWM:") - before) / 1024)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="needs Linux /proc peak-RSS reset")
def test_16k_window_memory_with_modifiers_is_linear():
    """out, lse, the three gradients (4 MiB each), the kernel's copies and d_rel_bias' partial sums (a few
    MiB: proportional to the kept blocks); one fp32 S x S matrix per head would be 1 GiB."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD], capture_output=True, text=True, check=True, timeout=300
    )
    rise_mib = float(done.stdout.strip().splitlines()[-1])
    assert rise_mib < 80, f"peak memory rose by {rise_mib:.0f} MiB"
