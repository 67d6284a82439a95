"""Triton backend: the block-sparse kernels in `sparse_attn.triton_kernels` (CUDA, or the interpreter on CPU).

Triton is imported only here, on first use, so ``import sparse_attn`` works without it. What it takes
(dtypes, head dims, block sizes) is registered in `sparse_attn.backends`; the layout's block size must be a
multiple of a kernel tile (32 or 64 rows/keys), checked here against the shipped configs. bfloat16 is
refused under Triton's interpreter while its bf16 ``tl.dot`` is broken upstream (it would give garbage,
silently).
"""

from __future__ import annotations

import functools
import os

import torch

_MAX_GRID_Y = 65535


def _kernels():
    from sparse_attn.triton_kernels import launch

    return launch


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take all four strides, but a unit last stride keeps their loads vectorised."""
    return t if t.stride(-1) == 1 else t.contiguous()


@functools.cache
def _interpreter_bf16_dot_works() -> bool:
    """Triton 3.9's interpreter multiplies bf16 ``tl.dot`` operands as raw uint16 bits (garbage results;
    the tests patch it in ``tests/conftest.py``). Probe once: a tiny causal bf16 forward against float32."""
    from ..patterns import causal

    n, d, scale = 32, 16, 0.25
    q, k, v = torch.linspace(-1, 1, 3 * n * d).view(3, 1, 1, n, d).to(torch.bfloat16).unbind(0)
    got, _ = _kernels().attention_fwd(q, k, v, causal().layout(n, n, block_size=32), scale)
    scores = q.float() @ k.float().transpose(-1, -2) * scale
    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    want = scores.softmax(-1) @ v.float()
    return bool((got.float() - want).abs().max() < 0.05)


def _check(q, layout) -> None:
    """What only this backend knows (dtypes and head dims were checked against its registry entry)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if q.dtype == torch.bfloat16 and interpreted and not _interpreter_bf16_dot_works():
        raise TypeError(
            "bfloat16 gives wrong results through Triton's interpreter (its tl.dot multiplies bf16 operands "
            "as raw bits): use float16 or float32 with TRITON_INTERPRET=1, or backend='torch' on the CPU"
        )
    if q.shape[0] * q.shape[1] > _MAX_GRID_Y:
        # Every kernel puts batch x heads on grid axis 1, which CUDA caps at 65,535.
        raise ValueError(
            f"the Triton backend takes batch x query heads <= {_MAX_GRID_Y}, got {q.shape[0]} x {q.shape[1]}: "
            "split the batch"
        )
    launch = _kernels()
    for kernel in ("fwd", "dkdv", "dq"):
        launch.fitting_configs(kernel, q.shape[-1], layout.block_q, layout.block_k)


def forward(q, k, v, layout, scale, key_mask, mods=None):
    """``(out, lse)``: out like q, lse float32 ``[B, Hq, Sq]`` (natural log; -inf for rows with no key).
    `mods` (a `sparse_attn.score_mods.ScoreMods` or None) switches the kernels' modifier flags on."""
    _check(q, layout)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    return _kernels().attention_fwd(q, k, v, layout.to(q.device), float(scale), key_mask, mods=mods)


def backward(do, dlse, q, k, v, out, lse, layout, scale, key_mask, mods=None):
    """``(dq, dk, dv, d_rel_bias)``; `dlse` (or None) enters as ``delta = rowsum(dO * O) - dlse``; d_rel_bias
    is None unless `mods` has a rel_bias (then shaped and typed like it)."""
    _check(q, layout)
    do, q, k, v, out = (_last_dim_contiguous(t) for t in (do, q, k, v, out))
    return _kernels().attention_bwd(
        do, dlse, q, k, v, out, lse, layout.to(q.device), float(scale), key_mask, mods=mods
    )
