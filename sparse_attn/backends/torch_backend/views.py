"""Tensors in the kernel's shapes: how batch and heads map onto kernel instances (`Frame`), the inputs as blocks
(`Problem`), and where one chunk's rows live (`Rows`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...layout import BlockLayout
from .calls import Call
from .memory import thread_scratch


@dataclass
class Frame:
    """How batch and heads map onto the kernel's (instance, head, rows) for one layout.

    A shared layout (one layout head) stacks the `group` query heads of a KV head as the rows of an
    instance, with ``kernel_heads = B * Hkv`` kernel heads; a per-head layout has one query head per instance and
    ``kernel_heads = B``. ``q_seq[l, x, j]`` is the flat (batch * Hq + head) query sequence of layout head l,
    kernel head x and stacked head j; ``kv_seq[l, x]`` the flat KV sequence (an affine function of x).
    """

    kernel_heads: int
    stacked_heads: int
    q_seq: torch.Tensor  # int64 [L, kernel_heads, stacked_heads]
    kv_seq: torch.Tensor  # int64 [L, kernel_heads]


def frame_for(batch: int, hq: int, hkv: int, layout_heads: int, layout_batch: int | None = None) -> Frame:
    """A per-batch layout (`layout_batch` elements) has one layout sequence per batch element (and head):
    its frame is the shared layout's frame of a batch of one, repeated per element."""
    if layout_batch is not None and layout_batch > 1:
        one = frame_for(1, hq, hkv, layout_heads)
        b = torch.arange(batch)[:, None, None]
        q_seq = (one.q_seq[None] + b[..., None] * hq).reshape(-1, one.kernel_heads, one.stacked_heads)
        kv_seq = (one.kv_seq[None] + b * hkv).reshape(-1, one.kernel_heads)
        return Frame(one.kernel_heads, one.stacked_heads, q_seq, kv_seq)
    group = hq // hkv
    if layout_heads == 1:
        x = torch.arange(batch * hkv)
        b, g = x // hkv, x % hkv
        q_seq = b[:, None] * hq + g[:, None] * group + torch.arange(group)[None, :]
        return Frame(batch * hkv, group, q_seq[None], x[None])
    if layout_heads == hkv and hkv != hq:
        # One layout head per KV head (`per_kv_head`): its group's query heads are stacked as rows.
        g = torch.arange(hkv)[:, None, None]
        b = torch.arange(batch)[None, :, None]
        q_seq = b * hq + g * group + torch.arange(group)[None, None, :]
        return Frame(batch, group, q_seq, (b * hkv + g)[..., 0])
    h = torch.arange(hq)[:, None]
    b = torch.arange(batch)[None, :]
    return Frame(batch, 1, (b * hq + h)[..., None], b * hkv + h // group)


def per_kv_head(layout: BlockLayout, hq: int, hkv: int) -> BlockLayout:
    """A per-query-head layout whose query heads keep the same blocks within each KV group (as
    `topk_blocks` selections do) as one layout head per KV head, so that the group's heads share one
    kernel call and one K/V gather; the layout itself otherwise."""
    group = hq // hkv
    if layout.num_heads != hq or group == 1 or hkv == 1:
        return layout
    fields = {"tiles": layout.tiles}
    for name in ("row_full", "row_part", "col_full", "col_part"):
        ptr = getattr(layout, f"{name}_ptr").cpu().long()
        lists = [getattr(layout, f"{name}_idx").cpu()]
        if name.endswith("part"):
            lists.append(getattr(layout, f"{name}_tile").cpu())
        first = torch.arange(0, len(ptr), group)  # sequences of each group's first query head
        local = ptr - ptr[:, :1]
        if not torch.equal(local.view(-1, group, ptr.shape[1]), local[first, None].expand(-1, group, -1)):
            return layout
        # Entry p of sequence l sits at ptr[l, 0] + o; its counterpart in the group's first head at
        # ptr[l - l % group, 0] + o.
        lo, hi = int(ptr[0, 0]), int(ptr[-1, -1])
        seq = torch.repeat_interleave(torch.arange(len(ptr)), ptr[:, -1] - ptr[:, 0])
        pos = torch.arange(lo, hi)
        twin = ptr[seq - seq % group, 0] + pos - ptr[seq, 0]
        if not all(torch.equal(t[pos], t[twin]) for t in lists):
            return layout
        keep = pos[seq % group == 0]
        counts = ptr[first, -1] - ptr[first, 0]
        starts = torch.cumsum(counts, 0) - counts
        fields[f"{name}_ptr"] = (local[first] + starts[:, None]).to(torch.int32)
        fields[f"{name}_idx"] = lists[0][keep]
        if name.endswith("part"):
            fields[f"{name}_tile"] = lists[1][keep]
    return BlockLayout(layout.geometry, hkv, layout.batch, **fields)


# -- tensors in the kernel's shapes ---------------------------------------------------------------------
class Problem:
    """Inputs flattened to per-sequence blocks, and the gathers / views one call needs."""

    def __init__(self, q, k, v, layout: BlockLayout, scale: float, key_mask, mods=None):
        self.batch, self.hq, self.q_len, self.dim = q.shape
        self.hkv, self.kv_len = k.shape[1], k.shape[2]
        self.mods = mods  # ScoreMods or None
        self.bq, self.bk = layout.block_q, layout.block_k
        self.nqb, self.nkb = layout.num_q_blocks, layout.num_k_blocks
        self.scale = scale
        self.dtype = q.dtype
        self.frame = frame_for(self.batch, self.hq, self.hkv, layout.num_heads, layout.batch)
        self.q = self.seq_blocks(q, self.bq)  # [B * Hq * nqb, bq * D]
        self.key_bias = _key_bias(key_mask, self.hkv, self.nkb * self.bk, q.dtype)
        if self.key_bias is not None:
            # A padding key may hold garbage (NaN, inf): its -inf bias alone would give NaN scores and
            # 0 * NaN in P @ V. Zeroing it (one copy, only when key_mask hides something) makes it inert.
            real = key_mask.cpu()[:, None, :, None]
            k, v = k.masked_fill(~real, 0), v.masked_fill(~real, 0)
        self.k = self.seq_blocks(k, self.bk)  # [B * Hkv * nkb, bk * D]
        self.v = self.seq_blocks(v, self.bk)
        self.kv_pad = self.nkb * self.bk
        self.tile_bias = _tile_bias(layout, q.dtype)
        self.tile_rows = layout.tile_masks().cpu().any(-1)  # [n_tiles, bq]: tile rows that see some key

    def scratch(self, slot: str, shape, dtype) -> torch.Tensor:
        """An uninitialised tensor reused by every chunk and call of this thread (see `memory.thread_scratch`)."""
        size = math.prod(shape)
        cache = thread_scratch()
        buf = cache.get((slot, dtype))
        if buf is None or buf.numel() < size:
            # A normal tensor even under inference mode: later calls outside it update it in place.
            with torch.inference_mode(False):
                buf = cache[(slot, dtype)] = torch.empty(size, dtype=dtype)
        return buf[:size].view(shape)

    def gather(self, slot: str, src: torch.Tensor, index: torch.Tensor, shape) -> torch.Tensor:
        """``src.index_select(0, index)`` into scratch, viewed as `shape`."""
        out = self.scratch(slot, (len(index), src.shape[1]), src.dtype)
        return torch.index_select(src, 0, index, out=out).view(shape)

    def seq_blocks(self, t: torch.Tensor, block: int) -> torch.Tensor:
        """``[B, H, S, D]`` -> ``[B * H * nblocks, block * D]``, zero padded to whole blocks."""
        batch, heads, length, dim = t.shape
        pad = -length % block
        if pad:  # one copy from any strides (F.pad keeps a channels_last memory format, which cannot view)
            padded = t.new_zeros(batch, heads, length + pad, dim)
            padded.narrow(2, 0, length).copy_(t)
            t = padded
        return t.contiguous().view(batch * heads * ((length + pad) // block), block * dim)

    def q_index(self, call: Call) -> torch.Tensor:
        """Flat query-block index ``[X * kernel_heads * stacked_heads]`` of the call's rows, in kernel order."""
        layout_head, qb = call.rows // self.nqb, call.rows % self.nqb
        return (self.frame.q_seq[layout_head] * self.nqb + qb[:, None, None]).reshape(-1)

    # key segments
    def kv_index(self, call: Call, blocks: torch.Tensor) -> torch.Tensor:
        """Flat key-block index ``[X, kernel_heads, n]`` of `blocks` ``[X, n]``."""
        seq = self.frame.kv_seq[call.rows // self.nqb]  # [X, kernel_heads]
        return seq[:, :, None] * self.nkb + blocks[:, None, :]

    def full_kv(self, call: Call):
        """K, V ``[X, kernel_heads, full_len, D]`` of the full segment: a strided view or a gather."""
        if call.step:
            return (self._strided(t, call, self.dim) for t in (self.k, self.v))
        index = self.kv_index(call, call.full).reshape(-1)
        shape = (len(call.rows), self.frame.kernel_heads, -1, self.dim)
        return (
            self.gather(n, t, index, shape)[:, :, : call.full_len]
            for n, t in (("kf", self.k), ("vf", self.v))
        )

    def _strided(self, blocks: torch.Tensor, call: Call, width: int) -> torch.Tensor:
        """Overlapping windows of a ``[sequences * kv_pad, width]`` buffer, one per row of a strided run."""
        return self.window(blocks, call, int(call.full[0, 0]), call.step, call.full_len, width)

    def window(self, blocks, call: Call, first: int, step: int, length: int, width: int) -> torch.Tensor:
        """View ``[X, kernel_heads, length, width]`` of a ``[sequences * kv_pad, width]`` buffer whose row x starts at
        key block ``first + x * step`` (rows of one call share a layout head, hence their KV sequences)."""
        seq = self.frame.kv_seq[call.rows[0] // self.nqb]
        seq_step = int(seq[1] - seq[0]) if len(seq) > 1 else 1
        offset = (int(seq[0]) * self.kv_pad + first * self.bk) * width
        strides = (step * self.bk * width, seq_step * self.kv_pad * width, width, 1)
        shape = (len(call.rows), self.frame.kernel_heads, length, width)
        return blocks.as_strided(shape, strides, blocks.storage_offset() + offset)

    def part_kv(self, call: Call):
        index = self.kv_index(call, call.part).reshape(-1)
        shape = (len(call.rows), self.frame.kernel_heads, -1, self.dim)
        return (self.gather(n, t, index, shape) for n, t in (("kp", self.k), ("vp", self.v)))

    # masks
    def full_mask(self, call: Call):
        """Key bias ``[X, kernel_heads, 1, full_len]`` of the full segment, or None without an active key_mask."""
        if self.key_bias is None:
            return None
        if call.step:
            return self._strided(self.key_bias.view(-1, 1), call, 1).squeeze(-1).unsqueeze(2).contiguous()
        index = self.kv_index(call, call.full).reshape(-1)
        bias = self.key_bias.view(-1, self.bk).index_select(0, index)
        return bias.view(len(call.rows), self.frame.kernel_heads, 1, -1)[..., : call.full_len]

    def part_mask(self, call: Call):
        """Tile (and key) bias ``[X or 1, 1 or kernel_heads, stacked_heads * bq, np * bk]`` of the partial segment, and the
        rows it hides entirely (``[X or 1, 1 or kernel_heads, stacked_heads * bq]``)."""
        tiles = call.tiles
        # The usual case (a window): every row has the same tiles, so one mask broadcasts over the rows.
        if bool((tiles == tiles[:1]).all()):
            tiles = tiles[:1]
        rows, n = tiles.shape
        bias = self.tile_bias.index_select(0, tiles.reshape(-1)).view(rows, n, self.bq, self.bk)
        bias = bias.transpose(1, 2).reshape(rows, 1, 1, self.bq, n * self.bk)
        bias = bias.expand(rows, 1, self.frame.stacked_heads, self.bq, n * self.bk).reshape(
            rows, 1, -1, n * self.bk
        )
        if self.key_bias is None:
            seen = self.tile_rows[tiles].any(1)  # [rows, bq]
            return bias, ~seen.repeat(1, self.frame.stacked_heads)[:, None, :]
        index = self.kv_index(call, call.part).reshape(-1)
        keys = (
            self.key_bias.view(-1, self.bk)
            .index_select(0, index)
            .view(len(call.rows), self.frame.kernel_heads, 1, -1)
        )
        bias = bias + keys
        return bias, _masked_rows(bias)


class Rows:
    """Where one chunk's query-side rows live in a ``[B * Hq * nqb, bq * width]`` buffer (q, dO, out, lse,
    dq): a strided view when they are consecutive query blocks of one layout head with one query head per
    instance (no copy), an index otherwise."""

    def __init__(self, call: Call, problem: Problem):
        self.count, self.kernel_heads, self.bq, self.nqb = (
            len(call.rows),
            problem.frame.kernel_heads,
            problem.bq,
            problem.nqb,
        )
        self.problem = problem
        head = int(call.rows[0]) // problem.nqb
        consecutive = (
            int(call.rows[-1] - call.rows[0]) == self.count - 1 and int(call.rows[-1]) // problem.nqb == head
        )
        self.index = None
        if problem.frame.stacked_heads == 1 and consecutive:
            seq = problem.frame.q_seq[head, :, 0]
            self.seq_step = int(seq[1] - seq[0]) if len(seq) > 1 else 1
            self.first = int(seq[0]) * problem.nqb + int(call.rows[0]) % problem.nqb
        else:
            self.index = problem.q_index(call)

    def read(self, buffer: torch.Tensor, width: int, slot: str) -> torch.Tensor:
        """``[X, kernel_heads, M, width]`` rows of `buffer`."""
        if self.index is None:
            return self._view(buffer, width)
        return self.problem.gather(slot, buffer, self.index, (self.count, self.kernel_heads, -1, width))

    def target(self, buffer: torch.Tensor, width: int, slot: str) -> torch.Tensor:
        """A ``[X, kernel_heads, M, width]`` tensor whose `commit` lands in `buffer` (a view when possible).

        Views of `buffer` hold its initial values; a scratch tensor is uninitialised."""
        if self.index is None:
            return self._view(buffer, width)
        rows = len(self.index) // (self.count * self.kernel_heads) * self.bq
        return self.problem.scratch(slot, (self.count, self.kernel_heads, rows, width), buffer.dtype)

    def commit(self, buffer: torch.Tensor, target: torch.Tensor) -> None:
        if self.index is not None:
            buffer.index_copy_(0, self.index, target.reshape(-1, buffer.shape[1]))

    def _view(self, buffer: torch.Tensor, width: int) -> torch.Tensor:
        row = self.bq * width
        strides = (row, self.seq_step * self.nqb * row, width, 1)
        offset = buffer.storage_offset() + self.first * row
        return buffer.as_strided((self.count, self.kernel_heads, self.bq, width), strides, offset)


def _tile_bias(layout: BlockLayout, dtype) -> torch.Tensor:
    """Additive masks of the partial tiles: 0 where visible, -inf elsewhere, ``[n_tiles, bq, bk]``."""
    tiles = layout.tile_masks().cpu()
    return torch.zeros(tiles.shape, dtype=dtype).masked_fill_(~tiles, float("-inf"))


def _key_bias(key_mask, hkv: int, kv_pad: int, dtype):
    """Per-key additive bias ``[B * Hkv, kv_pad]`` (-inf on padding keys), or None if nothing is masked."""
    if key_mask is None or bool(key_mask.all()):
        return None
    bias = torch.zeros(key_mask.shape, dtype=dtype).masked_fill_(~key_mask.cpu(), float("-inf"))
    bias = F.pad(bias, (0, kv_pad - key_mask.shape[1]), value=float("-inf"))
    return bias.repeat_interleave(hkv, 0)


def _masked_rows(mask) -> torch.Tensor | None:
    """Rows (``[X, 1 or kernel_heads, M]``) whose every key the mask hides, or None without a mask."""
    if mask is None:
        return None
    return mask.amax(-1) == float("-inf")
