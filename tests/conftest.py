"""Test setup: Triton's interpreter runs the real kernels on the CPU.

TRITON_INTERPRET must be in the environment before triton is first imported, so it is set here, at
collection, before any test module imports sparse_attn's Triton backend.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_interpreter_bf16_dot():
    """Triton 3.9's interpreter stores bf16 as uint16 and `tl.dot` multiplies those raw bits (garbage).

    Test-side fix only: widen bf16 operands to float32 before the matmul. The kernels stay untouched, and
    `tests/test_triton_interpreter_bug.py` checks the upstream bug still exists, so this can go once fixed.
    The original stays reachable as `InterpreterBuilder.unpatched_create_dot`.
    """
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError:
        return None
    original = InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    if not hasattr(InterpreterBuilder, "unpatched_create_dot"):
        InterpreterBuilder.unpatched_create_dot = original
        InterpreterBuilder.create_dot = create_dot
    return original


_patch_interpreter_bf16_dot()


def _warm_up_float64_exp():
    """Seen with torch 2.13.0+cpu on this 2-vCPU Xeon: in about a third of fresh processes, the first
    multi-threaded float64 `torch.exp` after float64 matmuls and a softmax computes one thread's half of the
    tensor at reduced accuracy (relative error ~3e-9 instead of ~1e-16; later calls are exact). That is an
    error in the float64 reference, not in sparse-attn, and it made the 1e-12 comparisons flaky. One warm-up
    call here, large enough for every intra-op thread, absorbs it."""
    import torch

    x = torch.randn(4, 256, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.exp(torch.softmax(x @ x.transpose(-1, -2), -1))


_warm_up_float64_exp()
