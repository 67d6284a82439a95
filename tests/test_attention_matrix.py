"""The shared test matrix: every backend against the float64 reference, forward and every gradient.

Each case runs on both backends: "torch" (the PyTorch backend) and "triton" (the real kernels through
Triton's interpreter; `conftest.py` sets TRITON_INTERPRET=1). Shapes are small so the interpreter stays
fast. A backend's error in out, lse, dq, dk and dv may be at most twice the error the plain reference
math has in the input dtype, plus a small floor. The loss weights both out and the finite entries of lse,
so the gradient flowing into lse is exercised too. The torch backend is also checked with
`torch.autograd.gradcheck` in float64.

``SPARSE_ATTN_TEST_DEVICE=cuda`` (set by `make gpu-check`, with TRITON_INTERPRET=0) puts every input on
the GPU: the "triton" cases then run the real compiled kernels against the float64 reference there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch
from reference_check import (
    MOD_SETS,
    assert_close_to_reference,
    assert_close_with_mods,
    loss_of,
    make_mods,
    run_with_grads,
)

import sparse_attn as sa
from sparse_attn.reference import attention_reference

BACKENDS = ("torch", "triton")
DEVICE = torch.device(os.environ.get("SPARSE_ATTN_TEST_DEVICE", "cpu"))


@dataclass
class Case:
    """One attention problem: a pattern, shapes, options."""

    pattern: object
    b: int = 1
    hq: int = 2
    hkv: int | None = None
    sq: int = 161
    skv: int | None = None
    d: int = 64
    dtype: torch.dtype = torch.float32
    key_mask: str | None = None  # "right" or "left" padding
    transposed: bool = False  # q, k, v as non-contiguous views of [B, S, H, D] tensors
    extra: dict = field(default_factory=dict)


def _block_layout(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(3, 3, generator=g) < 0.5
    layout[1] = False  # an empty query block: its rows see nothing
    layout[0, 0] = True
    return layout


CASES = {
    "window": Case(sa.sliding_window(40)),
    "window-asym-97": Case(sa.sliding_window(50, 7), sq=97),
    "dilated": Case(sa.dilated(12, dilation=3)),
    "global": Case(sa.global_tokens(5)),
    "global-positions": Case(sa.global_tokens([0, 70, 150])),
    "causal": Case(sa.causal()),
    "block-sparse": Case(sa.block_sparse(_block_layout(0), 64)),
    "random-blocks": Case(sa.random_blocks(2, 32, seed=3)),
    "longformer": Case(sa.longformer(20, 3)),
    "bigbird": Case(sa.bigbird(window=32, global_tokens=8, num_random_blocks=2, block_size=32)),
    "composition": Case((sa.sliding_window(30) | sa.global_tokens(4)) & sa.causal()),
    "per-head": Case(sa.per_head([sa.sliding_window(16), sa.causal() & sa.global_tokens(20)])),
    "gqa": Case(sa.sliding_window(40), hq=4, hkv=2, b=2),
    "mqa-per-head": Case(sa.per_head([sa.causal(), sa.sliding_window(9)]), hq=2, hkv=1, b=2),
    "sq<skv": Case(sa.causal(), sq=97, skv=161),
    "sq>skv-empty-rows": Case(sa.causal() | sa.sliding_window(3), sq=161, skv=97),
    "decode": Case(sa.sliding_window(50), sq=1, skv=161),
    "decode-global": Case(sa.longformer(8, 2), sq=1, skv=97, hq=4, hkv=1),
    "key-mask-right": Case(sa.sliding_window(40), b=2, key_mask="right"),
    "key-mask-left-gqa": Case(sa.longformer(30, 2), b=2, hq=4, hkv=2, key_mask="left"),
    "length-1": Case(sa.sliding_window(4), sq=1, skv=1, d=16),
    "head-dim-40": Case(sa.sliding_window(40), d=40, sq=97),
    "head-dim-24-gqa": Case(
        sa.bigbird(window=16, global_tokens=4, num_random_blocks=1, block_size=32), d=24, hq=2, hkv=1
    ),
    "non-contiguous": Case(sa.sliding_window(30) | sa.global_tokens(2), transposed=True, hq=2, hkv=1),
    "dense": Case(sa.sliding_window(1000), sq=97),
    "fp16-window": Case(sa.sliding_window(40), dtype=torch.float16),
    "fp16-gqa-key-mask": Case(sa.longformer(24, 2), dtype=torch.float16, b=2, hq=2, hkv=1, key_mask="right"),
    "bf16-bigbird": Case(
        sa.bigbird(window=32, global_tokens=8, num_random_blocks=2, block_size=32), dtype=torch.bfloat16
    ),
    "bf16-decode": Case(sa.sliding_window(50), dtype=torch.bfloat16, sq=1, skv=161),
}
# Only the PyTorch backend takes float64 and head dims outside 16..256.
TORCH_ONLY = {
    "fp64-window": Case(sa.sliding_window(40), dtype=torch.float64),
    "head-dim-7": Case(sa.sliding_window(20), d=7, sq=97),
    "head-dim-300": Case(sa.causal(), d=300, sq=97, hq=1),
}


def make_inputs(case: Case, seed: int = 0):
    """float64 q, k, v (and the key mask) for a case; transposed cases are non-contiguous views."""
    g = torch.Generator().manual_seed(seed)
    hkv = case.hq if case.hkv is None else case.hkv
    skv = case.sq if case.skv is None else case.skv
    shapes = [(case.b, case.hq, case.sq, case.d), (case.b, hkv, skv, case.d), (case.b, hkv, skv, case.d)]
    qkv = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    key_mask = None
    if case.key_mask:
        key_mask = torch.ones(case.b, skv, dtype=torch.bool)
        for i in range(case.b):
            pad = 13 + 20 * i
            if case.key_mask == "right":
                key_mask[i, skv - pad :] = False
            else:
                key_mask[i, :pad] = False
    return [t.to(DEVICE) for t in qkv], None if key_mask is None else key_mask.to(DEVICE)


def as_leaves(qkv, dtype, transposed: bool):
    """Leaf tensors in `dtype`; with `transposed`, non-contiguous views of ``[B, S, H, D]`` storage."""
    leaves = []
    for t in qkv:
        if transposed:
            leaves.append(t.detach().transpose(1, 2).to(dtype, copy=True).contiguous().requires_grad_(True))
        else:
            leaves.append(t.detach().to(dtype, copy=True).requires_grad_(True))
    views = [t.transpose(1, 2) if transposed else t for t in leaves]
    return leaves, views


def run(fn, qkv, dtype, transposed=False):
    """(out, lse, dq, dk, dv) of ``fn(q, k, v) -> (out, lse)`` on leaves of `dtype`."""
    leaves, views = as_leaves(qkv, dtype, transposed)
    out, lse = fn(*views)
    loss_of(out, lse).backward()
    grads = [t.grad.transpose(1, 2) if transposed else t.grad for t in leaves]
    return [out.detach(), lse.detach(), *grads]


def check_case(case: Case, backend: str):
    qkv, key_mask = make_inputs(case)
    kw = {"key_mask": key_mask}
    qkv = [t.to(case.dtype).double() for t in qkv]  # the same rounded inputs for every run

    def ours(q, k, v):
        return sa.sparse_attention(q, k, v, case.pattern, backend=backend, return_lse=True, **kw)

    def reference(q, k, v):
        return attention_reference(q, k, v, case.pattern, **kw)

    got = run(ours, qkv, case.dtype, case.transposed)
    truth = run(reference, qkv, torch.float64)
    plain = run(reference, qkv, case.dtype)
    assert_close_to_reference(got, truth, plain, case.dtype)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, backend):
    check_case(CASES[name], backend)


@pytest.mark.parametrize("name", list(TORCH_ONLY))
def test_torch_only_cases(name):
    check_case(TORCH_ONLY[name], "torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_are_zero_with_zero_grads(backend):
    """Rows that see nothing: out exactly 0, lse -inf, zero gradients, no NaN anywhere."""
    case = Case(sa.causal(), sq=161, skv=97)  # query rows 0..63 sit before the first key
    qkv, _ = make_inputs(case)
    out, lse, dq, _, _ = run(
        lambda q, k, v: sa.sparse_attention(q, k, v, case.pattern, backend=backend, return_lse=True),
        qkv,
        torch.float32,
    )
    empty = torch.arange(161, device=DEVICE) < 64
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
    assert bool((lse[:, :, empty] == float("-inf")).all()) and bool(lse[:, :, ~empty].isfinite().all())
    assert torch.equal(dq[:, :, empty], torch.zeros_like(dq[:, :, empty]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_mask_hiding_every_key_gives_empty_rows(backend):
    qkv, _ = make_inputs(Case(sa.sliding_window(20), b=2, sq=97))
    key_mask = torch.ones(2, 97, dtype=torch.bool, device=DEVICE)
    key_mask[1] = False
    got = run(
        lambda q, k, v: sa.sparse_attention(
            q, k, v, sa.sliding_window(20), key_mask=key_mask, backend=backend, return_lse=True
        ),
        qkv,
        torch.float32,
    )
    out, lse, dq, dk, dv = got
    assert bool((lse[1] == float("-inf")).all()) and bool(lse[0].isfinite().all())
    for t in (out, dq, dk, dv):
        assert not t.isnan().any() and torch.equal(t[1], torch.zeros_like(t[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pattern_without_any_block(backend):
    qkv, _ = make_inputs(Case(sa.causal(), sq=97))
    nothing = sa.block_sparse(torch.zeros(2, 2, dtype=torch.bool), 64)
    out, lse, dq, dk, dv = run(
        lambda q, k, v: sa.sparse_attention(q, k, v, nothing, backend=backend, return_lse=True),
        qkv,
        torch.float32,
    )
    assert bool((lse == float("-inf")).all())
    for t in (out, dq, dk, dv):
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_lse_false_returns_the_same_output(backend):
    qkv, _ = make_inputs(Case(sa.sliding_window(30), sq=97))
    q, k, v = (t.float() for t in qkv)
    out = sa.sparse_attention(q, k, v, sa.sliding_window(30), backend=backend)
    out2, _ = sa.sparse_attention(q, k, v, sa.sliding_window(30), backend=backend, return_lse=True)
    assert isinstance(out, torch.Tensor) and torch.equal(out, out2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_pattern_equals_sdpa(backend):
    qkv, _ = make_inputs(Case(sa.sliding_window(500), sq=97))
    q, k, v = (t.float() for t in qkv)
    out = sa.sparse_attention(q, k, v, sa.sliding_window(500), backend=backend)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_is_deterministic(backend):
    case = CASES["bigbird"]
    qkv, _ = make_inputs(case)
    fn = lambda q, k, v: sa.sparse_attention(q, k, v, case.pattern, backend=backend, return_lse=True)
    first, second = run(fn, qkv, torch.float32), run(fn, qkv, torch.float32)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


GRADCHECK = {
    "window": (sa.sliding_window(5), dict(sq=40)),
    "bigbird-gqa": (
        sa.bigbird(window=4, global_tokens=2, num_random_blocks=1, block_size=8),
        dict(hq=2, hkv=1),
    ),
    "per-head-sq<skv": (sa.per_head([sa.causal(), sa.sliding_window(3, 9)]), dict(sq=24, skv=37)),
    "key-mask-decode": (sa.sliding_window(11) | sa.global_tokens(1), dict(sq=1, key_mask=True)),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_torch_float64(name):
    """gradcheck of out and the finite lse, with 8x8 blocks so that rows span many blocks of each kind."""
    pattern, shape = GRADCHECK[name]
    sq, hq, hkv = shape.get("sq", 33), shape.get("hq", 2), shape.get("hkv", 2)
    skv = shape.get("skv", 33)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, hq, sq, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(1, hkv, skv, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)
    )
    heads = hq if pattern.num_heads else None
    layout = pattern.layout(sq, skv, block_size=8, heads=heads)
    key_mask = None
    if shape.get("key_mask"):
        key_mask = torch.ones(1, skv, dtype=torch.bool)
        key_mask[0, -5:] = False

    def fn(q, k, v):
        out, lse = sa.sparse_attention(q, k, v, layout, key_mask=key_mask, backend="torch", return_lse=True)
        return out, lse.masked_fill(lse.isinf(), 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mods", ["softcap", "alibi-per-batch", "rel_bias", "all"])
def test_score_modifiers_match_reference(backend, mods):
    """Score modifiers on each backend against the reference (on the GPU too, under `make gpu-check`)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 97, 64, generator=g, dtype=torch.float64).to(DEVICE)
    k, v = (torch.randn(2, 2, 130, 64, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(2))
    chosen = make_mods(MOD_SETS[mods], 2, 4, 97, 130).items()
    kwargs = {n: (t.to(DEVICE) if isinstance(t, torch.Tensor) else t) for n, t in chosen}
    pattern = sa.causal() | sa.sliding_window(40, 10)

    def ours(*qkv, **m):
        return sa.sparse_attention(*qkv, pattern, backend=backend, return_lse=True, **m)

    def ref(*qkv, **m):
        return attention_reference(*qkv, pattern, **m)

    got = run_with_grads(ours, q, k, v, kwargs, torch.float32)
    truth = run_with_grads(ref, q, k, v, kwargs, torch.float64)
    assert_close_with_mods(got, truth, run_with_grads(ref, q, k, v, kwargs, torch.float32), torch.float32)
