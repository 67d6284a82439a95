"""PyTorch backend: exact block-sparse attention on the CPU, forward and backward, without an S x S tensor.

Algorithm
    Each row of the `BlockLayout` (one query block of one layout head) keeps some full key blocks (no
    mask) and some partial ones (a token tile). A row is attention over two *segments*, its full keys
    and its partial keys, each computed densely by PyTorch's fused flash-attention CPU kernel
    (``aten::_scaled_dot_product_flash_attention_for_cpu``, which also returns the logsumexp), then the
    two are merged exactly through their logsumexps. Only the partial segment carries a mask, built
    from ``layout.tile_masks()``; full blocks get no mask work (only `key_mask`, when it masks anything,
    adds a per-key bias).

Batching
    Rows with the same numbers of full and partial keys go to one kernel call, where they are the
    kernel's batch dimension. Keys are gathered block by block (``index_select``), except when a run of
    rows keeps contiguous full blocks whose starts advance by a fixed step (a sliding window): then the
    full segment is a strided view of K/V, with no copy. GQA costs no K/V copy either: with a layout
    shared by all heads, the query heads of one KV group are stacked as the rows of one instance.

Backward
    Recomputes from the saved logsumexp, call by call, with the same kernel's backward (dQ, dK, dV), fed
    the whole row's output and logsumexp so that ``delta = rowsum(dO * O)`` and the probabilities are
    those of the full row. dK/dV go back block column by block column: a column whose key block advances
    by a fixed step from row to row (every column of a window) is one strided ``add_``, the rest one
    ``index_add_``. A gradient into the logsumexp (``delta -= dlse``) is folded in by one extra head-dim column: ``out`` gets a 1,
    ``dO`` gets ``-dlse`` and q/k/v a 0, which changes nothing else.

Memory
    No S x S tensor exists. Rows are processed in chunks whose scratch (gathered Q/K/V, outputs, masks,
    gradients) stays under `get_chunk_size()` elements; set it with `set_chunk_size` or the environment
    variable ``SPARSE_ATTN_TORCH_CHUNK`` (default 2**25 elements, about 128 MB of fp32 scratch per
    chunk). Scratch is kept per thread between calls and reused by every chunk: on small VMs a fresh
    large allocation page-faults on first touch, which costs more than the attention itself.
    `release_scratch()` frees it.

Threads
    Chunks (largest first) run on a small persistent pool of ``torch.get_num_threads()`` worker threads,
    each running single-threaded kernels, with dK/dV added back in task order (deterministic; chunk bounds
    depend only on the machine's CPU count, so results are bitwise the same for any thread count). Set
    ``SPARSE_ATTN_TORCH_WORKERS=0`` to run them in the caller's thread with torch's intra-op threads.

Devices: the fused kernel is CPU-only; tensors on another device are computed on CPU copies.

Dtypes: fp32, fp16 and bf16 (the kernel accumulates in fp32; lse is fp32) and float64 (lse float64).
Any head dim. Empty rows give output 0, lse -inf and zero gradients.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_int
from ..layout import BlockLayout
from . import get as _backend_spec

CHUNK_ENV = "SPARSE_ATTN_TORCH_CHUNK"
_DEFAULT_CHUNK = 1 << 25


def _chunk_from_env() -> int:
    value = os.environ.get(CHUNK_ENV, str(_DEFAULT_CHUNK))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{CHUNK_ENV} must be a positive integer (tensor elements), got {value!r}")
    return int(value)


_chunk_size = _chunk_from_env()
#: Shortest run of rows worth a strided (copy-free) K/V view instead of a gather.
_MIN_RUN = 8


_scratch_local = threading.local()


def _thread_scratch() -> dict:
    """This thread's scratch tensors, kept between calls.

    Fresh large allocations are returned to the OS when freed and page-fault again on the next call,
    which on small VMs costs more than the attention itself; keeping a chunk's worth of scratch (per
    thread, so concurrent calls never share it) avoids that. `release_scratch` frees it.
    """
    if not hasattr(_scratch_local, "buffers"):
        _scratch_local.buffers = {}
    return _scratch_local.buffers


def release_scratch() -> None:
    """Free this thread's cached scratch tensors (they are re-created on the next call)."""
    _thread_scratch().clear()


def set_chunk_size(elements: int) -> None:
    """Bound the scratch memory of one chunk to about `elements` tensor elements (at least one row)."""
    elements = check_int("chunk size (tensor elements)", elements, 1, wrong_type=ValueError)
    global _chunk_size
    _chunk_size = elements
    release_scratch()


def get_chunk_size() -> int:
    """The current chunk size in tensor elements (see `set_chunk_size`)."""
    return _chunk_size


_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


# -- the plan: rows of the layout grouped into kernel calls ---------------------------------------------
@dataclass
class _Call:
    """One kernel call's rows and key blocks (all int64, on the CPU)."""

    rows: torch.Tensor  # [X] layout row ids (l * nqb + qb)
    full: torch.Tensor  # [X, nf] full key blocks, ascending
    part: torch.Tensor  # [X, np] partial key blocks
    tiles: torch.Tensor  # [X, np] tile ids of the partial blocks
    full_len: int  # keys in the full segment (nf * bk, less the ragged tail if the last block is in it)
    step: int  # > 0: full blocks of row x start at full[0, 0] + x * step (strided view); 0: gather
    merge: bool = False  # an earlier pass wrote these rows: merge into (forward) or add to (dQ) it

    def subset(self, sel, step: int | None = None) -> _Call:
        """The same call restricted to rows `sel` (a slice or a bool mask), optionally with another step."""
        step = self.step if step is None else step
        return _Call(
            self.rows[sel], self.full[sel], self.part[sel], self.tiles[sel], self.full_len, step, self.merge
        )


@dataclass
class _Frame:
    """How batch and heads map onto the kernel's (instance, head, rows) for one layout.

    A shared layout (one layout head) stacks the `group` query heads of a KV head as the rows of an
    instance, with ``hx = B * Hkv`` kernel heads; a per-head layout has one query head per instance and
    ``hx = B``. ``q_seq[l, x, j]`` is the flat (batch * Hq + head) query sequence of layout head l,
    kernel head x and stacked head j; ``kv_seq[l, x]`` the flat KV sequence (an affine function of x).
    """

    hx: int
    qrep: int
    q_seq: torch.Tensor  # int64 [L, hx, qrep]
    kv_seq: torch.Tensor  # int64 [L, hx]


def _frame(batch: int, hq: int, hkv: int, layout_heads: int) -> _Frame:
    group = hq // hkv
    if layout_heads == 1:
        x = torch.arange(batch * hkv)
        b, g = x // hkv, x % hkv
        q_seq = b[:, None] * hq + g[:, None] * group + torch.arange(group)[None, :]
        return _Frame(batch * hkv, group, q_seq[None], x[None])
    h = torch.arange(hq)[:, None]
    b = torch.arange(batch)[None, :]
    return _Frame(batch, 1, (b * hq + h)[..., None], b * hkv + h // group)


def _padded_lists(ptr: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, width: int):
    """Entries of CSR rows `rows` as a ``[len(rows), width]`` tensor (rows must have `width` entries)."""
    start = ptr[rows]
    return idx[start[:, None] + torch.arange(width)[None, :]] if width else idx.new_zeros(len(rows), 0)


def _plan(layout: BlockLayout) -> list[list[_Call]]:
    """The non-empty rows of `layout` grouped into kernel calls (see `_Call`), in two passes.

    Pass 1 (`_band_runs`) takes the band out of rows whose full blocks are a band plus scattered blocks (a
    window with global or random blocks): a strided, copy-free segment. Pass 2 groups what is left of every
    row, its other full blocks and its partial blocks, by their counts; its rows that had a pass-1 segment
    merge into it. A pass reads what the one before wrote, so passes run one after the other.
    """
    nqb, nkb, bk = layout.num_q_blocks, layout.num_k_blocks, layout.block_k
    full_ptr, part_ptr = _row_ptr(layout.row_full_ptr), _row_ptr(layout.row_part_ptr)
    full_idx = layout.row_full_idx.cpu().long()
    part_idx = layout.row_part_idx.cpu().long()
    part_tile = layout.row_part_tile.cpu().long()
    ragged = nkb * bk - layout.kv_len
    heads = torch.arange(len(full_ptr) - 1) // nqb
    band_calls, full_ptr, full_idx, had_band = _band_runs(layout, full_ptr, full_idx, heads)
    n_full, n_part = full_ptr[1:] - full_ptr[:-1], part_ptr[1:] - part_ptr[:-1]
    # The full segment is trimmed when it holds the ragged last key block (always its last block).
    last_full = torch.full_like(n_full, -1)
    has_full = n_full > 0
    last_full[has_full] = full_idx[full_ptr[1:][has_full] - 1]
    trims = (last_full == nkb - 1) & (ragged > 0)
    key = (
        ((n_full * (nkb + 1) + n_part) * 2 + trims.long()) * 2 + had_band.long()
    ) * layout.num_heads + heads
    live = (n_full + n_part) > 0
    calls = []
    for k in torch.unique(key[live]).tolist():
        rows = torch.nonzero(key == k).flatten()
        nf, np_ = int(n_full[rows[0]]), int(n_part[rows[0]])
        full = _padded_lists(full_ptr, full_idx, rows, nf)
        part = _padded_lists(part_ptr, part_idx, rows, np_)
        tiles = _padded_lists(part_ptr, part_tile, rows, np_)
        full_len = nf * bk - (ragged if bool(trims[rows[0]]) else 0)
        calls.extend(_split_runs(rows, full, part, tiles, full_len, bool(had_band[rows[0]])))
    return [band_calls, calls]


def _band_runs(layout: BlockLayout, full_ptr, full_idx, heads):
    """Pass 1 of `_plan`: strided calls over the bands of consecutive rows, and what they leave.

    A row's band is the run of consecutive full blocks around its diagonal key block (where its queries'
    own positions fall), trimmed to the reach most rows of its layout head have on either side, so that
    the band of consecutive rows advances by a fixed step: a strided, copy-free view of K/V. Rows whose
    full blocks are exactly that band go whole to pass 2 (no merge needed there); at least `_MIN_RUN`
    consecutive rows with a band and other full blocks form a call. Returns the calls, the full lists
    (CSR) without their bands, and which rows gave one.
    """
    n_rows, bq, bk, nkb = len(full_ptr) - 1, layout.block_q, layout.block_k, layout.num_k_blocks
    nothing = [], full_ptr, full_idx, torch.zeros(n_rows, dtype=torch.bool)
    if len(full_idx) == 0 or bq % bk:
        return nothing  # with bq % bk != 0 the diagonal block does not advance by a fixed step
    counts = full_ptr[1:] - full_ptr[:-1]
    entry_row = torch.repeat_interleave(torch.arange(n_rows), counts)
    starts_run = torch.ones(len(full_idx), dtype=torch.bool)
    starts_run[1:] = (full_idx[1:] != full_idx[:-1] + 1) | (entry_row[1:] != entry_row[:-1])
    run_of_entry = torch.cumsum(starts_run, 0) - 1
    run_first = full_idx[starts_run]
    run_last = run_first + torch.bincount(run_of_entry) - 1
    # The diagonal key block of each row (bottom-right aligned), and the run holding it, if any.
    offset = layout.kv_len - layout.q_len
    diag = torch.div((torch.arange(n_rows) % layout.num_q_blocks) * bq + offset, bk, rounding_mode="floor")
    on_diag = full_idx == diag[entry_row]
    has = torch.zeros(n_rows, dtype=torch.bool)
    has[entry_row[on_diag]] = True
    run = torch.zeros(n_rows, dtype=torch.long)
    run[entry_row[on_diag]] = run_of_entry[on_diag]
    before = torch.where(has, diag - run_first[run], -1)  # full blocks left of the diagonal in its run
    after = torch.where(has, run_last[run] - diag, -1)
    reach = torch.zeros(n_rows, 2, dtype=torch.long)
    for h in torch.unique(heads[has]).tolist():
        rows_h = has & (heads == h)
        reach[heads == h] = torch.stack([torch.mode(before[rows_h]).values, torch.mode(after[rows_h]).values])
    length = reach.sum(1) + 1
    first = diag - reach[:, 0]
    holds_ragged = (first + length == nkb) & (layout.kv_len < nkb * bk)
    eligible = (
        has
        & (before >= reach[:, 0])
        & (after >= reach[:, 1])
        & (length >= 2)
        & (counts > length)
        & ~holds_ragged
    )
    linked = eligible[1:] & eligible[:-1] & (heads[1:] == heads[:-1])
    chain = torch.cumsum(torch.cat([torch.ones(1, dtype=torch.long), (~linked).long()]), 0)
    in_chain = eligible & (torch.bincount(chain)[chain] >= _MIN_RUN)
    if not bool(in_chain.any()):
        return nothing
    calls = []
    for c in torch.unique(chain[in_chain]).tolist():
        rows = torch.nonzero(chain == c).flatten()
        n = int(length[rows[0]])
        band = first[rows, None] + torch.arange(n)
        empty = rows.new_zeros(len(rows), 0)
        calls.append(_Call(rows, band, empty, empty, n * bk, bq // bk))
    # What is left of the rows that gave their band.
    into_band = full_idx - first[entry_row]
    keep = ~(in_chain[entry_row] & (into_band >= 0) & (into_band < length[entry_row]))
    left = torch.zeros(n_rows + 1, dtype=torch.long)
    left[1:] = torch.cumsum(torch.bincount(entry_row[keep], minlength=n_rows), 0)
    return calls, left, full_idx[keep], in_chain


def _row_ptr(ptr: torch.Tensor) -> torch.Tensor:
    """Per-head ``[H, n + 1]`` offsets -> one flat ``[H * n + 1]`` offset list over all rows."""
    ptr = ptr.cpu().long()
    return torch.cat([ptr[:, :-1].reshape(-1), ptr[-1:, -1]])


def _split_runs(rows, full, part, tiles, full_len, merge) -> list[_Call]:
    """Split one group into strided runs (contiguous full blocks, starts in arithmetic progression)
    and one gathered remainder."""
    nf = full.shape[1]
    whole = _Call(rows, full, part, tiles, full_len, 0, merge)
    if nf == 0:
        return [whole]
    contiguous = (full[:, -1] - full[:, 0] + 1) == nf
    if len(rows) == 1 and bool(contiguous[0]):
        return [whole.subset(slice(None), step=1)]  # one row: any step makes a view
    if len(rows) < _MIN_RUN:
        return [whole]
    start = full[:, 0]
    step_d = start[1:] - start[:-1]
    linked = contiguous[1:] & contiguous[:-1] & (step_d > 0)
    if not bool(linked.any()):
        return [whole]
    step = int(torch.mode(step_d[linked]).values)
    linked &= step_d == step
    # Runs of linked neighbours: a new run starts wherever a row is not linked to the previous one.
    run_id = torch.cumsum(torch.cat([torch.ones(1, dtype=torch.long), (~linked).long()]), 0)
    counts = torch.bincount(run_id)
    in_run = counts[run_id] >= _MIN_RUN
    calls = []
    for r in torch.unique(run_id[in_run]).tolist():
        sel = run_id == r
        calls.append(whole.subset(sel, step=step))
    rest = ~in_run
    if bool(rest.any()):
        calls.append(whole.subset(rest))
    return calls


# -- tensors in the kernel's shapes ---------------------------------------------------------------------
class _Problem:
    """Inputs flattened to per-sequence blocks, and the gathers / views one call needs."""

    def __init__(self, q, k, v, layout: BlockLayout, scale: float, key_mask):
        self.batch, self.hq, self.q_len, self.dim = q.shape
        self.hkv = k.shape[1]
        self.bq, self.bk = layout.block_q, layout.block_k
        self.nqb, self.nkb = layout.num_q_blocks, layout.num_k_blocks
        self.scale = scale
        self.dtype = q.dtype
        self.frame = _frame(self.batch, self.hq, self.hkv, layout.num_heads)
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
        """An uninitialised tensor reused by every chunk and call of this thread (see `_thread_scratch`)."""
        size = math.prod(shape)
        cache = _thread_scratch()
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

    def q_index(self, call: _Call) -> torch.Tensor:
        """Flat query-block index ``[X * hx * qrep]`` of the call's rows, in kernel order."""
        layout_head, qb = call.rows // self.nqb, call.rows % self.nqb
        return (self.frame.q_seq[layout_head] * self.nqb + qb[:, None, None]).reshape(-1)

    # key segments
    def kv_index(self, call: _Call, blocks: torch.Tensor) -> torch.Tensor:
        """Flat key-block index ``[X, hx, n]`` of `blocks` ``[X, n]``."""
        seq = self.frame.kv_seq[call.rows // self.nqb]  # [X, hx]
        return seq[:, :, None] * self.nkb + blocks[:, None, :]

    def full_kv(self, call: _Call):
        """K, V ``[X, hx, full_len, D]`` of the full segment: a strided view or a gather."""
        if call.step:
            return (self._strided(t, call, self.dim) for t in (self.k, self.v))
        index = self.kv_index(call, call.full).reshape(-1)
        shape = (len(call.rows), self.frame.hx, -1, self.dim)
        return (
            self.gather(n, t, index, shape)[:, :, : call.full_len]
            for n, t in (("kf", self.k), ("vf", self.v))
        )

    def _strided(self, blocks: torch.Tensor, call: _Call, width: int) -> torch.Tensor:
        """Overlapping windows of a ``[sequences * kv_pad, width]`` buffer, one per row of a strided run."""
        return self.window(blocks, call, int(call.full[0, 0]), call.step, call.full_len, width)

    def window(self, blocks, call: _Call, first: int, step: int, length: int, width: int) -> torch.Tensor:
        """View ``[X, hx, length, width]`` of a ``[sequences * kv_pad, width]`` buffer whose row x starts at
        key block ``first + x * step`` (rows of one call share a layout head, hence their KV sequences)."""
        seq = self.frame.kv_seq[call.rows[0] // self.nqb]
        seq_step = int(seq[1] - seq[0]) if len(seq) > 1 else 1
        offset = (int(seq[0]) * self.kv_pad + first * self.bk) * width
        strides = (step * self.bk * width, seq_step * self.kv_pad * width, width, 1)
        shape = (len(call.rows), self.frame.hx, length, width)
        return blocks.as_strided(shape, strides, blocks.storage_offset() + offset)

    def part_kv(self, call: _Call):
        index = self.kv_index(call, call.part).reshape(-1)
        shape = (len(call.rows), self.frame.hx, -1, self.dim)
        return (self.gather(n, t, index, shape) for n, t in (("kp", self.k), ("vp", self.v)))

    # masks
    def full_mask(self, call: _Call):
        """Key bias ``[X, hx, 1, full_len]`` of the full segment, or None without an active key_mask."""
        if self.key_bias is None:
            return None
        if call.step:
            return self._strided(self.key_bias.view(-1, 1), call, 1).squeeze(-1).unsqueeze(2).contiguous()
        index = self.kv_index(call, call.full).reshape(-1)
        bias = self.key_bias.view(-1, self.bk).index_select(0, index)
        return bias.view(len(call.rows), self.frame.hx, 1, -1)[..., : call.full_len]

    def part_mask(self, call: _Call):
        """Tile (and key) bias ``[X or 1, 1 or hx, qrep * bq, np * bk]`` of the partial segment, and the
        rows it hides entirely (``[X or 1, 1 or hx, qrep * bq]``)."""
        tiles = call.tiles
        # The usual case (a window): every row has the same tiles, so one mask broadcasts over the rows.
        if bool((tiles == tiles[:1]).all()):
            tiles = tiles[:1]
        rows, n = tiles.shape
        bias = self.tile_bias.index_select(0, tiles.reshape(-1)).view(rows, n, self.bq, self.bk)
        bias = bias.transpose(1, 2).reshape(rows, 1, 1, self.bq, n * self.bk)
        bias = bias.expand(rows, 1, self.frame.qrep, self.bq, n * self.bk).reshape(rows, 1, -1, n * self.bk)
        if self.key_bias is None:
            seen = self.tile_rows[tiles].any(1)  # [rows, bq]
            return bias, ~seen.repeat(1, self.frame.qrep)[:, None, :]
        index = self.kv_index(call, call.part).reshape(-1)
        keys = (
            self.key_bias.view(-1, self.bk).index_select(0, index).view(len(call.rows), self.frame.hx, 1, -1)
        )
        bias = bias + keys
        return bias, _masked_rows(bias)


class _Rows:
    """Where one chunk's query-side rows live in a ``[B * Hq * nqb, bq * width]`` buffer (q, dO, out, lse,
    dq): a strided view when they are consecutive query blocks of one layout head with one query head per
    instance (no copy), an index otherwise."""

    def __init__(self, call: _Call, prob: _Problem):
        self.count, self.hx, self.bq, self.nqb = len(call.rows), prob.frame.hx, prob.bq, prob.nqb
        self.prob = prob
        head = int(call.rows[0]) // prob.nqb
        consecutive = (
            int(call.rows[-1] - call.rows[0]) == self.count - 1 and int(call.rows[-1]) // prob.nqb == head
        )
        self.index = None
        if prob.frame.qrep == 1 and consecutive:
            seq = prob.frame.q_seq[head, :, 0]
            self.seq_step = int(seq[1] - seq[0]) if len(seq) > 1 else 1
            self.first = int(seq[0]) * prob.nqb + int(call.rows[0]) % prob.nqb
        else:
            self.index = prob.q_index(call)

    def read(self, buffer: torch.Tensor, width: int, slot: str) -> torch.Tensor:
        """``[X, hx, M, width]`` rows of `buffer`."""
        if self.index is None:
            return self._view(buffer, width)
        return self.prob.gather(slot, buffer, self.index, (self.count, self.hx, -1, width))

    def target(self, buffer: torch.Tensor, width: int, slot: str) -> torch.Tensor:
        """A ``[X, hx, M, width]`` tensor whose `commit` lands in `buffer` (a view when possible).

        Views of `buffer` hold its initial values; a scratch tensor is uninitialised."""
        if self.index is None:
            return self._view(buffer, width)
        rows = len(self.index) // (self.count * self.hx) * self.bq
        return self.prob.scratch(slot, (self.count, self.hx, rows, width), buffer.dtype)

    def commit(self, buffer: torch.Tensor, target: torch.Tensor) -> None:
        if self.index is not None:
            buffer.index_copy_(0, self.index, target.reshape(-1, buffer.shape[1]))

    def _view(self, buffer: torch.Tensor, width: int) -> torch.Tensor:
        row = self.bq * width
        strides = (row, self.seq_step * self.nqb * row, width, 1)
        offset = buffer.storage_offset() + self.first * row
        return buffer.as_strided((self.count, self.hx, self.bq, width), strides, offset)


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
    """Rows (``[X, 1 or hx, M]``) whose every key the mask hides, or None without a mask."""
    if mask is None:
        return None
    return mask.amax(-1) == float("-inf")


def _segment(qg, kseg, vseg, mask, hidden, scale):
    """(out, lse) of one segment; rows that see no key get lse -inf (the kernel reports 0)."""
    out, lse = _flash_fwd(qg, kseg, vseg, attn_mask=mask, scale=scale)
    if hidden is not None:
        lse = lse.masked_fill(hidden, float("-inf"))
    return out, lse


def _merge_into(o1, l1, o2, l2, out, lse):
    """Exact merge of two attention segments through their logsumexps (either may be empty, -inf)."""
    # Weight of segment 2 is exp(l2 - lse) = sigmoid(l2 - l1); NaN only when both are empty (output 0).
    w2 = torch.sigmoid(l2 - l1).nan_to_num_(0.0).unsqueeze(-1)
    torch.logaddexp(l1, l2, out=lse)
    if o1.dtype in (torch.float32, torch.float64):
        torch.lerp(o1, o2, w2.to(o1.dtype), out=out)
    else:
        out.copy_(torch.lerp(o1.float(), o2.float(), w2.float()))
    return out, lse


def _chunks(call: _Call, prob: _Problem, backward: bool):
    """Sub-calls of at most `get_chunk_size()` scratch elements (at least one row each).

    Counted per row and kernel head: the query-side rows (q, out, and for the backward dO and dq), the
    gathered keys and values, the partial mask, and the buffers the kernel allocates itself (its
    output; for the backward dK and dV of every key, strided or not). Keeping those under glibc's 32 MB
    mmap threshold (the default budget does) lets them be reused instead of page-faulted every call.
    """
    m, dim = prob.frame.qrep * prob.bq, prob.dim
    part_keys = call.part.shape[1] * prob.bk
    gathered = part_keys + (call.full_len if call.step == 0 else 0)
    per_row = (6 if backward else 3) * m * dim + 2 * gathered * dim + m * part_keys
    if backward:
        per_row += 2 * (call.full_len + part_keys) * dim
    size = max(1, get_chunk_size() // (prob.frame.hx * per_row))
    # Enough tasks for the workers to share, but not so small that per-call overhead dominates. Counted
    # from the machine's CPUs, not the worker or thread setting: chunk bounds fix the order in which dK/dV
    # add up, so gradients are bitwise the same whatever the thread count or SPARSE_ATTN_TORCH_WORKERS.
    size = min(size, max(_MIN_TASK_ROWS, -(-len(call.rows) // (2 * _CPUS))))
    for i in range(0, len(call.rows), size):
        # A strided run stays strided: its rows stay consecutive.
        yield call.subset(slice(i, i + size))


def _passes(layout: BlockLayout, prob: _Problem, backward: bool) -> list[list[_Call]]:
    """Every chunk of every call, per pass of `_plan`, largest first (so that the workers finish together)."""
    cost = lambda c: len(c.rows) * (c.full_len + c.part.shape[1] * prob.bk)
    plan = layout.cached("torch_backend_plan", lambda: _plan(layout))
    passes = [[chunk for call in calls for chunk in _chunks(call, prob, backward)] for calls in plan]
    return [sorted(chunks, key=cost, reverse=True) for chunks in passes if chunks]


# -- workers --------------------------------------------------------------------------------------------
# Chunks run on a small persistent pool of threads, each running single-threaded kernels (the kernels
# release the GIL). With OpenMP inside every op instead, each of the many mid-sized ops ends in a
# barrier: a thread descheduled by any other process then stalls both, and the gaps between ops leave a
# core idle. Workers take the next chunk as soon as they are free. SPARSE_ATTN_TORCH_WORKERS=0 (or 1)
# turns this off and runs the chunks in the caller's thread with torch's intra-op threads.
WORKERS_ENV = "SPARSE_ATTN_TORCH_WORKERS"
_MIN_TASK_ROWS = 8
_CPUS = os.cpu_count() or 1
_pool = None
_pool_size = 0
_pool_pid = 0
_pool_lock = threading.Lock()


def _workers() -> int:
    """Worker threads to use: SPARSE_ATTN_TORCH_WORKERS, else torch's intra-op thread count."""
    value = os.environ.get(WORKERS_ENV)
    if value is not None and value.strip():
        if not value.strip().isdigit():
            raise ValueError(f"{WORKERS_ENV} must be a non-negative integer, got {value!r}")
        return int(value)
    return torch.get_num_threads()


def _single_threaded(barrier: threading.Barrier) -> None:
    # torch initialises a thread's OpenMP/MKL thread counts lazily on first use, from the process
    # default: trigger that first, then make this worker (and only this worker) single-threaded.
    torch.get_num_threads()
    torch.set_num_threads(1)
    barrier.wait()


def _get_pool(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size, _pool_pid
    with _pool_lock:
        # A forked child inherits the executor but not its threads: start a new pool there.
        if _pool is None or _pool_size != size or _pool_pid != os.getpid():
            if _pool is not None:
                _pool.shutdown(wait=False)
            caller_threads = torch.get_num_threads()
            barrier = threading.Barrier(size + 1)
            _pool = ThreadPoolExecutor(size, thread_name_prefix="sparse_attn_torch")
            for _ in range(size):
                _pool.submit(_single_threaded, barrier)
            barrier.wait()  # every worker exists and is single-threaded
            # torch.set_num_threads also sets the default new threads start with: give it back.
            torch.set_num_threads(caller_threads)
            _pool_size, _pool_pid = size, os.getpid()
        return _pool


def _without_grad(fn, task, inference: bool):
    # Grad and inference modes are thread-local: the caller runs below autograd (and may be in inference
    # mode, whose tensors other threads may not update in place); a worker thread would not be.
    with torch.inference_mode(inference), torch.no_grad():
        return fn(task)


def _ordered_map(fn, tasks: list):
    """Results of `fn` over `tasks`, in order, computed by the workers with a bounded number in flight."""
    workers = _workers()
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    pool = _get_pool(workers)
    inference = torch.is_inference_mode_enabled()
    pending = []
    for task in tasks:
        pending.append(pool.submit(_without_grad, fn, task, inference))
        if len(pending) > workers:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()


# -- forward --------------------------------------------------------------------------------------------
def forward(q, k, v, layout, scale, key_mask):
    """``(out [B, Hq, Sq, D] like q, lse [B, Hq, Sq])``; rows with no visible key: out 0, lse -inf."""
    if q.device.type != "cpu":
        return _on_cpu(forward, q.device, q, k, v, layout, scale, key_mask)
    prob = _Problem(q, k, v, layout, scale, key_mask)
    rows_total = prob.batch * prob.hq * prob.nqb
    out = torch.zeros(rows_total, prob.bq * prob.dim, dtype=q.dtype)
    lse = torch.full((rows_total, prob.bq), float("-inf"), dtype=_backend_spec("torch").lse_dtype(q.dtype))
    for tasks in _passes(layout, prob, backward=False):
        for _ in _ordered_map(lambda chunk: _forward_rows(chunk, prob, out, lse), tasks):
            pass
    out = out.view(prob.batch, prob.hq, -1, prob.dim)[:, :, : prob.q_len]
    lse = lse.view(prob.batch, prob.hq, -1)[:, :, : prob.q_len]
    return out.contiguous(), lse.contiguous()


def _forward_rows(call: _Call, prob: _Problem, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Attention of one chunk of rows, written into the `out` and `lse` block buffers."""
    rows = _Rows(call, prob)
    qg = rows.read(prob.q, prob.dim, "q")
    segments = []
    if call.full.shape[1]:
        mask = prob.full_mask(call)
        segments.append(_segment(qg, *prob.full_kv(call), mask, _masked_rows(mask), prob.scale))
    if call.part.shape[1]:
        segments.append(_segment(qg, *prob.part_kv(call), *prob.part_mask(call), prob.scale))
    if call.merge:  # what an earlier pass wrote for these rows (views of out / lse, or gathered copies)
        segments.append((rows.read(out, prob.dim, "o_prev"), rows.read(lse, 1, "lse_prev").squeeze(-1)))
    o_dest, l_dest = rows.target(out, prob.dim, "o"), rows.target(lse, 1, "lse").squeeze(-1)
    if len(segments) == 1:
        o_dest.copy_(segments[0][0])
        l_dest.copy_(segments[0][1])
    else:
        o_acc, l_acc = segments[0]
        for o_seg, l_seg in segments[1:-1]:
            o_acc, l_acc = _merge_into(
                o_acc, l_acc, o_seg, l_seg, torch.empty_like(o_acc), torch.empty_like(l_acc)
            )
        # The last segment may be a view of the destination: merging reads each element before writing it.
        _merge_into(o_acc, l_acc, *segments[-1], o_dest, l_dest)
    rows.commit(out, o_dest)
    rows.commit(lse, l_dest)


# -- backward -------------------------------------------------------------------------------------------
def backward(do, dlse, q, k, v, out, lse, layout, scale, key_mask):
    """``(dq, dk, dv)``, recomputed from `lse` chunk by chunk; ``delta = rowsum(dO * O) - dlse``."""
    if q.device.type != "cpu":
        return _on_cpu(backward, q.device, do, dlse, q, k, v, out, lse, layout, scale, key_mask)
    if dlse is not None:
        live_dlse = torch.where(torch.isfinite(lse), dlse, torch.zeros_like(dlse))
        if bool(live_dlse.any()):
            return _backward_with_dlse(do, live_dlse, q, k, v, out, lse, layout, scale, key_mask)
    prob = _Problem(q, k, v, layout, scale, key_mask)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    saved = (prob.q, prob.seq_blocks(do, prob.bq), prob.seq_blocks(out, prob.bq), _lse_blocks(lse, prob))
    dq = torch.zeros(prob.q.shape, dtype=acc)
    dk = torch.zeros(prob.k.shape, dtype=acc)
    dv = torch.zeros(prob.v.shape, dtype=acc)
    # Workers compute; dK and dV are added here, in task order, so the result is deterministic.
    for tasks in _passes(layout, prob, backward=True):
        for adds in _ordered_map(lambda chunk: _backward_rows(chunk, prob, saved, dq), tasks):
            for grad_k, grad_v, chunk, blocks in adds:
                _add_blocks(dk, grad_k.to(dk.dtype), chunk, blocks, prob)
                _add_blocks(dv, grad_v.to(dv.dtype), chunk, blocks, prob)
    return (
        _unblock(dq, prob.batch, prob.hq, prob.q_len, prob.dim, q.dtype),
        _unblock(dk, prob.batch, prob.hkv, k.shape[2], prob.dim, q.dtype),
        _unblock(dv, prob.batch, prob.hkv, k.shape[2], prob.dim, q.dtype),
    )


def _lse_blocks(lse: torch.Tensor, prob: _Problem) -> torch.Tensor:
    """lse as ``[B * Hq * nqb, bq]``; empty and padding rows get +inf, so exp(s - lse) recomputes to 0."""
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    pad = prob.nqb * prob.bq - prob.q_len
    lse = F.pad(lse, (0, pad), value=float("inf")) if pad else lse.contiguous()
    return lse.view(-1, prob.bq)


def _backward_rows(call: _Call, prob: _Problem, saved, dq) -> list:
    """Gradients of one chunk of rows: dQ into its rows of `dq`; returns the per-segment
    ``(dK, dV, call, key blocks)`` for the caller to add into the key blocks."""
    rows = _Rows(call, prob)
    q_blocks, do_blocks, out_blocks, lse_blocks = saved
    qg, dog, og = (
        rows.read(t, prob.dim, n) for t, n in ((q_blocks, "q"), (do_blocks, "do"), (out_blocks, "o"))
    )
    lg = rows.read(lse_blocks, 1, "lse").squeeze(-1)
    if rows.index is None:
        dq_dest = rows.target(dq, prob.dim, "dq")  # a view: adds accumulate onto earlier passes
    elif call.merge:
        dq_dest = rows.read(dq, prob.dim, "dq")  # a copy of what earlier passes added, committed back
    else:
        dq_dest = rows.target(dq, prob.dim, "dq").zero_()
    segments = []
    if call.full.shape[1]:
        segments.append((*prob.full_kv(call), prob.full_mask(call), call.full))
    if call.part.shape[1]:
        segments.append((*prob.part_kv(call), prob.part_mask(call)[0], call.part))
    adds = []
    for kseg, vseg, mask, blocks in segments:
        dq_s, dk_s, dv_s = _flash_bwd(
            dog, qg, kseg, vseg, og, lg, 0.0, False, attn_mask=mask, scale=prob.scale
        )
        dq_dest.add_(dq_s)
        adds.append((dk_s, dv_s, call, blocks))
    rows.commit(dq, dq_dest)
    return adds


def _add_blocks(buffer: torch.Tensor, grad: torch.Tensor, call: _Call, blocks: torch.Tensor, prob) -> None:
    """Add a segment's gradient ``[X, hx, keys, D]`` into its key blocks `blocks` ``[X, n]``.

    A block column that advances by a fixed step >= 1 from row to row (every column of a window) is one
    strided ``add_`` with no copy; the other columns go through one ``index_add_``.
    """
    rows, n = blocks.shape
    keys = grad.shape[2]
    flat = buffer.view(-1, prob.dim)
    steps = torch.arange(rows)
    scattered = []
    for j in range(n):
        column = blocks[:, j]
        step = int(column[1] - column[0]) if rows > 1 else 1
        if step >= 1 and bool((column == column[0] + step * steps).all()):
            lo, hi = j * prob.bk, min((j + 1) * prob.bk, keys)
            # Distinct rows hit distinct blocks (step >= 1), so this in-place add never overlaps itself.
            prob.window(flat, call, int(column[0]), step, hi - lo, prob.dim).add_(grad[:, :, lo:hi])
        else:
            scattered.append(j)
    if not scattered:
        return
    if keys < n * prob.bk:
        grad = F.pad(grad, (0, 0, 0, n * prob.bk - keys))
    cols = torch.tensor(scattered)
    values = grad.reshape(rows, prob.frame.hx, n, prob.bk * prob.dim)[:, :, cols]
    index = prob.kv_index(call, blocks[:, cols]).reshape(-1)
    buffer.index_add_(0, index, values.reshape(-1, prob.bk * prob.dim))


def _unblock(blocks: torch.Tensor, batch: int, heads: int, length: int, dim: int, dtype) -> torch.Tensor:
    """``[B * H * nblocks, block * D]`` -> ``[B, H, length, D]`` in `dtype`."""
    return blocks.view(batch, heads, -1, dim)[:, :, :length].to(dtype).contiguous()


def _backward_with_dlse(do, dlse, q, k, v, out, lse, layout, scale, key_mask):
    """Fold ``delta -= dlse`` into one extra head-dim column: q, k, v get 0, out gets 1, dO gets -dlse.

    Scores and dO @ V^T are unchanged by a zero column, while rowsum(dO * O) picks up exactly -dlse.
    """
    zero_col = lambda t: F.pad(t, (0, 1))
    out_aug = torch.cat([out, torch.ones_like(out[..., :1])], -1)
    do_aug = torch.cat([do, -dlse.to(do.dtype)[..., None]], -1)
    grads = backward(
        do_aug, None, zero_col(q), zero_col(k), zero_col(v), out_aug, lse, layout, scale, key_mask
    )
    return tuple(g[..., :-1].contiguous() for g in grads)


def _on_cpu(fn, device, *args):
    """Run `fn` on CPU copies of its tensor arguments (the fused kernel is CPU-only), results back on `device`."""
    moved = [
        a.cpu() if isinstance(a, torch.Tensor) else a.to("cpu") if isinstance(a, BlockLayout) else a
        for a in args
    ]
    return tuple(t.to(device) for t in fn(*moved))
