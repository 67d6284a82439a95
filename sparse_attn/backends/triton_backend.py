"""Triton backend: the block-sparse kernels in `sparse_attn.triton_kernels` (CUDA, or the interpreter on CPU).

Triton is imported only here, on first use, so ``import sparse_attn`` works without it. The layout's block
size must be a multiple of a kernel tile (32 or 64 rows/keys); `DEFAULT_BLOCK_SIZE` is what patterns are
built with when the caller passes a `Pattern`.
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK_SIZE = 64


def _kernels():
    from sparse_attn.triton_kernels import launch

    return launch


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take all four strides, but a unit last stride keeps their loads vectorised."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q, layout) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton backend takes float16, bfloat16 or float32, got {q.dtype}")
    launch = _kernels()
    for kernel in ("fwd", "dkdv", "dq"):
        launch.fitting_configs(kernel, q.shape[-1], layout.block_q, layout.block_k)


def forward(q, k, v, layout, scale, key_mask):
    """``(out, lse)``: out like q, lse float32 ``[B, Hq, Sq]`` (natural log; -inf for rows with no key)."""
    _check(q, layout)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _kernels().attention_fwd(q, k, v, layout.to(q.device), float(scale), key_mask)


def backward(do, dlse, q, k, v, out, lse, layout, scale, key_mask):
    """``(dq, dk, dv)``; `dlse` (or None) enters as ``delta = rowsum(dO * O) - dlse``."""
    _check(q, layout)
    do, q, k, v, out = (_last_dim_contiguous(t) for t in (do, q, k, v, out))
    return _kernels().attention_bwd(do, dlse, q, k, v, out, lse, layout.to(q.device), float(scale), key_mask)
