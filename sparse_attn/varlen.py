"""`sparse_attention_varlen`: FlashAttention's packed variable-length convention over the per-batch machinery.

Sequences are packed back to back, ``q`` ``[Tq, Hq, D]`` and ``k``/``v`` ``[Tk, Hkv, D]``, delimited by
``cu_seqlens_q``/``cu_seqlens_k``. The packed tensors are one sequence of a batch of one (``[1, H, T, D]``
views, no copy) and the layout keeps every sequence apart: its segments (`patterns.documents.Segments`) are
the sequences, each with its own shift ``delta_n = cu_k[n + 1] - cu_q[n + 1]``, so that the pattern's
``qpos - j`` is that of the sequence alone, bottom-right aligned within it. The diagonal bands (causal,
sliding and dilated windows) and their unions and intersections apply within each sequence this way;
other patterns (global tokens, block-sparse, random blocks, documents) have no per-sequence meaning here
and raise.
"""

from __future__ import annotations

import functools

import torch

from . import _ops, backends
from .api import _check_inputs
from .geometry import BlockSet, Geometry
from .layout import BlockLayout
from .patterns import Pattern
from .patterns._blockset import combine
from .patterns.base import Intersection, PerHead, Union, check_layout_block_size
from .patterns.documents import Segments, segment_band_blocks
from .patterns.window import UNBOUNDED, _Band
from .score_mods import check_score_mods


def sparse_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    block_size=None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
):
    """Attention over packed variable-length sequences, each with `pattern` applied to it alone.

    Args:
        q: ``[Tq, Hq, D]``; k, v: ``[Tk, Hkv, D]`` with ``Hq % Hkv == 0``: sequences packed back to back.
        cu_seqlens_q, cu_seqlens_k: int32 ``[N + 1]``, starting at 0, non-decreasing, ending at Tq / Tk.
            Sequence n's queries ``q[cu_seqlens_q[n]:cu_seqlens_q[n + 1]]`` see only its own keys. Empty
            sequences are allowed; a sequence with queries but no keys gives output 0 and lse -inf.
        pattern: applied within each sequence, bottom-right aligned within it (a single query of a
            sequence is its last position): `causal()`, `sliding_window`, `dilated`, and their ``&``/``|``
            and `per_head` combinations; None attends to the whole sequence.
        block_size: the layout block (defaults to the backend's).
        softcap, alibi_slopes: as in `sparse_attention` (FlashAttention's varlen has both); ALiBi slopes
            ``[Hq]`` measure ``|qpos - j|`` within each sequence, so they need ``cu_seqlens_q == cu_seqlens_k``
            (self-attention packing), where packed and per-sequence distances agree.

    Returns ``out`` ``[Tq, Hq, D]`` like q, and with ``return_lse=True`` also ``lse`` float32 ``[Hq, Tq]``.
    Differentiable in q, k and v. The layout is built from ``cu_seqlens`` (read once on the host).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [T, H, D] (packed sequences), got shape {tuple(t.shape)}")
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern or None, got {type(pattern).__name__}")
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got {len(cu_q) - 1} "
            f"and {len(cu_k) - 1}"
        )
    spec = backends.resolve(backend, q.device)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if q.shape[0] == 0 or k.shape[0] == 0:
        return _without_pairs(q, k, v, return_lse)
    scale = _check_inputs(q4, k4, v4, None, scale, spec)
    if alibi_slopes is not None and not torch.equal(cu_q, cu_k):
        raise ValueError(
            "alibi_slopes in sparse_attention_varlen need cu_seqlens_q == cu_seqlens_k (self-attention "
            "packing): only then is the packed distance |qpos - j| each sequence's own"
        )
    if alibi_slopes is not None and alibi_slopes.dim() != 1:
        raise ValueError(f"alibi_slopes must be [Hq={q.shape[1]}] here, got {tuple(alibi_slopes.shape)}")
    mods = check_score_mods(softcap, alibi_slopes, None, q4, k4)
    if block_size is None:
        block_size = spec.default_block_size
    layout = varlen_layout(pattern, cu_q, cu_k, block_size=block_size, heads=q.shape[1], device=q.device)
    out, lse = _ops.attention(q4, k4, v4, layout, scale, None, spec.name, mods)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out


def _check_cu_seqlens(name: str, cu: torch.Tensor, total: int) -> torch.Tensor:
    """`cu` on the CPU as int64 (one host read), after checking it delimits `total` packed positions."""
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64) or cu.dim() != 1:
        raise TypeError(f"{name} must be a 1-D int32 tensor [N + 1], got {getattr(cu, 'dtype', type(cu))}")
    if cu.is_meta:
        raise ValueError(f"{name} must hold data (a CPU or CUDA tensor, read on the host), got a meta tensor")
    cu = cu.cpu().long()
    if len(cu) == 0 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) != total:
        raise ValueError(
            f"{name} must start at 0, be non-decreasing and end at the packed length {total}, got "
            f"{cu.tolist() if len(cu) <= 16 else '...'}"
        )
    return cu


def _without_pairs(q, k, v, return_lse):
    """Outputs when one side is empty: out 0 (attached to the graph, so gradients are 0), lse -inf."""
    out = q * 0 + (k.sum() + v.sum()) * 0 if k.numel() else q * 0
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    return (out, lse) if return_lse else out


def varlen_layout(
    pattern: Pattern | None, cu_seqlens_q, cu_seqlens_k, *, block_size=128, heads=None, device=None
) -> BlockLayout:
    """The `BlockLayout` `sparse_attention_varlen` uses: ``[Tq, Tk]`` packed, with `pattern` inside each
    sequence (`cu_seqlens_*` as there)."""
    cu_q, cu_k = cu_seqlens_q.cpu().long(), cu_seqlens_k.cpu().long()
    block_q, block_k = check_layout_block_size(block_size)
    g = Geometry(int(cu_q[-1]), int(cu_k[-1]), block_q, block_k)
    segs = Segments(
        torch.zeros(len(cu_q) - 1, dtype=torch.long),
        cu_q[:-1],
        cu_q[1:],
        cu_k[:-1],
        cu_k[1:],
        cu_k[1:] - cu_q[1:],
    ).nonempty()
    if (
        pattern is not None
        and pattern.num_heads is not None
        and heads is not None
        and heads != pattern.num_heads
    ):
        raise ValueError(f"pattern defines {pattern.num_heads} heads, but q has {heads} heads")
    blocks = _segment_blocks(pattern, segs, g)
    return BlockLayout.from_block_set(blocks, g).to(device or "cpu")


def _segment_blocks(pattern: Pattern | None, segs: Segments, g: Geometry) -> BlockSet:
    """The pattern applied within every segment, as a `BlockSet` over the packed sequence."""
    if pattern is None:
        return segment_band_blocks(segs, g, None, -UNBOUNDED, UNBOUNDED)
    if isinstance(pattern, _Band):
        return segment_band_blocks(segs, g, None, pattern.lo, pattern.hi, pattern.dilation)
    if isinstance(pattern, Intersection):
        simpler = pattern.left.intersection(pattern.right) or pattern.right.intersection(pattern.left)
        if isinstance(simpler, _Band):
            return _segment_blocks(simpler, segs, g)
        left, right = _segment_blocks(pattern.left, segs, g), _segment_blocks(pattern.right, segs, g)
        return combine(left, right, g, "and")
    if isinstance(pattern, Union):
        left, right = _segment_blocks(pattern.left, segs, g), _segment_blocks(pattern.right, segs, g)
        return combine(left, right, g, "or")
    if isinstance(pattern, PerHead):
        return PerHead.blocks(_PerHeadOver(pattern, segs), g)
    raise ValueError(
        f"sparse_attention_varlen applies diagonal-band patterns (causal, sliding_window, dilated, their & / | "
        f"and per_head) within each sequence; {pattern!r} has no per-sequence meaning here. Pad the batch and "
        "use sparse_attention with key_mask, or documents(ids) on a packed sequence"
    )


class _PerHeadOver:
    """A `PerHead` whose items build their blocks within the segments (for `PerHead._blocks`)."""

    def __init__(self, pattern: PerHead, segs: Segments):
        self.patterns = [_Within(p, segs) for p in pattern.patterns]


class _Within:
    def __init__(self, pattern: Pattern, segs: Segments):
        self.blocks = functools.partial(_segment_blocks, pattern, segs)
