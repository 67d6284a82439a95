"""Which cache pages a decode step reads, and the score bias over them, computed from the pattern on the device.

A plan for queries ``q [B, Hq, Sq, D]`` at positions ``qpos = L_b - Sq + r`` (``L = cache_seqlens``) is

- ``pages`` int64 ``[B, Hp, P]`` (``Hp`` 1 or ``Hkv``): the logical pages each KV head reads, -1 for none;
- ``bias`` float32 (float64 for float64 queries) ``[B, Hb, Sq, P * page_size]`` (``Hb`` 1 or ``Hq``): for key ``j = pages[..., p] * page_size
  + t``, the ALiBi and rel_bias terms of `sparse_attn.score_mods` where the pattern makes ``(qpos, j)``
  visible and ``-inf`` elsewhere (past ``L_b``, on a page of -1, outside the pattern).

Pages come from the pattern tree analytically, with sizes fixed by the pattern, the page size and ``Sq``,
so the positions themselves stay on the device (no host synchronisation): a diagonal band (``causal``,
``sliding_window``, ``dilated``) reads the pages of ``[L - Sq - hi, L - 1 - lo]``, a chunk only its own
chunk's pages, ``global_tokens`` the pages of its positions; ``|`` concatenates (duplicates removed), ``&``
keeps the smaller side, and ``topk_blocks(k)`` the k best pages by ``mean_q . mean_k`` (the means of the
query rows and of the page's keys, `topk_blocks`' score with a page as the key block). Other patterns
(documents, block_sparse, random blocks, masks: patterns whose truth needs the row index or host data)
are evaluated per batch element on the host, as `sparse_attention` would on the gathered keys, over every
page of the sequence. Finally a page with no visible pair for any of its KV head's queries is dropped (-1),
so it is never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import ElementGeometry, Geometry
from ..patterns.base import Intersection, Pattern, PerHead, Union
from ..patterns.chunked import Chunked
from ..patterns.global_tokens import GlobalTokens
from ..patterns.topk import TopKBlocks, leaves, selects
from ..patterns.window import UNBOUNDED, _Band
from ..score_mods import ScoreMods

# Patterns whose truth depends on qpos - j (and qpos, j) alone: evaluated on the device with offset 0.
_POSITIONS = Geometry(1, 1, 1, 1)
_NOT_CANDIDATE = torch.iinfo(torch.int64).min


@dataclass
class PagePlan:
    pages: torch.Tensor  # int64 [B, Hp, P], logical page ids, -1 for none
    bias: torch.Tensor  # float32 [B, Hb, Sq, P * page_size], -inf where not visible


@dataclass
class _Step:
    """What every node of the pattern tree sees: the step's shapes and positions."""

    q: torch.Tensor  # [B, Hq, Sq, D]
    seqlens: torch.Tensor  # int64 [B]
    page_size: int
    max_pages: int
    kv_heads: int
    page_means: torch.Tensor | None  # float32 [B, Hkv, max_pages, D] (top-k only)
    key_mask: torch.Tensor | None  # bool [B, >= max_pages * page_size]: False hides a position (padding)
    among: dict  # id(TopKBlocks node) -> the static patterns it selects among
    selected: dict  # id(TopKBlocks node) -> bool [B, Hq, max_pages]

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def qpos(self) -> torch.Tensor:
        """Query positions ``[B, 1, Sq, 1]``."""
        r = torch.arange(self.q_len, device=self.q.device)
        return (self.seqlens[:, None] - self.q_len + r)[:, None, :, None]

    @property
    def n_pages(self) -> torch.Tensor:
        """Pages holding the sequence's positions ``[B, 1, 1]`` (capped by the block table's width)."""
        return (-(-self.seqlens // self.page_size)).clamp(max=self.max_pages)[:, None, None]


def plan(
    pattern: Pattern, q, seqlens, page_size: int, max_pages: int, kv_heads: int, mods, page_means=None,
    key_mask=None,
):  # fmt: skip
    """The `PagePlan` of one decode step (see the module docstring); `mods` a `ScoreMods` or None. On the
    CPU the page lists are trimmed to the longest one (a free host read there)."""
    step = _Step(q, seqlens.long(), page_size, max_pages, kv_heads, page_means, key_mask, {}, {})
    step.among = {id(leaf.node): leaf.among for leaf in leaves(pattern)}
    listed = _listed(pattern, step)
    pages = _unique(torch.where(listed < step.n_pages, listed, -1))
    visible = _visible_keys(pattern, step, pages)
    pages, visible = _compact(pages, visible, step)
    return PagePlan(pages, _bias(visible, _keys(pages, step), step, mods))


def _listed(pattern: Pattern, step: _Step) -> torch.Tensor:
    return _by_kv_head(_pages(pattern, step), step)


def _visible_keys(pattern: Pattern, step: _Step, pages: torch.Tensor) -> torch.Tensor:
    """bool ``[B, 1 or Hq, Sq, P * ps]``: the pattern's truth on the listed pages' keys (False past L_b)."""
    j = _per_query_head(_keys(pages, step), pattern, step)  # [B, H, 1, K]
    real = (j >= 0) & (j < step.seqlens[:, None, None, None])
    if step.key_mask is not None:
        # Padding (the transformers integration's static caches): positions the key mask hides.
        flat = j.clamp(0, step.key_mask.shape[1] - 1).expand(step.q.shape[0], -1, -1, -1)
        real = real & torch.gather(step.key_mask[:, None, None, :].expand(-1, flat.shape[1], 1, -1), -1, flat)
    visible = _visible(pattern, step, _heads(pattern, step), step.qpos, j) & real
    return visible.expand(-1, -1, step.q_len, -1)


def _compact(pages: torch.Tensor, visible: torch.Tensor, step: _Step):
    """Pages without a visible pair dropped (-1), then `compact`."""
    return compact(torch.where(_page_any(visible, step), pages, -1), visible, step.page_size)


def compact(pages: torch.Tensor, per_key: torch.Tensor, page_size: int):
    """Listed pages ``[B, Hp, P]`` moved to the front in order, the -1s last, with their keys' values
    ``per_key [B, H, Sq, P * page_size]`` (H a multiple of Hp); trimmed to the longest list on the CPU (a
    free host read there), so the CPU engine never touches an unlisted page."""
    order = torch.argsort((pages < 0).to(torch.int8), dim=-1, stable=True)
    pages = torch.gather(pages, -1, order)
    batch, heads, q_len, _ = per_key.shape
    order = order.repeat_interleave(heads // order.shape[1], 1) if heads > 1 else order
    order = order[:, :, None, :, None].expand(batch, -1, q_len, -1, page_size)
    per_key = torch.gather(per_key.view(batch, heads, q_len, -1, page_size), 3, order)
    if pages.device.type == "cpu" and pages.shape[-1] > 1 and not torch.compiler.is_compiling():
        width = max(1, int((pages >= 0).sum(-1).max()))
        pages, per_key = pages[..., :width], per_key[..., :width, :]
    return pages, per_key.flatten(-2)


def _keys(pages: torch.Tensor, step: _Step) -> torch.Tensor:
    """Key positions ``[B, Hp, P * page_size]`` of the listed pages (negative on pages of -1)."""
    t = torch.arange(step.page_size, device=pages.device)
    return (pages[..., None] * step.page_size + t).flatten(-2)


def _heads(pattern: Pattern, step: _Step) -> torch.Tensor:
    heads = step.q.shape[1] if _needs_heads(pattern) else 1
    return torch.arange(heads, device=step.q.device)[None, :, None, None]


def _needs_heads(pattern: Pattern) -> bool:
    return pattern.num_heads is not None or selects(pattern)


def _per_query_head(keys: torch.Tensor, pattern: Pattern, step: _Step) -> torch.Tensor:
    """Keys ``[B, Hp, K]`` as ``[B, H, 1, K]`` for the query heads (H = Hq when a head matters, else Hp)."""
    group = step.q.shape[1] // keys.shape[1]
    if keys.shape[1] > 1 or _needs_heads(pattern):
        return keys.repeat_interleave(group, 1)[:, :, None, :]
    return keys[:, :, None, :]


# -- pages ----------------------------------------------------------------------------------------------
def _pages(p: Pattern, step: _Step) -> torch.Tensor:
    """Logical pages ``[B, 1 or Hq, P]`` that may hold keys visible from the step's queries (-1: none)."""
    if isinstance(p, Union):
        left, right = _pages(p.left, step), _pages(p.right, step)
        heads = max(left.shape[1], right.shape[1])
        return torch.cat([left.expand(-1, heads, -1), right.expand(-1, heads, -1)], -1)
    if isinstance(p, Intersection):
        simpler = p.left.intersection(p.right) or p.right.intersection(p.left)
        if simpler is not None:
            return _pages(simpler, step)
        left, right = _pages(p.left, step), _pages(p.right, step)
        return left if left.shape[-1] <= right.shape[-1] else right
    if isinstance(p, PerHead):
        items = [_pages(item, step) for item in p.patterns]
        width = max(t.shape[-1] for t in items)
        items = [torch.nn.functional.pad(t[:, :1], (0, width - t.shape[-1]), value=-1) for t in items]
        return torch.cat(items, 1)
    if isinstance(p, TopKBlocks):
        return _select_pages(p, step)
    if isinstance(p, _Band):
        return _band_pages(step, p.lo, p.hi)
    if isinstance(p, Chunked):
        return _chunk_pages(p, step)
    if isinstance(p, GlobalTokens):
        last = min(p.n, UNBOUNDED) if p.is_prefix else (int(p.positions[-1]) + 1 if len(p.positions) else 0)
        # Global keys lie below `last`; a global query (qpos < last) sees keys up to qpos + Sq - 1.
        reach = last + step.q_len - 1
        return _page_run(step, torch.zeros_like(step.seqlens), step.seqlens.clamp(max=reach) - 1, reach)
    # Any other pattern: every page of the sequence (its token truth is evaluated on the host).
    return _page_run(step, torch.zeros_like(step.seqlens), step.seqlens - 1)


def _band_pages(step: _Step, lo: int, hi: int) -> torch.Tensor:
    """Pages of keys ``[L - Sq - hi, L - 1 - lo]``: a fixed number for a bounded band."""
    first = step.seqlens - step.q_len - hi
    last = step.seqlens - 1 - lo
    return _page_run(step, first, last, span=hi - lo + step.q_len if max(hi, -lo) < UNBOUNDED else None)


def _chunk_pages(p: Chunked, step: _Step) -> torch.Tensor:
    """Pages of the chunks of the queries, within the band of `p`."""
    start = torch.div(step.seqlens - step.q_len, p._size, rounding_mode="floor") * p._size
    first = torch.maximum(start, step.seqlens - step.q_len - p.hi)
    last = step.seqlens - 1 - max(p.lo, 0)
    span = p._size + step.q_len if p._size < UNBOUNDED else None
    if max(p.hi, -p.lo) < UNBOUNDED:
        band = p.hi - p.lo + step.q_len
        span = band if span is None else min(span, band)
    return _page_run(step, first, last, span)


def _page_run(step: _Step, first: torch.Tensor, last: torch.Tensor, span: int | None = None) -> torch.Tensor:
    """Pages ``[B, 1, P]`` holding key positions ``first..last`` (clipped to the sequence); P is fixed by
    `span` (the most keys the run can cover) or, unbounded, the block table's width."""
    first = first.clamp(min=0)
    last = torch.minimum(last, step.seqlens - 1)
    count = step.max_pages if span is None else min(step.max_pages, span // step.page_size + 2)
    pages = first[:, None] // step.page_size + torch.arange(count, device=first.device)
    pages = torch.where((pages <= last[:, None] // step.page_size) & (last >= first)[:, None], pages, -1)
    return pages[:, None, :]


def _select_pages(node: TopKBlocks, step: _Step) -> torch.Tensor:
    """The node's `k` best pages per KV head ``[B, Hq, k]`` (repeated over each group's query heads), among
    the pages of the sequence that its static sides keep; records the selection for `_visible`."""
    if step.page_means is None:
        raise ValueError("topk_blocks needs page means (internal: pass page_means to plan)")
    batch, hq, q_len, dim = step.q.shape
    group = hq // step.kv_heads
    mean_q = step.q.detach().float().view(batch, step.kv_heads, group * q_len, dim).mean(2)
    score = (step.page_means @ mean_q[..., None])[..., 0]  # [B, Hkv, max_pages]
    pages = torch.arange(step.max_pages, device=score.device)
    candidate = (pages < step.n_pages).expand(batch, step.kv_heads, -1)
    for other in step.among[id(node)]:
        candidate = candidate & _pages_seen(other, step)
    # Order-preserving integer keys of the float32 scores, ties to the lower page (as topk_blocks).
    bits = torch.where(score == 0, torch.zeros_like(score), score).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    keys = ordered * step.max_pages + (step.max_pages - 1 - pages)
    keys = torch.where(candidate, keys, _NOT_CANDIDATE)
    top, index = keys.topk(min(node.k, step.max_pages), dim=-1)
    chosen = torch.where(top != _NOT_CANDIDATE, index, -1)  # [B, Hkv, k]
    selected = torch.zeros(batch, step.kv_heads, step.max_pages + 1, dtype=torch.bool, device=score.device)
    selected.scatter_(-1, torch.where(chosen >= 0, chosen, step.max_pages), True)
    step.selected[id(node)] = selected[..., :-1].repeat_interleave(group, 1)
    return chosen.repeat_interleave(group, 1)


def _pages_seen(p: Pattern, step: _Step) -> torch.Tensor:
    """bool ``[B, Hkv, max_pages]``: pages holding a key that `p` makes visible to a query of the KV head."""
    listed = _listed(p, step)
    pages = _unique(torch.where(listed < step.n_pages, listed, -1))
    seen = _page_any(_visible_keys(p, step, pages), step) & (pages >= 0)  # [B, Hp, P]
    out = torch.zeros(*seen.shape[:2], step.max_pages + 1, dtype=torch.bool, device=seen.device)
    out.scatter_(-1, torch.where(seen, pages, step.max_pages), True)
    return out[..., :-1].expand(-1, step.kv_heads, -1)


# -- heads, duplicates, unseen pages ---------------------------------------------------------------------
def _by_kv_head(pages: torch.Tensor, step: _Step) -> torch.Tensor:
    """``[B, 1 or Hq, P]`` -> ``[B, 1 or Hkv, P']``: a KV head reads the pages of all its query heads."""
    if pages.shape[1] == 1:
        return pages
    batch, hq, count = pages.shape
    return pages.reshape(batch, step.kv_heads, (hq // step.kv_heads) * count)


def _unique(pages: torch.Tensor) -> torch.Tensor:
    """Each page once per row, in ascending order, then the -1s (fixed size: duplicates become -1)."""
    big = torch.iinfo(torch.int64).max
    ordered = torch.where(pages >= 0, pages, big).sort(-1).values
    repeat = torch.nn.functional.pad(ordered[..., 1:] == ordered[..., :-1], (1, 0), value=False)
    ordered = torch.where(repeat | (ordered == big), big, ordered).sort(-1).values
    return torch.where(ordered == big, -1, ordered)


def _page_any(visible: torch.Tensor, step: _Step) -> torch.Tensor:
    """``[B, H, Sq, P * ps]`` -> bool ``[B, 1 or Hkv, P]``: a visible pair on the page for the KV head."""
    batch, heads, q_len, keys = visible.shape
    per_page = visible.view(batch, heads, q_len, keys // step.page_size, step.page_size).any(-1).any(2)
    if heads == 1:
        return per_page
    return per_page.view(batch, step.kv_heads, heads // step.kv_heads, -1).any(2)


# -- the token truth -------------------------------------------------------------------------------------
def _visible(p: Pattern, step: _Step, h, qpos, j) -> torch.Tensor:
    """bool ``[B, H, Sq, K]``: may the query at `qpos` ``[B, 1, Sq, 1]`` of head `h` see key `j`?"""
    if isinstance(p, Union):
        return _visible(p.left, step, h, qpos, j) | _visible(p.right, step, h, qpos, j)
    if isinstance(p, Intersection):
        return _visible(p.left, step, h, qpos, j) & _visible(p.right, step, h, qpos, j)
    if isinstance(p, PerHead):
        out = None
        for k, item in enumerate(p.patterns):
            part = _visible(item, step, h, qpos, j) & (h == k)
            out = part if out is None else out | part
        return out
    if isinstance(p, TopKBlocks):
        selected = step.selected[id(p)]  # [B, Hq, max_pages]
        page = (j // step.page_size).clamp(0, step.max_pages - 1)[:, :, 0, :]  # [B, Hq, K]
        return torch.gather(selected, -1, page.expand(selected.shape[0], selected.shape[1], -1))[
            :, :, None, :
        ]
    if isinstance(p, GlobalTokens):
        if p.is_prefix:
            return (qpos < p.n) | (j < p.n)
        positions = p.positions.to(qpos.device)
        return torch.isin(qpos, positions) | torch.isin(j, positions)
    if isinstance(p, _Band | Chunked):
        return torch.broadcast_to(p.visible(_POSITIONS, h, qpos, j), _shape(h, qpos, j))
    return _visible_on_host(p, step, h, qpos, j)


def _shape(h, qpos, j):
    return torch.broadcast_shapes(h.shape, qpos.shape, j.shape)


def _visible_on_host(p: Pattern, step: _Step, h, qpos, j) -> torch.Tensor:
    """Any other pattern: per batch element, on the CPU, with the geometry `sparse_attention` would use on
    the gathered keys (query rows ``0..Sq-1``, ``Skv = L_b``): the one host synchronisation of such a step."""
    # Checked against the table's capacity: data over positions (document ids) covers every cache position.
    p.check_lengths(step.q_len, step.max_pages * step.page_size)
    lengths = step.seqlens.cpu().tolist()
    rows = torch.arange(step.q_len)[None, :, None]
    out = []
    for b, length in enumerate(lengths):
        keys = j[b if j.shape[0] > 1 else 0].cpu()
        if length == 0:
            out.append(torch.zeros(_shape(h[0], rows, keys), dtype=torch.bool))
            continue
        g = ElementGeometry(step.q_len, length, 1, 1, batch_index=b)
        # Keys past the sequence (masked afterwards) are clamped: some patterns index by key.
        seen = p.visible(g, h[0].cpu(), rows, keys.clamp(0, length - 1))
        out.append(torch.broadcast_to(seen, _shape(h[0], rows, keys)))
    heads = max(t.shape[0] for t in out)
    return torch.stack([t.expand(heads, -1, -1) for t in out]).to(qpos.device)


# -- the bias --------------------------------------------------------------------------------------------
def _bias(visible: torch.Tensor, keys: torch.Tensor, step: _Step, mods: ScoreMods | None) -> torch.Tensor:
    """float32 ``[B, Hb, Sq, K]``: ALiBi and rel_bias where visible, -inf elsewhere."""
    dtype = torch.float64 if step.q.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    if mods is None or (mods.alibi_slopes is None and mods.rel_bias is None):
        return torch.where(visible, zero, float("-inf"))
    hq = step.q.shape[1]
    keys = keys.repeat_interleave(hq // keys.shape[1], 1)[:, :, None, :]  # [B, Hq, 1, K]
    rel = keys - step.qpos  # [B, Hq, Sq, K]
    bias = torch.zeros(rel.shape, dtype=dtype, device=rel.device)
    if mods.alibi_slopes is not None:
        slopes = mods.alibi_slopes.to(dtype).expand(step.q.shape[0], hq)
        bias = bias - slopes[:, :, None, None] * rel.abs().to(dtype)
    if mods.rel_bias is not None:
        capacity = step.max_pages * step.page_size
        index = (rel + capacity - 1).clamp(0, mods.rel_bias.shape[1] - 1)
        table = mods.rel_bias.to(dtype)[None, :, None, :].expand(rel.shape[0], -1, rel.shape[2], -1)
        bias = bias + torch.gather(table, -1, index)
    return torch.where(visible.expand_as(bias), bias, float("-inf"))
