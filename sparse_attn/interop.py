"""Interop: `BlockLayout` to and from FlexAttention's `BlockMask`; patterns from xformers attention biases.

FlexAttention (``torch.nn.attention.flex_attention``) describes sparsity as we do: per query-block row, the
key blocks that need a token mask (``kv_num_blocks``/``kv_indices``, evaluated through ``mask_mod``) and
the ones that are entirely visible (``full_kv_num_blocks``/``full_kv_indices``). `to_flex` writes our row
lists into those tensors and gives a ``mask_mod`` that reads our bit-packed partial tiles, so flex computes
exactly our mask; `from_flex` reads a `BlockMask` back (evaluating its ``mask_mod`` on its partial blocks
only), so the result is exact without an S x S mask. Flex indexes query rows from 0 (no bottom-right
shift): a layout already holds row indices, so nothing moves.

xformers biases (``xformers.ops.fmha.attn_bias``) map to patterns where the pattern language expresses
them: local windows and causal masks from the bottom right, top-left causal, and block-diagonal masks with
equal-length blocks. Others raise ValueError.

Both read other projects' objects, so both check what they read and refuse what they do not recognise: a
`BlockMask` must be one (its block tensors of the documented ranks, an integer block size and lengths);
an xformers bias must be one of the listed classes exactly (not a subclass), the attributes read from it
(``window_left``/``window_right``, the private ``_window_size``, ``q_seqinfo.seqstart_py``) must be there
with the expected types, and the pattern must equal the bias's own ``materialize`` on small probe shapes
(any shape for block-diagonal masks up to 2^22 query-key pairs); a release that changes them raises.
"""

from __future__ import annotations

import torch

from .layout import BlockLayout
from .patterns import Pattern, block_sparse, causal, sliding_window
from .patterns.flex import FlexBlocks
from .patterns.window import top_left_causal

# -- FlexAttention -----------------------------------------------------------------------------------------


def to_flex(layout: BlockLayout):
    """A FlexAttention `BlockMask` with exactly `layout`'s mask (batch 1, `layout.num_heads` heads)."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(layout, BlockLayout):
        raise TypeError(f"to_flex expects a BlockLayout, got {type(layout).__name__}")
    kv_num_blocks, kv_indices = flex_rows(layout, "part")
    full_num_blocks, full_indices = flex_rows(layout, "full")
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_num_blocks,
        full_indices,
        BLOCK_SIZE=(layout.block_q, layout.block_k),
        mask_mod=_mask_mod(layout),
        seq_lengths=(layout.q_len, layout.kv_len),
    )


def flex_rows(layout: BlockLayout, kind: str):
    """Our row lists -> flex's ``num_blocks [1, H, nqb]`` and ``indices [1, H, nqb, nkb]`` (int32, padded with 0)."""
    heads, nqb, nkb = layout.num_heads, layout.num_q_blocks, layout.num_k_blocks
    ptr = getattr(layout, f"row_{kind}_ptr").long()
    e = layout.entries(kind, device=layout.device)
    indices = torch.zeros(heads, nqb, nkb, dtype=torch.int32, device=layout.device)
    indices[e.head, e.q_block, e.slot] = e.k_block.to(torch.int32)
    return (ptr[:, 1:] - ptr[:, :-1]).to(torch.int32)[None], indices[None]


def _mask_mod(layout: BlockLayout):
    """Flex ``mask_mod`` giving the layout exactly: full blocks True, partial ones from the packed tiles."""
    heads, nqb, nkb = layout.num_heads, layout.num_q_blocks, layout.num_k_blocks
    bq, bk = layout.block_q, layout.block_k
    # Per block: -2 empty, -1 full, else the tile id. Block-level, not token-level.
    block_tile = torch.full((heads, nqb, nkb), -2, dtype=torch.int64, device=layout.device)
    for kind in ("full", "part"):
        e = layout.entries(kind, device=layout.device)
        block_tile[e.head, e.q_block, e.k_block] = -1 if kind == "full" else e.tile
    tiles = layout.tiles.long()
    if tiles.shape[0] == 0:
        tiles = torch.zeros(1, bq, -(-bk // 32), dtype=torch.int64, device=layout.device)
    q_len, kv_len = layout.q_len, layout.kv_len

    def mask_mod(b, h, q_idx, kv_idx):
        head = h if heads > 1 else torch.zeros_like(h)
        tile = block_tile[head, q_idx // bq, kv_idx // bk]
        col = kv_idx % bk
        word = tiles[tile.clamp(min=0), q_idx % bq, col // 32]
        bit = ((word >> (col % 32)) & 1) == 1
        in_range = (q_idx < q_len) & (kv_idx < kv_len)
        return in_range & ((tile == -1) | ((tile >= 0) & bit))

    return mask_mod


def from_flex(block_mask) -> BlockLayout:
    """Read a FlexAttention `BlockMask` (batch 1) into an exact `BlockLayout` with its block size."""
    _check_block_mask(block_mask)
    return FlexBlocks(block_mask).layout(
        block_mask.seq_lengths[0],
        block_mask.seq_lengths[1],
        block_size=tuple(block_mask.BLOCK_SIZE),
        heads=None if block_mask.kv_num_blocks.shape[1] == 1 else block_mask.kv_num_blocks.shape[1],
        device=block_mask.kv_num_blocks.device,
    )


def _check_block_mask(block_mask) -> None:
    """Refuse anything but a `BlockMask` of the structure `FlexBlocks` reads (this torch's, as documented)."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"from_flex expects a torch.nn.attention.flex_attention.BlockMask, got {type(block_mask).__name__}"
        )
    problems = []
    for name, rank in (
        ("kv_num_blocks", 3),
        ("kv_indices", 4),
        ("full_kv_num_blocks", 3),
        ("full_kv_indices", 4),
    ):
        t = getattr(block_mask, name, None)
        if name.startswith("full") and t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != rank or t.is_floating_point():
            problems.append(f"{name} (an integer tensor of rank {rank})")
    for name in ("BLOCK_SIZE", "seq_lengths"):
        value = getattr(block_mask, name, None)
        if not (
            isinstance(value, tuple | list) and len(value) == 2 and all(isinstance(v, int) for v in value)
        ):
            problems.append(f"{name} (two ints)")
    if not callable(getattr(block_mask, "mask_mod", None)):
        problems.append("mask_mod (a function)")
    if problems:
        raise ValueError(
            f"this BlockMask (torch {torch.__version__}) does not have the structure from_flex reads: "
            + ", ".join(problems)
        )


# -- xformers --------------------------------------------------------------------------------------------


def pattern_from_xformers(bias) -> Pattern:
    """The pattern equal to an xformers attention bias (``xformers.ops.fmha.attn_bias``).

    Maps `LowerTriangularMask` (top-left causal), `LowerTriangularFromBottomRightMask` (`causal()`),
    `LocalAttentionFromBottomRightMask(l, r)` (`sliding_window(l, r)`),
    `LowerTriangularFromBottomRightLocalAttentionMask(w)` (`sliding_window(w - 1, 0)`), and
    `BlockDiagonalMask` / `BlockDiagonalCausalMask` / `BlockDiagonalCausalFromBottomRightMask` whose blocks
    all have one query length and one key length (the causal ones: equal lengths). Else ValueError.
    """
    from xformers.ops.fmha import attn_bias as ab

    kind = type(bias).__name__
    probe = None  # shapes on which the pattern must equal the bias's own materialised mask
    if type(bias) is ab.LowerTriangularMask:
        pattern, reach = top_left_causal(), 0
    elif type(bias) is ab.LowerTriangularFromBottomRightMask:
        pattern, reach = causal(), 0
    elif type(bias) is ab.LocalAttentionFromBottomRightMask:
        left, right = _xformers_attr(bias, "window_left", int), _xformers_attr(bias, "window_right", int)
        pattern, reach = sliding_window(left, right), left + right
    elif type(bias) is ab.LowerTriangularFromBottomRightLocalAttentionMask:
        window = _xformers_attr(bias, "_window_size", int)
        pattern, reach = sliding_window(window - 1, 0), window
    elif type(bias) in (
        ab.BlockDiagonalMask,
        ab.BlockDiagonalCausalMask,
        ab.BlockDiagonalCausalFromBottomRightMask,
    ):
        pattern, probe = _block_diagonal(bias, causal_blocks=type(bias) is not ab.BlockDiagonalMask)
    else:
        raise ValueError(
            f"xformers bias {kind} has no exact sparse-attn pattern (see pattern_from_xformers's docstring)"
        )
    if probe is None:
        n = min(reach, 60) + 4
        probe = [(n, n), (n - 3, n), (n, n - 3)]
    _check_against_materialize(bias, pattern, probe)
    return pattern


def _xformers_attr(obj, name: str, kind: type):
    """`obj.name`, checked to be a `kind` (xformers' attn_bias classes are read, so a release that renames or
    retypes what we read raises here instead of giving another mask)."""
    value = getattr(obj, name, None)
    if value is None or not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(
            f"xformers {type(obj).__name__} has no {kind.__name__} {name!r} as pattern_from_xformers reads it "
            "(an xformers release this version of sparse-attn does not know?)"
        )
    return value


def _check_against_materialize(bias, pattern: Pattern, shapes) -> None:
    """Refuse a mapping that differs from the bias's own mask (``materialize``, public) on `shapes`."""
    for q_len, kv_len in shapes:
        truth = bias.materialize((q_len, kv_len)) == 0
        if not torch.equal(pattern.mask(q_len, kv_len), truth):
            raise ValueError(
                f"xformers {type(bias).__name__} no longer means what pattern_from_xformers maps it to "
                f"({pattern!r} differs from its materialized mask at shape {(q_len, kv_len)})"
            )


#: Block-diagonal biases are checked against their materialised mask up to this many query-key pairs.
_MAX_PROBE_PAIRS = 1 << 22


def _block_diagonal(bias, causal_blocks: bool) -> tuple[Pattern, list]:
    q_lens = _lengths(_xformers_attr(_xformers_attr(bias, "q_seqinfo", object), "seqstart_py", list))
    k_lens = _lengths(_xformers_attr(_xformers_attr(bias, "k_seqinfo", object), "seqstart_py", list))
    if len(set(q_lens)) != 1 or len(set(k_lens)) != 1:
        raise ValueError(
            f"only block-diagonal masks with equal-length blocks map to a pattern, got {q_lens}, {k_lens}"
        )
    n, q_len, k_len = len(q_lens), q_lens[0], k_lens[0]
    if causal_blocks and q_len != k_len:
        raise ValueError(
            f"causal block-diagonal masks map only with equal query/key block lengths ({q_len} != {k_len})"
        )
    diagonal = block_sparse(torch.eye(n, dtype=torch.bool), (q_len, k_len))
    # Square blocks on the diagonal: the global causal mask restricted to them is causal inside each block.
    pattern = diagonal & causal() if causal_blocks else diagonal
    # A block-diagonal bias has one shape: its materialised mask is checked when it is small enough.
    shape = (n * q_len, n * k_len)
    return pattern, [shape] if shape[0] * shape[1] <= _MAX_PROBE_PAIRS else []


def _lengths(starts):
    return [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
