"""Memory of the PyTorch backend: the chunk size that bounds scratch, and per-thread scratch kept between calls."""

from __future__ import annotations

import os
import threading

from ...checks import check_int

CHUNK_ENV = "SPARSE_ATTN_TORCH_CHUNK"
_DEFAULT_CHUNK = 1 << 25


def _chunk_from_env() -> int:
    value = os.environ.get(CHUNK_ENV, str(_DEFAULT_CHUNK))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{CHUNK_ENV} must be a positive integer (tensor elements), got {value!r}")
    return int(value)


_chunk_size = _chunk_from_env()


_scratch_local = threading.local()


def thread_scratch() -> dict:
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
    thread_scratch().clear()


def set_chunk_size(elements: int) -> None:
    """Bound the scratch memory of one chunk to about `elements` tensor elements (at least one row)."""
    elements = check_int("chunk size (tensor elements)", elements, 1, wrong_type=ValueError)
    global _chunk_size
    _chunk_size = elements
    release_scratch()


def get_chunk_size() -> int:
    """The current chunk size in tensor elements (see `set_chunk_size`)."""
    return _chunk_size
