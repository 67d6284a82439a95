"""Triton's interpreter multiplies bf16 `tl.dot` operands as raw uint16 bits (Triton 3.9).

`conftest.py` patches that in the test setup. This test runs a bf16 dot with the *original* interpreter
code and expects garbage: when it starts failing, the upstream bug is fixed and the patch can be dropped.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpreterBuilder  # noqa: E402


@triton.jit
def _dot_kernel(A, B, C, N: tl.constexpr):
    offs = tl.arange(0, N)
    a = tl.load(A + offs[:, None] * N + offs[None, :])
    b = tl.load(B + offs[:, None] * N + offs[None, :])
    tl.store(C + offs[:, None] * N + offs[None, :], tl.dot(a, b))


def bf16_dot_error() -> float:
    a, b = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16)
    expected = a.float() @ b.float()
    return ((c - expected).abs().max() / expected.abs().max()).item()


def test_raw_interpreter_bf16_dot_is_still_broken_upstream(monkeypatch):
    monkeypatch.setattr(InterpreterBuilder, "create_dot", InterpreterBuilder.unpatched_create_dot)
    assert bf16_dot_error() > 1e3, "Triton's interpreter bf16 dot works now: drop the patch in conftest.py"


def test_patched_interpreter_bf16_dot_is_exact():
    assert bf16_dot_error() < 1e-5


def test_bf16_is_refused_through_the_unpatched_interpreter(monkeypatch):
    """Outside these tests nothing patches the interpreter: bf16 must raise, not return garbage."""
    import sparse_attn as sa
    from sparse_attn.backends import triton_backend

    monkeypatch.setattr(InterpreterBuilder, "create_dot", InterpreterBuilder.unpatched_create_dot)
    triton_backend._interpreter_bf16_dot_works.cache_clear()
    q = torch.randn(1, 1, 32, 16).to(torch.bfloat16)
    try:
        with pytest.raises(TypeError, match="bfloat16 gives wrong results through Triton's interpreter"):
            sa.sparse_attention(q, q, q, sa.causal(), backend="triton")
    finally:
        triton_backend._interpreter_bf16_dot_works.cache_clear()
