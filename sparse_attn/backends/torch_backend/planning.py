"""The plan: the rows of a layout grouped into kernel calls (`Call`), and calls cut into chunks (`passes`)."""

from __future__ import annotations

import os

import torch

from ...layout import BlockLayout
from .calls import Call
from .memory import get_chunk_size
from .views import Problem

#: Fewest rows worth a task of their own (see `chunks`).
_MIN_TASK_ROWS = 8
_CPUS = os.cpu_count() or 1
#: Shortest run of rows worth a strided (copy-free) K/V view instead of a gather.
_MIN_RUN = 8


# -- the plan: rows of the layout grouped into kernel calls ---------------------------------------------
def _padded_lists(ptr: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, width: int):
    """Entries of CSR rows `rows` as a ``[len(rows), width]`` tensor (rows must have `width` entries)."""
    start = ptr[rows]
    return idx[start[:, None] + torch.arange(width)[None, :]] if width else idx.new_zeros(len(rows), 0)


def plan(layout: BlockLayout) -> list[list[Call]]:
    """The non-empty rows of `layout` grouped into kernel calls (see `Call`), in two passes.

    Pass 1 (`_band_runs`) takes the band out of rows whose full blocks are a band plus scattered blocks (a
    window with global or random blocks): a strided, copy-free segment. Pass 2 groups what is left of every
    row, its other full blocks and its partial blocks, by their counts; its rows that had a pass-1 segment
    merge into it. A pass reads what the one before wrote, so passes run one after the other.
    """
    nqb, nkb, bk = layout.num_q_blocks, layout.num_k_blocks, layout.block_k
    full_ptr, part_ptr = _row_ptr(layout.row_full_ptr), _row_ptr(layout.row_part_ptr)
    # Index arrays may hold unused entries past the last offset (see `sparse_attn.layout`).
    full_idx = layout.row_full_idx.cpu().long()[: int(full_ptr[-1])]
    part_idx = layout.row_part_idx.cpu().long()[: int(part_ptr[-1])]
    part_tile = layout.row_part_tile.cpu().long()[: int(part_ptr[-1])]
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
    ) * layout.num_sequences + heads
    live = (n_full + n_part) > 0
    calls = []
    for k in torch.unique(key[live]).tolist():
        rows = torch.nonzero(key == k).flatten()
        width_full, width_part = int(n_full[rows[0]]), int(n_part[rows[0]])
        full = _padded_lists(full_ptr, full_idx, rows, width_full)
        part = _padded_lists(part_ptr, part_idx, rows, width_part)
        tiles = _padded_lists(part_ptr, part_tile, rows, width_part)
        full_len = width_full * bk - (ragged if bool(trims[rows[0]]) else 0)
        calls.extend(_split_runs(rows, full, part, tiles, full_len, bool(had_band[rows[0]])))
    return [band_calls, calls]


def _band_runs(layout: BlockLayout, full_ptr, full_idx, heads):
    """Pass 1 of `plan`: strided calls over the bands of consecutive rows, and what they leave.

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
        calls.append(Call(rows, band, empty, empty, n * bk, bq // bk))
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


def _split_runs(rows, full, part, tiles, full_len, merge) -> list[Call]:
    """Split one group into strided runs (contiguous full blocks, starts in arithmetic progression)
    and one gathered remainder."""
    nf = full.shape[1]
    whole = Call(rows, full, part, tiles, full_len, 0, merge)
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


def chunks(call: Call, problem: Problem, backward: bool):
    """Sub-calls of at most `get_chunk_size()` scratch elements (at least one row each).

    Counted per row and kernel head: the query-side rows (q, out, and for the backward dO and dq), the
    gathered keys and values, the partial mask, and the buffers the kernel allocates itself (its
    output; for the backward dK and dV of every key, strided or not). Keeping those under glibc's 32 MB
    mmap threshold (the default budget does) lets them be reused instead of page-faulted every call.
    """
    m, dim = problem.frame.stacked_heads * problem.bq, problem.dim
    part_keys = call.part.shape[1] * problem.bk
    gathered = part_keys + (call.full_len if call.step == 0 else 0)
    per_row = (6 if backward else 3) * m * dim + 2 * gathered * dim + m * part_keys
    if backward:
        per_row += 2 * (call.full_len + part_keys) * dim
    size = max(1, get_chunk_size() // (problem.frame.kernel_heads * per_row))
    # Enough tasks for the workers to share, but not so small that per-call overhead dominates. Counted
    # from the machine's CPUs, not the worker or thread setting: chunk bounds fix the order in which dK/dV
    # add up, so gradients are bitwise the same whatever the thread count or SPARSE_ATTN_TORCH_WORKERS.
    size = min(size, max(_MIN_TASK_ROWS, -(-len(call.rows) // (2 * _CPUS))))
    for i in range(0, len(call.rows), size):
        # A strided run stays strided: its rows stay consecutive.
        yield call.subset(slice(i, i + size))


def passes(layout: BlockLayout, problem: Problem, backward: bool) -> list[list[Call]]:
    """Every chunk of every call, per pass of `plan`, largest first (so that the workers finish together)."""
    cost = lambda c: len(c.rows) * (c.full_len + c.part.shape[1] * problem.bk)
    calls_per_pass = layout.cached("torch_backend_plan", lambda: plan(layout))
    chunked = [
        [chunk for call in calls for chunk in chunks(call, problem, backward)] for calls in calls_per_pass
    ]
    return [sorted(pass_chunks, key=cost, reverse=True) for pass_chunks in chunked if pass_chunks]
