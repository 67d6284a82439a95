"""Pictures of sparsity patterns and block layouts (matplotlib; works headless).

Everything is drawn from a `BlockLayout`, never from an S x S mask, so a 64k-token pattern costs about
as much to draw as a 64-token one. The token view is rendered at a bounded resolution (`max_pixels` per
axis): a pixel covers ``p x p`` tokens and records, exactly, which fraction of its pairs lies in full
blocks, in partial blocks, and in partial blocks *and* visible. Full blocks add their overlap with each
pixel (separable per axis); partial blocks add their bit-packed tiles, each distinct (tile, pixel phase)
projected to pixels once. At small sizes a pixel is one token and the picture is the exact token mask.

Colours: full blocks (all pairs visible, no mask work) are blue, partial blocks are orange (dark where a
pair is visible, light where it is masked), empty blocks (skipped) are white.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from .checks import check_int
from .layout import BlockLayout, unpack_tiles
from .patterns import Pattern
from .patterns.base import check_block_size

__all__ = [
    "GridView",
    "PatternImage",
    "legend_handles",
    "neighborhood_cells",
    "plot_density",
    "plot_heads",
    "plot_neighborhood",
    "plot_pattern",
    "render_layout",
    "visible_fraction",
]

#: RGB colours of the four kinds of pixel content.
COLOURS = {
    "full": (0.129, 0.400, 0.675),
    "partial_visible": (0.851, 0.373, 0.008),
    "partial_masked": (0.992, 0.855, 0.690),
    "empty": (1.0, 1.0, 1.0),
}
LABELS = {
    "full": "full block (all visible)",
    "partial_visible": "partial block: visible pair",
    "partial_masked": "partial block: masked pair",
    "empty": "empty block (skipped)",
}
# Scatter work per chunk (elements), bounding temporary memory whatever the layout size.
_CHUNK = 1 << 22


@dataclass
class PatternImage:
    """One head's layout at bounded resolution. Arrays are ``[rows, cols]`` float32 fractions of pixel area."""

    full: np.ndarray  # in full blocks (all visible)
    partial: np.ndarray  # in partial blocks (visible or not)
    partial_visible: np.ndarray  # in partial blocks and visible
    tokens_per_pixel: tuple[int, int]  # (query rows, keys) per pixel
    computed_pairs: int  # real pairs in kept blocks (what the kernels compute)
    visible_pairs: int  # pairs the pattern lets interact

    @property
    def visible(self) -> np.ndarray:
        """Fraction of each pixel's pairs that are visible."""
        return self.full + self.partial_visible

    @property
    def empty(self) -> np.ndarray:
        """Fraction of each pixel's pairs in empty (skipped) blocks."""
        return np.clip(1.0 - self.full - self.partial, 0.0, 1.0)


# -- rendering ------------------------------------------------------------------------------------------
def _as_layout(pattern_or_layout, q_len, kv_len, block_size, batch: int = 0) -> BlockLayout:
    """The CPU layout to draw: the given one (checked against q_len/kv_len), or the pattern's; of a
    per-batch layout (packed documents per batch element), batch element `batch`."""
    return _layout_to_draw(pattern_or_layout, q_len, kv_len, block_size).batch_element(batch)


def _layout_to_draw(pattern_or_layout, q_len, kv_len, block_size) -> BlockLayout:
    if isinstance(pattern_or_layout, BlockLayout):
        layout = pattern_or_layout.to("cpu")
        if q_len is not None and q_len != layout.q_len or kv_len is not None and kv_len != layout.kv_len:
            raise ValueError(
                f"layout was built for q_len={layout.q_len}, kv_len={layout.kv_len}, "
                f"but q_len={q_len}, kv_len={kv_len} were given"
            )
        return layout
    if isinstance(pattern_or_layout, Pattern):
        if q_len is None:
            raise TypeError("q_len is required to draw a Pattern (a BlockLayout knows its own lengths)")
        return pattern_or_layout.layout(q_len, kv_len, block_size=block_size)
    raise TypeError(f"expected a Pattern or a BlockLayout, got {type(pattern_or_layout).__name__}")


def _head_entries(layout: BlockLayout, kind: str, head: int):
    """(query block, key block, tile id or None) of one head's full or partial blocks."""
    e = layout.entries(kind)
    mine = e.head == head
    return e.q_block[mine], e.k_block[mine], None if e.tile is None else e.tile[mine]


def _axis_overlap(n_blocks: int, block: int, length: int, per_pixel: int):
    """For each block along one axis: its first pixel and its overlap (in tokens) with the next few pixels.

    Returns (first_pixel ``[n_blocks]``, overlap ``[n_blocks, m]``) where m bounds the pixels one block touches.
    """
    start = torch.arange(n_blocks) * block
    stop = (start + block).clamp(max=length)
    first = start // per_pixel
    m = (per_pixel - 1 + block - 1) // per_pixel + 1
    pix = first[:, None] + torch.arange(m)[None, :]
    p_start, p_stop = pix * per_pixel, ((pix + 1) * per_pixel).clamp(max=length)
    overlap = (torch.minimum(stop[:, None], p_stop) - torch.maximum(start[:, None], p_start)).clamp(min=0)
    return first, overlap.to(torch.float64)


def _scatter_blocks(image, qb, kb, first_q, first_k, values):
    """Add ``values[n, mq, mk]`` at the pixel windows of blocks (qb, kb); out-of-image pixels carry 0."""
    n, mq, mk = values.shape
    rows = (first_q[qb][:, None] + torch.arange(mq)).clamp(max=image.shape[0] - 1)
    cols = (first_k[kb][:, None] + torch.arange(mk)).clamp(max=image.shape[1] - 1)
    image.index_put_((rows[:, :, None], cols[:, None, :]), values, accumulate=True)


def _block_areas(image, qb, kb, axis_q, axis_k):
    """Add each block's real area to the pixels it covers (separable: row overlap x column overlap)."""
    (first_q, ov_q), (first_k, ov_k) = axis_q, axis_k
    step = max(1, _CHUNK // (ov_q.shape[1] * ov_k.shape[1]))
    for s in range(0, len(qb), step):
        q, k = qb[s : s + step], kb[s : s + step]
        _scatter_blocks(image, q, k, first_q, first_k, ov_q[q][:, :, None] * ov_k[k][:, None, :])


def _project_tiles(tiles, phase_q, phase_k, per_q, per_k, mq, mk):
    """Sum each tile's pairs per pixel: ``[n, bq, bk]`` bool -> ``[n, mq, mk]``, tile row a in local pixel
    ``(phase_q + a) // per_q`` (likewise for columns)."""
    n, bq, bk = tiles.shape
    out = torch.zeros(n, mq, mk, dtype=torch.float64)
    for pq in torch.unique(phase_q).tolist():
        for pk in torch.unique(phase_k).tolist():
            sel = torch.nonzero((phase_q == pq) & (phase_k == pk)).squeeze(1)
            if len(sel) == 0:
                continue
            local_q = (pq + torch.arange(bq)) // per_q
            local_k = (pk + torch.arange(bk)) // per_k
            t = tiles[sel].to(torch.float64)
            by_col = torch.zeros(len(sel), bq, mk, dtype=torch.float64).index_add_(2, local_k, t)
            out[sel] = torch.zeros(len(sel), mq, mk, dtype=torch.float64).index_add_(1, local_q, by_col)
    return out


def _add_visible_tile_pairs(image, layout, qb, kb, tile, per_pixel, axis_q, axis_k):
    """Add the visible pairs of partial blocks (qb, kb) with tiles `tile` to the pixels they fall in.

    A tile's contribution depends only on the tile and where the block starts within a pixel (its phase),
    so each distinct (tile, row phase, column phase) is projected to pixels once, then scattered.
    """
    if len(qb) == 0:
        return
    bq, bk = layout.block_size
    (first_q, ov_q), (first_k, ov_k) = axis_q, axis_k
    per_q, per_k = per_pixel
    phase_q, phase_k = (qb * bq) % per_q, (kb * bk) % per_k
    uniq, inverse = torch.unique((tile * per_q + phase_q) * per_k + phase_k, return_inverse=True)
    u_tile, u_pq, u_pk = uniq // (per_q * per_k), (uniq // per_k) % per_q, uniq % per_k
    mq, mk = ov_q.shape[1], ov_k.shape[1]
    step = max(1, _CHUNK // (bq * bk))
    projected = torch.cat(
        [
            _project_tiles(
                unpack_tiles(layout.tiles[u_tile[s : s + step]], bk),
                u_pq[s : s + step],
                u_pk[s : s + step],
                per_q,
                per_k,
                mq,
                mk,
            )
            for s in range(0, len(uniq), step)
        ]
    )
    step = max(1, _CHUNK // (mq * mk))
    for s in range(0, len(qb), step):
        sl = slice(s, s + step)
        _scatter_blocks(image, qb[sl], kb[sl], first_q, first_k, projected[inverse[sl]])


def _per_pixel(length: int, pixels: int) -> int:
    """Tokens per pixel along an axis of `length` tokens drawn in at most `pixels` pixels."""
    return -(-length // pixels)


def render_layout(layout: BlockLayout, head: int = 0, *, max_pixels: int = 1024) -> PatternImage:
    """Render one head of `layout` into at most ``max_pixels`` per axis, without an S x S mask."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"render_layout expects a BlockLayout, got {type(layout).__name__}")
    check_int("max_pixels", max_pixels, 1, wrong_type=ValueError)
    if not 0 <= head < layout.num_heads:
        raise ValueError(f"head must be in [0, {layout.num_heads}), got {head}")
    layout = layout.to("cpu")
    bq, bk = layout.block_size
    per_q, per_k = _per_pixel(layout.q_len, max_pixels), _per_pixel(layout.kv_len, max_pixels)
    rows, cols = -(-layout.q_len // per_q), -(-layout.kv_len // per_k)
    axis_q = _axis_overlap(layout.num_q_blocks, bq, layout.q_len, per_q)
    axis_k = _axis_overlap(layout.num_k_blocks, bk, layout.kv_len, per_k)

    full = torch.zeros(rows, cols, dtype=torch.float64)
    qb, kb, _ = _head_entries(layout, "full", head)
    _block_areas(full, qb, kb, axis_q, axis_k)

    partial = torch.zeros(rows, cols, dtype=torch.float64)
    partial_visible = torch.zeros(rows, cols, dtype=torch.float64)
    qb, kb, tile = _head_entries(layout, "part", head)
    _block_areas(partial, qb, kb, axis_q, axis_k)
    _add_visible_tile_pairs(partial_visible, layout, qb, kb, tile, (per_q, per_k), axis_q, axis_k)

    area = (
        _pixel_sizes(layout.q_len, per_q, rows)[:, None] * _pixel_sizes(layout.kv_len, per_k, cols)[None, :]
    )
    return PatternImage(
        full=(full / area).float().numpy(),
        partial=(partial / area).float().numpy(),
        partial_visible=(partial_visible / area).float().numpy(),
        tokens_per_pixel=(per_q, per_k),
        computed_pairs=round(float(full.sum() + partial.sum())),
        visible_pairs=round(float(full.sum() + partial_visible.sum())),
    )


def _pixel_sizes(length: int, per_pixel: int, n: int) -> torch.Tensor:
    """Tokens covered by each pixel along one axis (the last may be short)."""
    start = torch.arange(n) * per_pixel
    return ((start + per_pixel).clamp(max=length) - start).to(torch.float64)


def visible_fraction(layout: BlockLayout) -> float:
    """Fraction of query-key pairs the pattern makes visible (the token density), from the layout alone."""
    g = layout.geometry
    full = layout.entries("full")
    pairs = int((g.valid_rows(full.q_block) * g.valid_cols(full.k_block)).sum())
    tiles = layout.tiles.cpu()
    # Unpacked a chunk at a time: all tiles at once can take hundreds of MB at 64k tokens.
    step = max(1, _CHUNK // (layout.block_q * layout.block_k))
    bits = torch.cat(
        [
            unpack_tiles(tiles[s : s + step], layout.block_k).flatten(1).sum(1)
            for s in range(0, len(tiles), step)
        ]
        + [torch.zeros(0, dtype=torch.int64)]
    )
    pairs += int(bits[layout.row_part_tile.cpu().long()].sum()) if layout.num_partial else 0
    return pairs / (layout.num_heads * layout.q_len * layout.kv_len)


def to_rgb(img: PatternImage, gamma: float = 0.5, floor: float = 0.6) -> np.ndarray:
    """RGB float image ``[rows, cols, 3]``.

    A downsampled pixel mixes the class colours by area. Inside partial blocks the visible share is shown
    as ``max(share ** gamma, floor)`` when any pair is visible, so thin features (a few global tokens among
    128 per pixel) stay visible; at one token per pixel shares are 0 or 1 and the picture is exact.
    """
    c = {k: np.asarray(v, dtype=np.float32) for k, v in COLOURS.items()}
    share = np.divide(img.partial_visible, img.partial, out=np.zeros_like(img.partial), where=img.partial > 0)
    share = np.clip(share, 0.0, 1.0)
    share = np.where(share > 0, np.maximum(share**gamma, floor), 0.0)
    weights = {
        "full": img.full,
        "partial_visible": img.partial * share,
        "partial_masked": img.partial * (1.0 - share),
        "empty": img.empty,
    }
    return np.clip(sum(w[..., None] * c[k] for k, w in weights.items()), 0.0, 1.0)


# -- plotting -------------------------------------------------------------------------------------------
def _heads_to_draw(layout: BlockLayout, heads) -> list[int]:
    if heads is None:
        return list(range(layout.num_heads))
    chosen = [heads] if isinstance(heads, numbers.Integral) else list(heads)
    for h in chosen:
        if isinstance(h, bool) or not isinstance(h, numbers.Integral) or not 0 <= h < layout.num_heads:
            raise ValueError(f"heads must be head indices in [0, {layout.num_heads}), got {heads!r}")
    if not chosen:
        raise ValueError("heads must name at least one head")
    return [int(h) for h in chosen]


def _draw_head(ax, layout, head, *, max_pixels, title, show_grid=True):
    """Draw one head on `ax`; return its PatternImage."""
    img = render_layout(layout, head, max_pixels=max_pixels)
    q_len, kv_len = layout.q_len, layout.kv_len
    ratio = max(q_len, kv_len) / min(q_len, kv_len)
    shown = ax.imshow(
        to_rgb(img),
        extent=(0, kv_len, q_len, 0),
        interpolation="nearest",
        aspect="equal" if ratio <= 4 else "auto",
    )
    grid_note = _draw_block_grid(ax, layout) if show_grid else ""
    # A small margin, so rows and columns at the edges (global tokens) are not hidden under the spines.
    ax.set_xlim(-0.012 * kv_len, kv_len * 1.012)
    ax.set_ylim(q_len * 1.012, -0.012 * q_len)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel("key position j")
    offset = kv_len - q_len
    sign = "+" if offset > 0 else "-"
    ax.set_ylabel("query row i" + (f" (position i {sign} {abs(offset)})" if offset else ""))
    bq, bk = layout.block_size
    total = q_len * kv_len
    scale = img.tokens_per_pixel
    pixel_note = f", 1 px = {scale[0]}x{scale[1]} tokens" if scale != (1, 1) else ""
    info = (
        f"{q_len}x{kv_len} tokens, blocks {bq}x{bk}{grid_note}{pixel_note}\n"
        f"computed density {img.computed_pairs / total:.4f} (visible pairs {img.visible_pairs / total:.4f})"
    )
    ax.set_title(f"{title}\n{info}" if title else info, fontsize=9)
    _fit_to_axes(ax, shown, layout, head, img)
    return img


def _fit_to_axes(ax, shown, layout, head, img) -> None:
    """Re-render at most one image pixel per screen pixel of the laid-out axes (at the figure's dpi), so
    that nothing is resampled away: a downsampling display would blend a thin global row into its
    neighbours, while nearest-neighbour upsampling gives every rendered pixel at least one screen pixel."""
    ax.figure.draw_without_rendering()
    box = ax.get_window_extent()
    # The data spans 1 / 1.024 of the axes (the margin around the sequence).
    fit = max(1, int(min(box.width, box.height) / 1.024))
    if max(img.full.shape) > fit:
        shown.set_data(to_rgb(render_layout(layout, head, max_pixels=fit)))


def _draw_block_grid(ax, layout, max_lines: int = 32) -> str:
    """Block boundaries as thin lines (every k-th one when there are many) and a frame around the
    sequence; returns a note for the title."""
    from matplotlib.patches import Rectangle

    bq, bk = layout.block_size
    q_len, kv_len = layout.q_len, layout.kv_len
    many = -(-max(layout.num_q_blocks, layout.num_k_blocks) // max_lines)
    # A power of two, so the lines fall on round token positions.
    step = 1 << max(0, many - 1).bit_length()
    style = {"colors": "0.45", "linewidth": 0.4, "alpha": 0.6}
    ax.hlines([b * bq for b in range(step, layout.num_q_blocks, step)], 0, kv_len, **style)
    ax.vlines([b * bk for b in range(step, layout.num_k_blocks, step)], 0, q_len, **style)
    # The frame sits in the margin around the sequence, not on its first row and column (global tokens).
    pad_q, pad_k = 0.006 * q_len, 0.006 * kv_len
    corner, size = (-pad_k, -pad_q), (kv_len + 2 * pad_k, q_len + 2 * pad_q)
    ax.add_patch(Rectangle(corner, *size, fill=False, edgecolor="0.25", linewidth=0.8))
    return "" if step == 1 else f", grid every {step} blocks"


def _head_title(pattern_or_layout, head: int) -> str:
    """'head h' plus that head's own pattern when the source is a `per_head` pattern."""
    items = getattr(pattern_or_layout, "patterns", None)
    if not items:
        return f"head {head}"
    text = repr(items[head])
    return f"head {head}: " + (text if len(text) <= 44 else text[:41] + "...")


def legend_handles():
    from matplotlib.patches import Patch

    return [Patch(facecolor=COLOURS[k], edgecolor="0.3", label=LABELS[k]) for k in COLOURS]


def _new_figure(nrows=1, ncols=1, figsize=None):
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("sparse_attn.viz needs matplotlib: pip install 'sparse-attn[plots]'") from e
    return plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, constrained_layout=True)


def _tokens_label(n: int) -> str:
    """1024 -> '1k', 65536 -> '64k', 1000 -> '1000'."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    return f"{n >> 10}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _describe(pattern_or_layout) -> str:
    if isinstance(pattern_or_layout, BlockLayout):
        return "BlockLayout"
    text = repr(pattern_or_layout)
    return text if len(text) <= 70 else text[:67] + "..."


def plot_pattern(
    pattern_or_layout,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    block_size=128,
    heads=None,
    ax=None,
    max_pixels: int = 512,
    title: str | None = None,
    legend: bool = True,
    batch: int = 0,
):
    """Draw the token mask with the block grid over it; returns the matplotlib Figure.

    Empty, partial and full blocks are coloured apart (see the module docstring); the title gives the
    lengths, block size and density. `heads` picks which heads of a per-head pattern to draw (an index or
    a list; default all): several heads give a grid (`plot_heads`), one head draws on `ax` if given.
    Works at any length: at most `max_pixels` per axis are rendered, never an S x S mask. A per-batch
    pattern or layout (`documents` with ``[B, S]`` ids) draws batch element `batch`.
    """
    layout = _as_layout(pattern_or_layout, q_len, kv_len, block_size, batch)
    chosen = _heads_to_draw(layout, heads)
    title = _describe(pattern_or_layout) if title is None else title
    if len(chosen) > 1:
        if ax is not None:
            raise ValueError(f"ax draws one head; {len(chosen)} heads were asked for (pass heads=<index>)")
        # Panels are small: render at most 256 px so thin features get the visibility floor.
        return _heads_figure(layout, pattern_or_layout, chosen, None, min(max_pixels, 256), title)
    own_figure = ax is None
    if own_figure:
        _, axes = _new_figure(figsize=(6.4, 7.6))
        ax = axes[0, 0]
    label = f"{title} (head {chosen[0]})" if layout.num_heads > 1 else title
    _draw_head(ax, layout, chosen[0], max_pixels=max_pixels, title=label)
    if legend and own_figure:
        ax.figure.legend(
            handles=legend_handles(), loc="outside lower center", ncol=2, fontsize=8, frameon=False
        )
    elif legend:
        ax.legend(handles=legend_handles(), loc="upper right", fontsize=7, framealpha=0.9)
    return ax.figure


def plot_heads(
    pattern_or_layout,
    q_len: int | None = None,
    kv_len: int | None = None,
    *,
    block_size=128,
    heads=None,
    ncols: int | None = None,
    max_pixels: int = 256,
    title: str | None = None,
):
    """A grid with one panel per head (default: every head of the layout); returns the Figure."""
    layout = _as_layout(pattern_or_layout, q_len, kv_len, block_size)
    chosen = _heads_to_draw(layout, heads)
    title = _describe(pattern_or_layout) if title is None else title
    return _heads_figure(layout, pattern_or_layout, chosen, ncols, max_pixels, title)


def _heads_figure(layout, source, chosen, ncols, max_pixels, title):
    """One panel per chosen head, a shared legend below."""
    ncols = ncols or min(4, len(chosen))
    nrows = -(-len(chosen) // ncols)
    shape = min(max(layout.q_len / layout.kv_len, 0.3), 1.5)
    fig, axes = _new_figure(nrows, ncols, figsize=(3.6 * ncols, (2.9 * shape + 1.3) * nrows + 0.7))
    for n, ax in enumerate(axes.flat):
        if n >= len(chosen):
            ax.set_axis_off()
            continue
        _draw_head(ax, layout, chosen[n], max_pixels=max_pixels, title=_head_title(source, chosen[n]))
        ax.title.set_fontsize(8)
    fig.suptitle(f"{title}: {len(chosen)} of {layout.num_heads} heads", fontsize=11)
    fig.legend(handles=legend_handles(), loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    return fig


def plot_density(
    patterns: dict,
    lengths,
    *,
    block_size=128,
    ax=None,
    show_visible: bool = True,
):
    """Density against sequence length for named patterns; returns the Figure.

    Solid lines: the computed density (pairs in kept blocks, what the kernels pay for). Dashed, with
    `show_visible`: the visible pairs alone; the gap between them is the work partial blocks add.
    Each point builds one layout (fast at any length), never a mask.
    """
    if not isinstance(patterns, dict) or not patterns:
        raise TypeError("patterns must be a non-empty dict {name: Pattern}")
    lengths = sorted(int(n) for n in lengths)
    if not lengths or lengths[0] < 1:
        raise ValueError(f"lengths must be positive ints, got {lengths!r}")
    if ax is None:
        _, axes = _new_figure(figsize=(7.0, 4.6))
        ax = axes[0, 0]
    for n, (name, pattern) in enumerate(patterns.items()):
        if not isinstance(pattern, Pattern):
            raise TypeError(f"patterns[{name!r}] must be a Pattern, got {type(pattern).__name__}")
        layouts = [pattern.layout(s, block_size=block_size) for s in lengths]
        colour = f"C{n % 10}"
        ax.plot(lengths, [lay.density() for lay in layouts], "o-", color=colour, label=f"{name}: computed")
        if show_visible:
            ax.plot(
                lengths,
                [visible_fraction(lay) for lay in layouts],
                "x--",
                color=colour,
                alpha=0.7,
                label=f"{name}: visible",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [_tokens_label(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("fraction of query-key pairs")
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else block_size
    ax.set_title(f"Density vs length (blocks {bq}x{bk}; 1.0 = dense attention)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return ax.figure


# -- N-D patterns on their grid ----------------------------------------------------------------------------
#: Colours of a grid cell seen from one query: visible key, computed but masked (in a kept block), skipped.
GRID_COLOURS = {
    "visible": COLOURS["partial_visible"],
    "computed": COLOURS["partial_masked"],
    "skipped": COLOURS["empty"],
    "query": (0.75, 0.0, 0.15),
}
GRID_LABELS = {
    "visible": "visible key",
    "computed": "masked key in a computed block",
    "skipped": "key in a skipped block",
    "query": "query",
}


@dataclass
class GridView:
    """What one query cell sees on its grid, in the user's (row-major) token order."""

    query: tuple[int, ...]  # the query's grid coordinates
    visible: np.ndarray  # bool [*grid]: keys the pattern lets it see
    computed: np.ndarray  # bool [*grid]: keys in the blocks its query block keeps (what the kernels compute)
    other_visible: int  # visible keys outside the grid (text tokens)
    other_computed: int  # computed keys outside the grid


def _grid_source(pattern):
    """(grid, prefix, suffix, layout position of each user position) of a pattern built on one grid."""
    from .patterns.grid import TileMajor, grid_leaves

    if isinstance(pattern, TileMajor):
        return pattern.grid, pattern.prefix, pattern.suffix, pattern.inverse
    leaves = list(grid_leaves(pattern)) if isinstance(pattern, Pattern) else []
    if not leaves:
        raise TypeError(f"expected a pattern built from neighborhood or sliding_tile, got {pattern!r}")
    first = leaves[0]
    return first.grid, first.prefix, first.suffix, None


def neighborhood_cells(pattern: Pattern, query, *, block_size=128, head: int = 0) -> GridView:
    """The keys grid cell `query` (coordinates, one per dimension) sees, and those its kernels compute.

    Costs O(S) per query (one row of the token predicate and one row of the block layout), never S x S."""
    from .geometry import Geometry

    grid, prefix, suffix, position_of = _grid_source(pattern)
    query = tuple(int(c) for c in (query if isinstance(query, tuple | list) else (query,)))
    if len(query) != len(grid) or not all(0 <= c < n for c, n in zip(query, grid, strict=True)):
        raise ValueError(f"query must be a cell of the grid {grid}, got {query}")
    cells = int(np.prod(grid))
    length = prefix + cells + suffix
    user = prefix + int(np.ravel_multi_index(query, grid))
    position_of = torch.arange(length) if position_of is None else position_of
    row = int(position_of[user])  # the query's row in the layout's token order
    g = Geometry(length, length, 1, 1)
    seen = pattern.visible(g, torch.tensor([[head]]), torch.tensor([[row]]), torch.arange(length)[None])
    seen = seen.reshape(-1)[position_of]  # back to user order
    layout = pattern.layout(length, block_size=block_size, heads=pattern.num_heads)
    bq, bk = layout.block_size
    kept = layout.to_block_mask()[min(head, layout.num_heads - 1), row // bq] > 0
    computed = kept.repeat_interleave(bk)[:length][position_of]
    inside = slice(prefix, prefix + cells)
    outside = (
        torch.cat([seen[:prefix], seen[prefix + cells :]]),
        torch.cat([computed[:prefix], computed[prefix + cells :]]),
    )
    return GridView(
        query,
        seen[inside].reshape(grid).numpy(),
        computed[inside].reshape(grid).numpy(),
        int(outside[0].sum()),
        int(outside[1].sum()),
    )


def _default_queries(grid) -> list[tuple[int, ...]]:
    """A corner, an edge and the centre: the border shift is visible next to the interior window."""
    centre = tuple(n // 2 for n in grid)
    corner = tuple(0 for _ in grid)
    edge = tuple(n // 2 for n in grid[:-1]) + (grid[-1] - 1,)
    return list(dict.fromkeys([corner, edge, centre]))


def _grid_rgb(view: GridView, frame: int | None) -> np.ndarray:
    visible, computed = view.visible, view.computed
    if frame is not None:
        visible, computed = visible[frame], computed[frame]
    if visible.ndim == 1:
        visible, computed = visible[None], computed[None]
    rgb = np.empty((*visible.shape, 3), dtype=np.float32)
    rgb[:] = GRID_COLOURS["skipped"]
    rgb[computed] = GRID_COLOURS["computed"]
    rgb[visible] = GRID_COLOURS["visible"]
    q = view.query if frame is None else view.query[1:]
    if len(view.query) == 1 or frame is None or frame == view.query[0]:
        rgb[(0, *q) if len(view.query) == 1 else q] = GRID_COLOURS["query"]
    return rgb


def _frames_to_show(view: GridView, max_frames: int) -> list[int]:
    """Frames (first axis of a 3-D grid) with visible keys, centred on the query's frame."""
    with_keys = [t for t in range(view.visible.shape[0]) if view.visible[t].any() or t == view.query[0]]
    if len(with_keys) <= max_frames:
        return with_keys
    at = with_keys.index(view.query[0])
    start = min(max(at - max_frames // 2, 0), len(with_keys) - max_frames)
    return with_keys[start : start + max_frames]


def plot_neighborhood(
    pattern: Pattern,
    queries=None,
    *,
    block_size=128,
    head: int = 0,
    max_frames: int = 5,
    title: str | None = None,
):
    """Draw an N-D pattern on its grid: for each query cell, the keys it sees (dark orange), the masked
    keys its kernels still compute because their block is kept (light), and the query (red); returns the
    Figure.

    `queries`: grid coordinates (default: a corner, an edge cell and the centre, so the window's shift at
    the borders shows). A 1-D grid is a strip, a 2-D grid an image per query, a 3-D grid a row of frames
    per query (the frames holding visible keys, at most `max_frames`). A `tile_major` pattern shows its
    computed keys in the user's grid: the blocks follow its tiles. O(S) per query, never S x S.
    """
    grid = _grid_source(pattern)[0]
    queries = (
        _default_queries(grid)
        if queries is None
        else [tuple(q) if isinstance(q, tuple | list) else (q,) for q in queries]
    )
    if not queries:
        raise ValueError("queries must name at least one grid cell")
    views = [neighborhood_cells(pattern, q, block_size=block_size, head=head) for q in queries]
    if len(grid) == 3:
        frames = [_frames_to_show(v, max_frames) for v in views]
        nrows, ncols = len(views), max(len(f) for f in frames)
    else:
        frames = [[None] for _ in views]
        nrows, ncols = (len(views), 1) if len(grid) == 1 else (1, len(views))
    cell_h, cell_w = (grid[-2], grid[-1]) if len(grid) > 1 else (1, grid[0])
    panel_w = 3.2 if len(grid) > 1 else 9.0
    panel_h = max(0.5, panel_w * cell_h / cell_w) + 0.6
    fig, axes = _new_figure(nrows, ncols, figsize=(panel_w * ncols, panel_h * nrows + 1.0))
    for r, (view, view_frames) in enumerate(zip(views, frames, strict=True)):
        for c in range(ncols):
            ax = axes[r, c] if len(grid) != 2 else axes[0, r]
            if c >= len(view_frames) or (len(grid) == 2 and c > 0):
                if len(grid) == 3:
                    ax.set_axis_off()
                continue
            frame = view_frames[c]
            # A 1-D strip is stretched to a visible height.
            aspect = "auto" if len(grid) == 1 else "equal"
            ax.imshow(_grid_rgb(view, frame), interpolation="nearest", aspect=aspect)
            ax.set_xticks([])
            ax.set_yticks([])
            label = f"query {view.query}"
            if frame is not None:
                label = f"{label}, frame {frame}" if c == 0 else f"frame {frame}"
            if c == 0:
                extra = f"; +{view.other_visible} text keys" if view.other_visible else ""
                label += f"\n{int(view.visible.sum())} visible, {int(view.computed.sum())} computed{extra}"
            ax.set_title(label, fontsize=8)
    name = _describe(pattern) if title is None else title
    bq, bk = check_block_size(block_size)
    fig.suptitle(f"{name}\ngrid {grid}, blocks {bq}x{bk}", fontsize=10)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=GRID_COLOURS[k], edgecolor="0.3", label=GRID_LABELS[k]) for k in GRID_COLOURS]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8, frameon=False)
    return fig
