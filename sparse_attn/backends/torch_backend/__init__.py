"""PyTorch backend (a package: `planning` groups rows into calls, `views` shapes tensors, `memory` bounds scratch,
`pool` runs chunks on worker threads, `attention` is the forward and backward): exact block-sparse attention on the CPU, forward and backward, without an S x S tensor.

Engines
    By default `forward` and `backward` hand the work to the C++ kernel (`sparse_attn.backends.cpu_kernel`,
    built on first use); what follows describes the ATen-composition engine this package implements, which
    runs when the kernel cannot be built (after one warning) or when ``SPARSE_ATTN_CPU_ENGINE=aten``.

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

from .attention import backward, forward
from .calls import Call
from .memory import CHUNK_ENV, get_chunk_size, release_scratch, set_chunk_size
from .planning import passes, plan
from .pool import WORKERS_ENV
from .views import Problem

__all__ = [
    "CHUNK_ENV",
    "WORKERS_ENV",
    "Call",
    "Problem",
    "backward",
    "forward",
    "get_chunk_size",
    "passes",
    "plan",
    "release_scratch",
    "set_chunk_size",
]
