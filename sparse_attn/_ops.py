"""The autograd boundary: custom ops around a backend's forward and backward.

`torch.library.custom_op` makes attention one opaque node with a fake (meta) implementation, so
`torch.compile(fullgraph=True)` traces through `sparse_attention` without a graph break, and the
backward is registered once for every backend. A layout crosses as its tensors plus five ints. What a
backend module offers is described in `sparse_attn.backends`, whose registry maps the name to it.
"""

from __future__ import annotations

import torch

from . import backends
from .layout import BlockLayout


@torch.library.custom_op("sparse_attn::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout_tensors: list[torch.Tensor],
    layout_ints: list[int],
    key_mask: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    layout = BlockLayout.unflatten(layout_tensors, layout_ints)
    out, lse = backends.get(backend).module.forward(q, k, v, layout, scale, key_mask)
    # Outputs are contiguous whatever q's strides: the fake impl below promises exactly that to torch.compile.
    return out.contiguous(), lse.contiguous()


@attention_fwd.register_fake
def _(q, k, v, layout_tensors, layout_ints, key_mask, scale, backend):
    batch, heads, q_len, _ = q.shape
    lse_dtype = backends.get(backend).lse_dtype(q.dtype)
    return q.new_empty(q.shape), q.new_empty(batch, heads, q_len, dtype=lse_dtype)


@torch.library.custom_op("sparse_attn::attention_bwd", mutates_args=())
def attention_bwd(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout_tensors: list[torch.Tensor],
    layout_ints: list[int],
    key_mask: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    layout = BlockLayout.unflatten(layout_tensors, layout_ints)
    grads = backends.get(backend).module.backward(do, dlse, q, k, v, out, lse, layout, scale, key_mask)
    return tuple(g.contiguous() for g in grads)


@attention_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, layout_tensors, layout_ints, key_mask, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, layout_tensors, layout_ints, key_mask, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *layout_tensors, *([key_mask] if key_mask is not None else []))
    ctx.n_layout = len(layout_tensors)
    ctx.has_key_mask = key_mask is not None
    ctx.layout_ints, ctx.scale, ctx.backend = layout_ints, scale, backend


def _backward(ctx, do, dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    layout_tensors = rest[: ctx.n_layout]
    key_mask = rest[ctx.n_layout] if ctx.has_key_mask else None
    dq, dk, dv = attention_bwd(
        do.contiguous() if do.stride(-1) != 1 else do,
        dlse,
        q,
        k,
        v,
        out,
        lse,
        list(layout_tensors),
        ctx.layout_ints,
        key_mask,
        ctx.scale,
        ctx.backend,
    )
    return dq, dk, dv, [None] * ctx.n_layout, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "sparse_attention supports first-order gradients only: differentiating its backward (double "
        "backward, e.g. a gradient penalty or a Hessian-vector product through attention) is not "
        "implemented. create_graph=True works as long as the graph is not differentiated through attention."
    )


# Without this, the second backward fails with torch's generic "no autograd formula" message.
attention_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def attention(q, k, v, layout: BlockLayout, scale: float, key_mask, backend: str):
    """Differentiable ``(out, lse)`` through the custom ops."""
    tensors, ints = layout.flatten()
    return attention_fwd(q, k, v, tensors, ints, key_mask, scale, backend)
