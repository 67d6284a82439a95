"""`sparse_attention`: the documented public function. Validates, builds or checks the layout, dispatches."""

from __future__ import annotations

import math
import numbers

import torch

from . import _ops, backends
from .layout import BlockLayout
from .patterns import Pattern
from .patterns.topk import selects
from .score_mods import check_score_mods
from .selection import select_layout

#: Largest |scale| for fp16/bf16/fp32 inputs: float32 scores then overflow only if |q . k| > 1.8e19.
MAX_SCALE = 2.0**64


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern_or_layout,
    *,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
):
    """Attention of `q` over `k`, `v` restricted to a sparsity pattern, exactly.

    Args:
        q: ``[B, Hq, Sq, D]``; k, v: ``[B, Hkv, Skv, D]`` with ``Hq % Hkv == 0``. fp16, bf16 or fp32
            (float64 too on the PyTorch backend). Only the last dimension needs to be contiguous.
        pattern_or_layout: a `Pattern`, or a `BlockLayout` built for ``(Sq, Skv)``. A pattern holding
            `topk_blocks` is selected from q and k in this call (see `select_layout`). A `tile_major`
            pattern runs in its tile-major token order: q, k, v are permuted into it and out back.
        scale: multiplies ``q @ k^T``; defaults to ``1 / sqrt(D)``.
        key_mask: bool ``[B, Skv]``, True for a real key (padding is False).
        return_lse: also return the natural-log logsumexp ``[B, Hq, Sq]``, float32 (float64 for float64
            inputs).
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.
        softcap: c > 0 caps the scaled scores as ``c * tanh(s / c)`` (Gemma 2's logit soft-capping).
        alibi_slopes: ``[Hq]`` or ``[B, Hq]``; adds ``-slope * |qpos - j|`` after the softcap (FlashAttention's
            convention, qpos the bottom-right aligned query position below). No gradient.
        rel_bias: ``[Hq, Sq + Skv - 1]``; adds ``rel_bias[h, j - qpos + Skv - 1]`` (a bias of the relative
            position, e.g. T5's, gathered per diagonal); differentiable.

    Modifiers apply in the order scale, softcap, ALiBi, rel_bias, then the mask (`sparse_attn.score_mods`).
    Queries are aligned bottom-right: row i sits at position ``i + Skv - Sq``. A query with no visible key
    gets output 0 and lse -inf.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False, got {return_lse!r}")
    if isinstance(pattern_or_layout, Pattern) and pattern_or_layout.reorders_tokens:
        # tile_major: attend in the pattern's token order, hand out and lse back in the user's.
        tiled = pattern_or_layout
        q, k, v, key_mask = _to_layout_order(tiled, q, k, v, key_mask, alibi_slopes, rel_bias)
        out, lse = sparse_attention(
            q,
            k,
            v,
            tiled.permuted,
            scale=scale,
            key_mask=key_mask,
            return_lse=True,
            backend=backend,
            softcap=softcap,
        )
        out, lse = tiled.to_user_order(out, 2), tiled.to_user_order(lse, 2)
        return (out, lse) if return_lse else out
    spec = backends.resolve(backend, q.device if isinstance(q, torch.Tensor) else None)
    scale = _check_inputs(q, k, v, key_mask, scale, spec)
    mods = check_score_mods(softcap, alibi_slopes, rel_bias, q, k)
    if isinstance(pattern_or_layout, Pattern) and selects(pattern_or_layout):
        # Content-selected blocks (topk_blocks): chosen from q and k on their device, inside the graph
        # under torch.compile (fixed sizes, no host synchronisation).
        layout = select_layout(pattern_or_layout, q, k, block_size=spec.default_block_size, key_mask=key_mask)
    else:
        layout = _resolve_layout(pattern_or_layout, q, k, spec.default_block_size)
    out, lse = _ops.attention(q, k, v, layout, scale, key_mask, spec.name, mods)
    return (out, lse) if return_lse else out


def _to_layout_order(pattern, q, k, v, key_mask, alibi_slopes, rel_bias):
    """q, k, v (and a ``[B, Skv]`` key_mask) permuted into a reordering pattern's token order: exact and
    differentiable (an index_select)."""
    if alibi_slopes is not None or rel_bias is not None:
        raise ValueError(
            "alibi_slopes and rel_bias depend on token positions, which tile_major reorders: "
            "use the pattern without tile_major"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D]")
    pattern.check_lengths(q.shape[2], k.shape[2])
    q, k, v = (pattern.to_layout_order(t, 2) for t in (q, k, v))
    if isinstance(key_mask, torch.Tensor) and key_mask.dim() == 2:
        key_mask = pattern.to_layout_order(key_mask, 1)
    return q, k, v, key_mask


def _check_inputs(q, k, v, key_mask, scale, spec: backends.BackendSpec) -> float:
    """Validate shapes, dtypes and devices; return the scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
    if q.dtype not in spec.dtypes:
        raise TypeError(
            f"q must be one of {[str(d) for d in spec.dtypes]} for backend {spec.name!r}, got {q.dtype}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.is_meta:
        # (torch.compile traces with fake tensors, which report their real device, not meta.)
        raise ValueError("q, k and v must hold data (CPU or CUDA tensors), got meta tensors")
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape [B, Hkv, Skv, D], got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must be [B={batch}, Hkv, Skv, D={head_dim}] to match q, got {tuple(k.shape)}")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({k.shape[1]})")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"sequence lengths must be >= 1, got Sq={q.shape[2]}, Skv={k.shape[2]}")
    if batch == 0 or heads == 0:
        # Empty batches or heads reach the backends' divisions (Hq=0 kills the process with SIGFPE).
        raise ValueError(f"batch size and query heads must be >= 1, got B={batch}, Hq={heads}")
    if spec.head_dims is not None and not spec.head_dims[0] <= head_dim <= spec.head_dims[1]:
        lo, hi = spec.head_dims
        raise ValueError(f"{spec.label} supports head dims {lo} to {hi}, got {head_dim}")
    if head_dim == 0:
        raise ValueError("head dim must be >= 1")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError("key_mask must be a bool tensor [B, Skv] (True marks a real key)")
        if key_mask.shape != (batch, k.shape[2]):
            raise ValueError(f"key_mask must be [B={batch}, Skv={k.shape[2]}], got {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            raise ValueError(f"key_mask must be on {q.device}, got {key_mask.device}")
    return check_scale(scale, head_dim, q.dtype)


def check_scale(scale, head_dim: int, dtype: torch.dtype) -> float:
    """The scale to use: ``1 / sqrt(head_dim)`` for None, else a finite real within float32's reach."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    if dtype != torch.float64 and abs(scale) > MAX_SCALE:
        # Scores are float32: beyond this, scale * q.k overflows (then NaN) for ordinary inputs.
        raise ValueError(
            f"|scale| must be <= 2**64 for {dtype} inputs (scores are computed in float32, whose range "
            f"ends at 3.4e38), got {scale!r}"
        )
    return float(scale)


def _resolve_layout(pattern_or_layout, q, k, block_size) -> BlockLayout:
    """The pattern's layout for these shapes, or the given layout after checking it fits them."""
    q_len, kv_len, heads = q.shape[2], k.shape[2], q.shape[1]
    if isinstance(pattern_or_layout, Pattern):
        per_head = pattern_or_layout.num_heads is not None
        if per_head and pattern_or_layout.num_heads != heads:
            raise ValueError(f"pattern defines {pattern_or_layout.num_heads} heads, but q has {heads} heads")
        batch = pattern_or_layout.batch_size
        if batch not in (None, 1, q.shape[0]):
            raise ValueError(
                f"pattern was built for {batch} batch elements, but q has batch size {q.shape[0]}"
            )
        args = (pattern_or_layout, q_len, kv_len, block_size, heads if per_head else None, str(q.device))
        if pattern_or_layout.from_data and torch.compiler.is_compiling():
            # A layout from data (document ids) must not become a trace-time constant: it is built eagerly,
            # outside the graph (one graph break; pass a prebuilt BlockLayout for fullgraph=True).
            return _build_layout_eagerly(*args)
        if torch.compiler.is_compiling():
            # Layout building is data-dependent host code: torch.compile runs it at trace time and the
            # layout enters the graph as constants (no graph break; a new length recompiles).
            return BlockLayout.unflatten(
                list(_traced_layout_tensors(*args)), list(_traced_layout_ints(*args))
            )
        return _build_layout(*args)
    if not isinstance(pattern_or_layout, BlockLayout):
        raise TypeError(f"expected a Pattern or a BlockLayout, got {type(pattern_or_layout).__name__}")
    layout = pattern_or_layout
    if (layout.q_len, layout.kv_len) != (q_len, kv_len):
        raise ValueError(
            f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}, but the inputs have "
            f"Sq={q_len}, Skv={kv_len}"
        )
    if layout.num_heads not in (1, heads):
        raise ValueError(f"layout has {layout.num_heads} heads; expected 1 (shared) or {heads} (query heads)")
    if layout.batch not in (None, 1, q.shape[0]):
        raise ValueError(
            f"layout has {layout.batch} batch elements; expected a shared layout or batch size {q.shape[0]}"
        )
    return layout.to(q.device)


def _build_layout(pattern, q_len, kv_len, block_size, heads, device) -> BlockLayout:
    return pattern.layout(q_len, kv_len, block_size=block_size, heads=heads, device=device)


def _build_layout_eagerly(*args) -> BlockLayout:
    """`_build_layout` outside the graph being traced (a graph break). Wrapped here, while compiling, so
    that importing sparse_attn does not import torch._dynamo."""
    return torch.compiler.disable(_build_layout)(*args)


def _constant_at_trace_time(fn):
    """``torch.compiler.assume_constant_result(fn)``, which only sets this flag, but without importing
    torch._dynamo (and with it triton) when sparse_attn is imported."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_at_trace_time
def _traced_layout_tensors(*args):
    """The layout's tensors as trace-time constants for torch.compile."""
    return tuple(_build_layout(*args).flatten()[0])


@_constant_at_trace_time
def _traced_layout_ints(*args):
    """The layout's geometry ints as trace-time constants for torch.compile."""
    return tuple(_build_layout(*args).flatten()[1])
