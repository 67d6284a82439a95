"""The autograd boundary: custom ops around a backend's forward and backward.

`torch.library.custom_op` makes attention one opaque node with a fake (meta) implementation, so
`torch.compile(fullgraph=True)` traces through `sparse_attention` without a graph break, and the
backward is registered once for every backend. A layout crosses as its tensors plus its geometry ints; the
score modifiers (`sparse_attn.score_mods`) as a float and two optional tensors. What a
backend module offers is described in `sparse_attn.backends`, whose registry maps the name to it.
"""

from __future__ import annotations

import torch

from . import backends
from .layout import BlockLayout
from .score_mods import ScoreMods


def _mods(softcap, alibi_slopes, rel_bias) -> ScoreMods | None:
    mods = ScoreMods(softcap, alibi_slopes, rel_bias)
    return mods if mods.any else None


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
    softcap: float | None,
    alibi_slopes: torch.Tensor | None,
    rel_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    layout = BlockLayout.unflatten(layout_tensors, layout_ints)
    mods = _mods(softcap, alibi_slopes, rel_bias)
    out, lse = backends.get(backend).module.forward(q, k, v, layout, scale, key_mask, mods)
    # Outputs are contiguous whatever q's strides: the fake impl below promises exactly that to torch.compile.
    return out.contiguous(), lse.contiguous()


@attention_fwd.register_fake
def _(q, k, v, layout_tensors, layout_ints, key_mask, scale, backend, softcap, alibi_slopes, rel_bias):
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
    softcap: float | None,
    alibi_slopes: torch.Tensor | None,
    rel_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, d_rel_bias)``; without `rel_bias`, d_rel_bias is an empty tensor (an op returns tensors)."""
    layout = BlockLayout.unflatten(layout_tensors, layout_ints)
    mods = _mods(softcap, alibi_slopes, rel_bias)
    *grads, d_rel_bias = backends.get(backend).module.backward(
        do, dlse, q, k, v, out, lse, layout, scale, key_mask, mods
    )
    d_rel_bias = q.new_empty(0) if d_rel_bias is None else d_rel_bias.contiguous()
    return (*(g.contiguous() for g in grads), d_rel_bias)


@attention_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, layout_tensors, layout_ints, key_mask, scale, backend, *mods):
    rel_bias = mods[2]
    d_rel_bias = q.new_empty(0) if rel_bias is None else rel_bias.new_empty(rel_bias.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), d_rel_bias


def _setup_context(ctx, inputs, output):
    q, k, v, layout_tensors, layout_ints, key_mask, scale, backend, softcap, alibi_slopes, rel_bias = inputs
    out, lse = output
    optional = (key_mask, alibi_slopes, rel_bias)
    ctx.save_for_backward(q, k, v, out, lse, *layout_tensors, *(t for t in optional if t is not None))
    ctx.n_layout = len(layout_tensors)
    ctx.present = tuple(t is not None for t in optional)
    ctx.layout_ints, ctx.scale, ctx.backend, ctx.softcap = layout_ints, scale, backend, softcap


def _backward(ctx, do, dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    layout_tensors = rest[: ctx.n_layout]
    saved = iter(rest[ctx.n_layout :])
    key_mask, alibi_slopes, rel_bias = (next(saved) if present else None for present in ctx.present)
    dq, dk, dv, d_rel_bias = attention_bwd(
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
        ctx.softcap,
        alibi_slopes,
        rel_bias,
    )
    d_rel_bias = d_rel_bias if rel_bias is not None else None
    return dq, dk, dv, [None] * ctx.n_layout, None, None, None, None, None, None, d_rel_bias


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "sparse_attention supports first-order gradients only: differentiating its backward (double "
        "backward, e.g. a gradient penalty or a Hessian-vector product through attention) is not "
        "implemented. create_graph=True works as long as the graph is not differentiated through attention."
    )


# Without this, the second backward fails with torch's generic "no autograd formula" message.
attention_bwd.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _needs_normal_tensors(tensors) -> bool:
    # Compiling first: dynamo cannot trace is_inference_mode_enabled (traced layouts are normal constants).
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        return False
    return any(t.is_inference() for t in tensors)


def attention(
    q, k, v, layout: BlockLayout, scale: float, key_mask, backend: str, mods: ScoreMods | None = None
):
    """Differentiable ``(out, lse)`` through the custom ops (in q, k, v and `mods.rel_bias`)."""
    tensors, ints = layout.flatten()
    if _needs_normal_tensors(tensors):
        # A layout the caller built under inference mode (select_layout, BlockLayout.stack, ...), used to
        # train: autograd cannot save inference tensors, so a normal copy is made once per layout.
        tensors = layout.cached("normal tensors", lambda: [t.clone() for t in tensors])
    mods = mods or ScoreMods()
    return attention_fwd(
        q, k, v, tensors, ints, key_mask, scale, backend, mods.softcap, mods.alibi_slopes, mods.rel_bias
    )
