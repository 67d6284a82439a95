"""sparse-attn's Triton kernels, installed as `sparse_attn.triton_kernels` (never as top-level `triton_kernels`).

- `bsattn`: the ``@triton.jit`` kernels (block-sparse FlashAttention-2 forward, delta preprocess, dK/dV and
  dQ), nothing else.
- `launch`: allocation, config choice (pinned or autotuned), grids and calls: `attention_fwd` returns
  ``(out, lse)``, `attention_bwd` returns ``(dq, dk, dv, d_rel_bias)``.

Importing this package imports Triton; `sparse_attn` itself only does so through its Triton backend.
"""
